"""`kubetune run RECIPE --local` and `kubetune compare ... --local`: a pipeline on this machine
through KFP's local runner (`kfp.local`, subprocess runner, this Python environment): the same
components and DAG as on a cluster, with a local folder as the workspace volume.

The pipeline runs in a child process whose output (KFP's executor logs, every step's own output)
goes to a log file in the run folder, `RUN/kfp-local.log`. The console gets one line per step as
it starts and ends (name, status, seconds), a progress bar for the training steps, and the closing
summary; a failed step's last lines are printed, and `--verbose` prints everything as it comes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubetune.components.artifacts import METRICS_FILE, ProgressLine
from kubetune.components.config import load_recipe
from kubetune.components.errors import UserError
from kubetune.components.storage import is_s3

LOG_NAME = "kfp-local.log"
FAILED_TAIL = 40  # lines of a failed step's log printed on the console
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TASK_START = re.compile(r"Executing task '([^']+)'")
TASK_END = re.compile(r"Task '([^']+)' finished with status (\w+)")


def _local_setup(recipe: str, overrides: list[str], workspace: str):
    """(recipe config, absolute workspace) with kfp.local initialised on that workspace."""
    cfg = load_recipe(recipe, overrides)
    if not is_s3(cfg.output.uri):  # every task is its own process: give them one absolute place
        destination = Path(cfg.output.uri).resolve()
        # the local run lays out its own folders (as it does the workspace): the push step,
        # like every step, refuses a destination whose parent folder is missing
        destination.parent.mkdir(parents=True, exist_ok=True)
        overrides = [*overrides, f"output.uri={destination}"]
        cfg = load_recipe(recipe, overrides)
    ws = Path(workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)

    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(ws / "kfp-root"))
    return cfg, ws, overrides


def _child(job: dict) -> int:
    """In the child process: build and run the pipeline; the outcome goes to job["result"]."""
    result: dict = {}
    try:
        cfg, ws, overrides = _local_setup(job["recipe"], job["overrides"], job["workspace"])
        from kubetune.pipelines.finetune import no_retries

        no_retries()  # one machine: a failed step fails the run at once (no 60 s + 120 s waits)
        if job["kind"] == "compare":
            from kubetune.pipelines.compare import build_compare_pipeline

            pipeline = build_compare_pipeline(cfg, job["methods"], workspace=str(ws), parallelism=1)
        else:
            from kubetune.pipelines.finetune import build_pipeline

            pipeline = build_pipeline(cfg, workspace=str(ws))
        try:
            # a staged recipe's stages are fixed when built: --set applies over each stage's
            task = (
                pipeline(overrides=overrides) if cfg.stages and job["kind"] == "run" else pipeline()
            )
            result = {"output": task.output}
        except RuntimeError as exc:  # kfp.local: a task failed; its log is above
            result = {"failed": ANSI.sub("", str(exc))}
    except UserError as exc:
        result = {"user_error": str(exc)}
    Path(job["result"]).write_text(json.dumps(result))
    return 0


class Console:
    """What the parent shows: step lines, the training progress, a failed step's tail."""

    def __init__(self, verbose: bool, stream=None):
        self.verbose, self.stream = verbose, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.started: dict[str, float] = {}
        self.lines: dict[str, list[str]] = {}  # the running or last run of each task
        self.current: str | None = None
        self.bar_shown = False
        self.last_plain = 0.0

    def _print(self, text: str) -> None:
        if self.bar_shown:  # end the progress line before anything else
            print(file=self.stream)
            self.bar_shown = False
        print(text, file=self.stream, flush=True)

    def feed(self, line: str) -> None:
        if self.verbose:
            self._print(line)
        if match := TASK_START.search(line):
            name = match.group(1)
            self.started[name], self.lines[name], self.current = time.monotonic(), [], name
            if not self.verbose:
                self._print(f"  {name:<22} started")
            return
        if match := TASK_END.search(line):
            name, status = match.groups()
            seconds = time.monotonic() - self.started.get(name, time.monotonic())
            if not self.verbose:
                self._print(f"  {name:<22} {status.lower():<8} {seconds:6.1f} s")
                if status != "SUCCESS":
                    tail = self.lines.get(name, [])[-FAILED_TAIL:]
                    self._print(f"  --- last {len(tail)} lines of {name} (all in the log) ---")
                    for text in tail:
                        self._print(f"  | {text}")
            return
        if self.current is not None:
            self.lines[self.current].append(line)
        if not self.verbose and (figures := ProgressLine.parse(line)):
            self.progress(figures)

    def progress(self, figures: ProgressLine) -> None:
        done, total = figures.step, figures.steps
        text = f"step {done}/{total} loss {figures.loss:.4f}"
        if figures.eta is not None:
            text += f" {figures.tokens_per_second:.0f} tokens/s eta {figures.eta}"
        if self.tty:
            width = 30
            filled = round(width * done / max(total, 1))
            bar = "#" * filled + "." * (width - filled)
            print(f"\r  {'':<22} [{bar}] {text}", end="", file=self.stream, flush=True)
            self.bar_shown = True
        elif time.monotonic() - self.last_plain >= 10 or done == total:
            self.last_plain = time.monotonic()
            self._print(f"  {'':<22} {text}")


def _run(job: dict, verbose: bool) -> dict:
    """Run the pipeline in a child process, its output into the log; returns its result."""
    workspace = Path(job["workspace"]).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    log_path = workspace / f"{LOG_NAME}.{os.getpid()}"
    with tempfile.TemporaryDirectory() as folder:
        job = {**job, "result": str(Path(folder) / "result.json")}
        console = Console(verbose)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "kubetune.pipelines.local", json.dumps(job)]
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                env=env,
            )
            try:
                for raw in proc.stdout or ():
                    line = ANSI.sub("", raw.rstrip("\n"))
                    log.write(line + "\n")
                    console.feed(line)
            except KeyboardInterrupt:
                proc.terminate()
                raise
            code = proc.wait()
        if console.bar_shown:
            print(flush=True)
        result_file = Path(job["result"])
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if not result:  # the child died before it could say anything
        tail = log_path.read_text(errors="replace").splitlines()[-FAILED_TAIL:]
        print("\n".join(tail), file=sys.stderr)
        result = {"failed": f"the local runner exited with code {code}"}
    output = result.get("output")
    run_dir = Path(output).parent if output else _newest_run(workspace)
    final = run_dir / LOG_NAME if run_dir else workspace / LOG_NAME
    log_path.replace(final)
    result["log"] = str(final)
    return result


def _newest_run(workspace: Path) -> Path | None:
    runs = [p for p in (workspace / "runs").glob("*") if p.is_dir()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _finish(result: dict) -> None:
    """Raise for a recipe error; say where the log is for a failed step."""
    if "user_error" in result:
        raise UserError(result["user_error"])
    if "failed" in result:
        print(f"error: the pipeline failed: {result['failed']}", file=sys.stderr)
        print(f"the whole log: {result['log']}", file=sys.stderr)


def run_local(recipe: str, overrides: list[str], workspace: str, verbose: bool = False) -> int:
    cfg = load_recipe(recipe, overrides)  # a bad recipe fails here, before any process starts
    started = time.monotonic()
    job = {"kind": "run", "recipe": recipe, "overrides": overrides, "workspace": workspace}
    result = _run(job, verbose)
    _finish(result)
    if "failed" in result:
        return 1
    seconds = time.monotonic() - started
    eval_dir = Path(result["output"])
    metrics = json.loads((eval_dir / METRICS_FILE).read_text())
    tuned, base = metrics["tuned"], metrics["baseline"]
    print(f"\npipeline finished in {seconds:.0f} s (run folder {eval_dir.parent})")
    pairs = tuned.get("preference_accuracy") is not None  # preference data: held-out pairs
    extra = f" {'pref acc':>8} {'reward acc':>10}" if pairs else ""
    print(f"{'':6} {'eval loss':>10} {'ROUGE-1':>8} {'ROUGE-2':>8} {'ROUGE-L':>8}{extra}")
    for name, m in (("base", base), ("tuned", tuned)):
        cells = ""
        if pairs:
            reward = m.get("reward_accuracy")
            cells = f" {m['preference_accuracy']:8.4f} " + (
                f"{reward:10.4f}" if reward is not None else f"{'-':>10}"
            )
        print(
            f"{name:6} {m['eval_loss']:10.4f} {m['rouge1']:8.4f} {m['rouge2']:8.4f} "
            f"{m['rougeL']:8.4f}{cells}"
        )
    print(f"report: {eval_dir / 'report.html'}")
    print(f"log:    {result['log']}")
    if metrics["gate"]["passed"]:
        uri = cfg.output.uri if is_s3(cfg.output.uri) else Path(cfg.output.uri).resolve()
        print(f"model:  {uri} (manifest.json lists every file)")
    else:
        failed = ", ".join(
            f"{c['metric']} {c['value']} {c['op']} {c['threshold']}"
            for c in metrics["gate"]["checks"]
            if not c["passed"]
        )
        raise UserError(f"the quality gate failed ({failed}): the model was not pushed")
    return 0


def compare_local(
    recipe: str, overrides: list[str], methods: str, workspace: str, verbose: bool = False
) -> int:
    """`kubetune compare --local`: the comparison pipeline here, one branch at a time (the
    machine's cores are shared: branches side by side would skew each other's timings)."""
    load_recipe(recipe, overrides)
    started = time.monotonic()
    job = {
        "kind": "compare",
        "recipe": recipe,
        "overrides": overrides,
        "methods": methods,
        "workspace": workspace,
    }
    result = _run(job, verbose)
    _finish(result)
    if "failed" in result:
        return 1
    out = Path(result["output"])
    print(f"\ncomparison finished in {time.monotonic() - started:.0f} s (run folder {out.parent})")
    print((out / "comparison.md").read_text(), end="")
    print(f"report: {out / 'report.html'}")
    print(f"log:    {result['log']}")
    return 0


if __name__ == "__main__":  # the child process of _run
    sys.exit(_child(json.loads(sys.argv[1])))
