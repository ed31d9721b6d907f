"""Preloaded by tests/test_forked_launch.py into a fork server after forkserver_exit: marks in
MARKER_DIR that the server's atexit handlers ran ("atexit") and whether its module teardown ran
("finalized", from a module global's finalizer)."""

import atexit
import os
from pathlib import Path

OUT = Path(os.environ["MARKER_DIR"])
atexit.register(lambda: (OUT / "atexit").write_text("ran"))


class Finalized:
    def __init__(self, path: str):
        self.path, self.open = path, open  # teardown may have cleared this module's globals

    def __del__(self):
        with self.open(self.path, "w") as mark:
            mark.write("ran")


KEEP = Finalized(str(OUT / "finalized"))
