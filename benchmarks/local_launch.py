"""The local backend's launch overhead: `kubetune train` of the tiny demo for 2 steps with the
workers forked from a launcher that imported them (forked_launch.py, the default without CUDA)
against torchrun starting a fresh interpreter per worker (KUBETUNE_LOCAL_LAUNCHER=torchrun), in
the same run, alternating, on the same prepared dataset. Reports wall seconds and CPU seconds
(user + system of every process of the launch) per launch, and the ratios.

    python benchmarks/local_launch.py [--repeats 3] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KUBETUNE = str(Path(sys.executable).parent / "kubetune")
RECIPE = str(REPO / "pipelines" / "recipes" / "tiny-demo.yaml")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch(launcher: str, dataset: Path, out: Path, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `kubetune train`."""
    env = {**os.environ, "KUBETUNE_LOCAL_LAUNCHER": launcher}
    cpu, wall = children_cpu(), time.perf_counter()
    subprocess.run(
        [KUBETUNE, "train", RECIPE, "--dataset", str(dataset), "--output", str(out),
         "--set", f"train.max_steps={steps}"],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - wall, children_cpu() - cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    results: dict[str, list[tuple[float, float]]] = {"torchrun": [], "forked": []}
    with tempfile.TemporaryDirectory(prefix="kubetune-launch-bench-") as tmp:
        work = Path(tmp)
        subprocess.run(
            [KUBETUNE, "prepare", RECIPE, "--output", str(work / "dataset")],
            check=True, capture_output=True,
        )  # fmt: skip
        for n in range(args.repeats):
            for launcher in results:
                out = work / f"{launcher}-{n}"
                results[launcher].append(launch(launcher, work / "dataset", out, args.steps))
    print(
        f"tiny demo, {args.steps} steps, 2 workers, {os.cpu_count()} CPUs, median of {args.repeats}"
    )
    print("| launcher | wall s | CPU s |")
    print("|---|---:|---:|")
    median = {
        k: tuple(statistics.median(x) for x in zip(*v, strict=True)) for k, v in results.items()
    }
    for launcher, (wall, cpu) in median.items():
        print(f"| {launcher} | {wall:.2f} | {cpu:.2f} |")
    (tw, tc), (fw, fc) = median["torchrun"], median["forked"]
    print(f"| forked / torchrun | {fw / tw:.2f}x | {fc / tc:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
