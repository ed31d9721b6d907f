"""What `kubetune run --local` shows, fed with KFP's own log lines (copied from a kfp 2.17 local
run, colours as it writes them): step lines, training progress, a failed step's tail, --verbose.
The whole pipeline through the CLI: tests/test_pipeline.py."""

from __future__ import annotations

import io

from kubetune.pipelines.local import ANSI, FAILED_TAIL, Console

KFP_LOG = [
    "17:05:36.162 - INFO - Executing task \x1b[96m'resolve-recipe'\x1b[0m",
    '    "executorInput": {',
    "17:05:36.356 - INFO - Task \x1b[96m'resolve-recipe'\x1b[0m finished with status "
    "\x1b[92mSUCCESS\x1b[0m",
    "17:05:42.291 - INFO - Executing task \x1b[96m'train-model'\x1b[0m",
    "    step 5/20 loss 6.5100 lr 1.00e-02 tokens/s 17961",
    "    step 10/20 loss 6.4143 lr 7.50e-03 tokens/s 19121",
    *[f"    worker line {i}" for i in range(FAILED_TAIL + 5)],
    "    RuntimeError: training failed (exit code 1); see the log above",
    "17:06:01.580 - ERROR - Task \x1b[96m'train-model'\x1b[0m finished with status "
    "\x1b[91mFAILURE\x1b[0m",
]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def feed(console: Console) -> str:
    for line in KFP_LOG:
        console.feed(ANSI.sub("", line))
    return console.stream.getvalue()


def test_quiet_console_shows_steps_progress_and_a_failed_steps_tail():
    out = feed(Console(verbose=False, stream=io.StringIO()))
    lines = out.splitlines()
    assert lines[0] == "  resolve-recipe         started"
    assert lines[1].startswith("  resolve-recipe         success ") and lines[1].endswith(" s")
    assert "executorInput" not in out
    # off a terminal: the first step line, then at most one every 10 s
    assert [line.strip() for line in lines if "step " in line] == ["step 5/20 loss 6.5100"]
    failed = lines.index(next(line for line in lines if "train-model            failure" in line))
    tail = lines[failed + 1 :]
    assert tail[0] == f"  --- last {FAILED_TAIL} lines of train-model (all in the log) ---"
    assert len(tail) == FAILED_TAIL + 1 and tail[-1].endswith("see the log above")
    assert "worker line 0" not in out  # older than the tail


def test_a_terminal_gets_one_redrawn_progress_bar():
    out = feed(Console(verbose=False, stream=Terminal()))
    bars = [part for part in out.split("\r") if "[" in part and "step" in part]
    assert len(bars) == 2 and "step 10/20 loss 6.4143" in bars[-1]
    assert "[" + "#" * 15 + "." * 15 + "]" in bars[-1]


def test_verbose_prints_every_line_as_it_comes():
    out = feed(Console(verbose=True, stream=io.StringIO()))
    assert out.splitlines() == [ANSI.sub("", line) for line in KFP_LOG]
