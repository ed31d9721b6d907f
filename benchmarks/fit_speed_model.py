"""Refit the speed model's efficiencies (components/planner/speed.py) on measured points.

    python benchmarks/fit_speed_model.py                  # refit, write, print the table
    python benchmarks/fit_speed_model.py --check          # exit 1 if the stored fit differs
    python benchmarks/fit_speed_model.py --add-run OUT/metrics.json   # a GPU run as a point

The points are docs/benchmarks/speed-calibration.json (published runs and kubetune's own GPU
benchmarks, each with its source) and every GPU case line of benchmarks/train_throughput.py's
raw output committed under docs/benchmarks/ (both kubetune sides, as their metrics.json
records the run, and the Trainer side on the same setup). `--add-run` appends a training run's metrics.json (its
recorded prediction's setup and its measured steady tokens/s) to that file first, so each GPU
run makes the next prediction better. Prints each point's measured figure, the prediction,
the error, and the error when its publication's points are left out of the fit together
(leave-one-source-out), with a summary by publication, quantization and stack.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from kubetune.components.planner.calibration import (
    band,
    covers,
    fit,
    leave_one_out,
    load_point,
    load_points,
    metrics_point,
    raw_points,
)
from kubetune.components.planner.efficiency import CALIBRATION, Efficiency

POINTS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "speed-calibration.json"


def table(points, eff: Efficiency, loo: dict[str, float]) -> str:
    lines = [
        "| point | publication | GPU | measured | predicted | error | left-out error | fitted |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in points:
        unit = "tokens/s" if p.measure == "tokens_per_second" else "samples/s"
        left = f"{loo[p.name]:+.1%}" if p.name in loo else "-"
        lines.append(
            f"| {p.name} | {p.publication} | {p.setup.gpus} x {p.gpu} | {p.measured:,.1f} {unit} | "
            f"{p.predicted(eff):,.1f} | {p.error(eff):+.1%} | {left} | "
            f"{'yes' if p.fit else 'no: ' + p.why} |"
        )
    return "\n".join(lines)


def by_group(points, loo: dict[str, float]) -> str:
    """The out-of-sample errors by publication, quantization and stack: a systematic sign
    shows as a mean far from zero."""
    groups: dict[str, list[float]] = {}
    for p in points:
        if p.name not in loo:
            continue
        quant = f"{p.setup.quant_bits}-bit" if p.setup.quant_bits else "16-bit"
        stack = ("compiled " if p.setup.compiled else "eager ") + p.setup.stack
        for key in (f"publication: {p.publication}", f"base: {quant}", f"stack: {stack}"):
            groups.setdefault(key, []).append(loo[p.name])
    lines = [
        "| group | points | within +-30% | mean left-out error | worst |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, errors in groups.items():
        within = sum(abs(e) <= 0.3 for e in errors)
        worst = max(errors, key=abs)
        lines.append(
            f"| {key} | {len(errors)} | {within} | {sum(errors) / len(errors):+.1%} | {worst:+.1%} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=Path, default=POINTS)
    parser.add_argument(
        "--raw",
        type=Path,
        default=POINTS.parent,
        help="a folder of committed raw benchmark outputs: train_throughput.py's GPU case lines "
        "are points too (default: docs/benchmarks)",
    )
    parser.add_argument("--out", type=Path, default=CALIBRATION)
    parser.add_argument("--check", action="store_true", help="refit; exit 1 if --out differs")
    parser.add_argument("--add-run", type=Path, action="append", default=[], metavar="METRICS")
    args = parser.parse_args()
    if args.add_run:
        raw = json.loads(args.points.read_text())
        for metrics in args.add_run:
            point = metrics_point(metrics)
            if point is None:
                print(f"{metrics}: not a GPU run with a recorded prediction", file=sys.stderr)
                return 2
            raw["points"].append(point)
        args.points.write_text(json.dumps(raw, indent=1) + "\n")
    points = load_points(args.points) + [load_point(raw) for raw in raw_points(args.raw)]
    eff = fit(points)
    loo = leave_one_out(points)
    record = {
        "efficiency": asdict(eff),
        "band": band(loo),
        "covers": covers(points),
        "points_file": "docs/benchmarks/speed-calibration.json",
    }
    if args.check:
        stored = json.loads(args.out.read_text())
        if stored != record:
            print(f"stored {stored}\nrefit  {record}", file=sys.stderr)
            return 1
    else:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))
    print(table(points, eff, loo))
    b = record["band"]
    print(
        f"\nout of sample (each publication's points left out together): "
        f"{b['within_30_percent']:.0%} of {b['points']} points within +-30%, median error "
        f"{b['median_abs_error']:.0%}; measured / predicted {b['low']:.2f}-{b['high']:.2f} "
        f"(quantiles {b['quantiles'][0]:g}-{b['quantiles'][1]:g}: the band plan prints)\n"
    )
    print(by_group(points, loo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
