"""A stand-in training worker for tests/test_forked_launch.py: writes the distributed
environment it was started with to OUT/rank-N.json, then does what its arguments ask."""

import json
import os
import sys
from pathlib import Path

KEYS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
)  # fmt: skip


def main(argv=None) -> int:
    out, action = Path(argv[0]), argv[1]
    rank = int(os.environ["RANK"])
    env = {key: os.environ.get(key) for key in KEYS}
    (out / f"rank-{rank}.json").write_text(json.dumps({"env": env, "argv": argv}))
    print(f"rank {rank} ran", file=sys.stderr, flush=True)
    if action == "crash" and rank == 1:
        raise RuntimeError("a bug in rank 1")
    return 2 if action == "refuse" else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
