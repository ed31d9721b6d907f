"""The speed model's calibration: measured points (published runs, kubetune's own GPU runs,
any training run's metrics.json) and the fit of the efficiencies to them.

A point is JSON: `recipe` (recipe sections, as a recipe file has them) plus `as_run` (Setup
fields the recipe cannot say, such as a baseline's peft LoRA), or `setup` + `architecture`
(what a training run records in metrics.json `prediction`); `gpu`, `measured` (tokens_per_second
or samples_per_second, steady where the run had a steady figure), `fit` (false: shown, not
fitted, with `why`), `publication` (the points one source gave, left out of the fit together
for the out-of-sample error; default: the source up to its first comma)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..methods import named
from .architecture import Architecture
from .efficiency import CALIBRATION, Efficiency
from .gpus import GPU_TYPES
from .speed import Setup, Work, step_time, work

DEFAULT_DATA = {"path": "sample://dialogsum", "format": "samsum"}


@dataclass(frozen=True)
class Band:
    """How far measured runs were from the model out of sample (each publication's points
    left out of the fit together): the ratios measured / predicted at two quantiles, and what
    the fit's points cover (a setting outside them has no measured point behind it)."""

    low: float
    high: float
    quantiles: tuple[float, float]
    within_30_percent: float
    points: int
    covers: dict[str, list[str]]

    @classmethod
    def load(cls, path: Path = CALIBRATION) -> Band:
        record = json.loads(path.read_text())
        band = record["band"]
        return cls(
            band["low"],
            band["high"],
            tuple(band["quantiles"]),
            band["within_30_percent"],
            band["points"],
            record["covers"],
        )

    def throughput(self, value: float) -> tuple[float, float]:
        return value * self.low, value * self.high

    def duration(self, value: float) -> tuple[float, float]:
        return value / self.high, value / self.low

    def outside(self, features: dict[str, str]) -> dict[str, str]:
        """The settings of `features` no fitted point had."""
        return {k: v for k, v in features.items() if v not in self.covers.get(k, [v])}


@dataclass
class Point:
    name: str
    gpu: str
    arch: Architecture
    setup: Setup
    measure: str  # tokens_per_second or samples_per_second
    measured: float
    fit: bool
    source: str
    why: str = ""
    # the points one publication (or benchmark output) gave: left out of the fit together
    publication: str = ""
    work: Work | None = None

    def predicted(self, eff: Efficiency) -> float:
        if self.work is None:
            self.work = work(self.arch, self.setup)
        t = step_time(self.arch, self.setup, GPU_TYPES[self.gpu], eff, self.work)
        return t.tokens_per_second if self.measure == "tokens_per_second" else t.samples_per_second

    def error(self, eff: Efficiency) -> float:
        return self.predicted(eff) / self.measured - 1

    @property
    def features(self) -> dict[str, str]:
        return features(self.arch, self.setup, self.gpu)


def features(arch: Architecture, setup: Setup, gpu: str) -> dict[str, str]:
    """What a prediction's setting is, in the terms `plan` checks against the calibration: a
    setting whose value no fitted point had is outside what the points cover."""
    strategy = setup.strategy
    if strategy == "deepspeed":
        strategy += f" ZeRO-{setup.zero_stage}"
    return {
        "GPU": gpu,
        "method": setup.method + (f" {setup.quant_bits}-bit" if setup.quant_bits else ""),
        "model": "mixture-of-experts" if arch.experts else "dense",
        "layers": "compiled" if setup.compiled else "eager",
        "attention": "dense mask" if setup.dense_attention else "causal or block-sparse kernel",
        # kubetune's fused LoRA (the default since issue 21) or peft's forward
        "LoRA kernel": setup.lora if named(setup.method).lora_matmuls else "none",
        "strategy": strategy,
        "nodes": "several nodes" if setup.nodes > 1 else "one node",
        "offload": setup.offload,
        "reference forward": "live" if setup.reference_forward else "none",
    }


def recipe_point(raw: dict):
    """Architecture and Setup of a point written as recipe sections."""
    from ..config import RunConfig
    from .architecture import architecture
    from .data_figures import Data
    from .fit import as_set
    from .forecast import planned_setup

    sections = {k: dict(v) if isinstance(v, dict) else v for k, v in raw["recipe"].items()}
    sections["data"] = {**DEFAULT_DATA, **sections.get("data", {})}
    cfg = RunConfig.model_validate(sections)
    arch = architecture(cfg)
    fit = as_set(cfg, arch.layers, "as run")
    seq = cfg.data.max_seq_len
    span = int(raw.get("attention_span", seq))
    data = Data(None, 0, seq, span, None, "point")
    gpus = int(raw.get("gpus", 1))
    setup = planned_setup(cfg, arch, fit, data, gpus)
    return arch, dataclasses.replace(setup, **raw.get("as_run", {}))


def load_point(raw: dict) -> Point:
    if "setup" in raw:
        arch, setup = Architecture(**raw["architecture"]), Setup(**raw["setup"])
    else:
        arch, setup = recipe_point(raw)
    (measure, value), *_ = raw["measured"].items()
    return Point(
        raw["name"],
        raw["gpu"],
        arch,
        setup,
        measure,
        float(value),
        raw.get("fit", True),
        raw.get("source", ""),
        raw.get("why", ""),
        raw.get("publication") or raw.get("source", "").split(",")[0],
    )


def load_points(path: Path) -> list[Point]:
    return [load_point(raw) for raw in json.loads(path.read_text())["points"]]


def metrics_point(metrics_file: Path) -> dict | None:
    """A calibration point from a GPU training run's metrics.json (None off GPU or without a
    prediction): its setup, architecture and measured steady (else whole-run) tokens/s."""
    record = json.loads(metrics_file.read_text())
    return record_point(record, f"run {metrics_file.parent.name}", str(metrics_file))


def record_point(record: dict, name: str, source: str) -> dict | None:
    """A point from a metrics.json record (the worker's, or a benchmark side's)."""
    prediction = record.get("prediction") or {}
    if record.get("device") != "cuda" or not prediction.get("setup"):
        return None
    measured = record.get("steady_tokens_per_second") or record.get("padded_tokens_per_second")
    if not measured:
        return None
    return setup_point(name, source, prediction, prediction["setup"], measured)


def setup_point(name: str, source: str, prediction: dict, setup: dict, measured: float) -> dict:
    """A point in `setup` form: a recorded prediction's GPU and architecture, this setup, and
    the tokens/s measured with it."""
    return {
        "name": name,
        "source": source,
        "gpu": prediction["gpu"],
        "setup": setup,
        "architecture": prediction["architecture"],
        "measured": {"tokens_per_second": measured},
    }


def harness_points(line: dict, source: str) -> list[dict]:
    """Points from one case line of benchmarks/train_throughput.py's raw output: each kubetune
    side as its metrics.json says, and the Trainer side on the kubetune side's setup with what
    that baseline runs (transformers' kernels and loss, peft's LoRA, no compiled layers, every
    layer checkpointed; the same tokens per micro batch, flattened by DataCollatorWithFlattening
    into one row that SDPA attends with a dense block-diagonal mask)."""
    points = []
    for side in ("kubetune", "kubetune_auto"):
        point = record_point(line.get(side) or {}, f"{line['case']}: {side}", source)
        if point is not None:
            points.append(point)
    ours = (line.get("kubetune") or {}).get("prediction") or {}
    theirs = line.get("trainer") or {}
    if ours.get("setup") and (line.get("kubetune") or {}).get("device") == "cuda":
        measured = theirs.get("steady_tokens_per_second") or theirs.get("tokens_per_second")
        if measured:
            setup = {
                **ours["setup"],
                "fused_norms": False,
                "loss": "transformers",
                "compiled": False,
                "lora": "peft",
                "checkpointed": ours["architecture"]["layers"],
                "span": ours["setup"]["micro_batch"] * ours["setup"]["row_len"],
                "dense_attention": True,
            }
            points.append(setup_point(f"{line['case']}: trainer", source, ours, setup, measured))
    return points


def raw_points(folder: Path) -> list[dict]:
    """Every GPU point in the benchmarks' raw outputs committed under `folder`: the JSON case
    lines of train_throughput.py (CPU runs and other lines are skipped)."""
    points = []
    for path in sorted(folder.glob("*")):
        if path.suffix not in (".txt", ".jsonl", ".json") or path.name == "speed-calibration.json":
            continue
        for text in path.read_text(errors="replace").splitlines():
            if not text.startswith('{"case"'):
                continue
            try:
                line = json.loads(text)
            except ValueError:
                continue
            points += harness_points(line, f"{path.name}")
    return points


GRID = {
    "matmul": [0.2 + 0.1 * i for i in range(8)],  # 0.2 .. 0.9
    "memory": [0.1, 0.2, 0.35, 0.5, 0.7, 0.9],
    "op_seconds": [3e-6 * 10 ** (i / 6) for i in range(13)],  # 3 .. 300 us
    "overlap": [1.0, 2.0, 4.0],
    "eager_traffic": [1.0, 3.0, 6.0, 10.0, 15.0],
}
BOUNDS = {
    "matmul": (0.05, 1.0),
    "memory": (0.05, 0.95),
    # an eager op costs the host its dispatch and a CUDA launch (a few us each): a fit free to go
    # lower trades host time for memory time and lands near zero, which no eager op reaches
    "op_seconds": (3e-6, 1e-3),
    "overlap": (1.0, 20.0),
    "int8": (0.005, 0.95),
    "dense": (0.01, 0.95),
    "compiled": (0.01, 0.95),
    "dequant": (0.01, 0.95),
    "eager_traffic": (1.0, 40.0),
}
BAND = (0.1, 0.9)  # the quantiles of the out-of-sample ratios measured / predicted plan prints


def loss(points: list[Point], eff: Efficiency) -> float:
    """The squared log errors, averaged within each publication and summed over them: every
    publication weighs the same (its points share its unstated settings, so a 15-row table
    is not 15 independent runs), as the out-of-sample error leaves each out whole."""
    groups: dict[str, list[float]] = {}
    for p in points:
        groups.setdefault(p.publication, []).append(math.log1p(p.error(eff)) ** 2)
    return sum(sum(errors) / len(errors) for errors in groups.values())


def fit(points: list[Point]) -> Efficiency:
    """The efficiencies that minimise `loss` over the fitted points: a grid over the five
    shared ones on the points no own share speaks for, then each own share (LLM.int8's, dense
    attention's, compiled layers', bitsandbytes' 4-bit dequantization's) on the points that
    have it (None when there is none: the prior, as the matmuls' or memory's share), then a
    finer search around the best, one coordinate at a time, on all."""
    fitted = [p for p in points if p.fit]
    if not fitted:
        raise ValueError("no calibration point to fit")
    # the points that alone say each of these shares, by their setup
    owns = {
        "int8": lambda s: s.quant_bits == 8,
        "dense": lambda s: s.dense_attention,
        "compiled": lambda s: s.compiled,
        "dequant": lambda s: s.bitsandbytes_4bit,
    }
    own = {name: [p for p in fitted if is_own(p.setup)] for name, is_own in owns.items()}
    shared = [p for p in fitted if not any(is_own(p.setup) for is_own in owns.values())] or fitted
    best = min(
        (
            Efficiency(**dict(zip(GRID, values, strict=True)), points=len(fitted))
            for values in itertools.product(*GRID.values())
        ),
        key=lambda e: loss(shared, e),
    )
    names = list(GRID)
    for name, group in own.items():
        if group:
            names.append(name)
            shares = (0.01 * 1.25**k for k in range(20))
            best = min(
                (dataclasses.replace(best, **{name: share}) for share in shares),  # type: ignore[arg-type]
                key=lambda e: loss(group, e),
            )
    for _ in range(6):
        for name in names:
            low, high = BOUNDS[name]
            value = getattr(best, name)
            candidates = [min(high, max(low, value * 1.05**k)) for k in range(-10, 11)]
            best = min(
                (dataclasses.replace(best, **{name: c}) for c in candidates),
                key=lambda e: loss(fitted, e),
            )
    return dataclasses.replace(
        best,
        matmul=round(best.matmul, 4),
        memory=round(best.memory, 4),
        op_seconds=float(f"{best.op_seconds:.4g}"),
        overlap=round(best.overlap, 3),
        eager_traffic=round(best.eager_traffic, 3),
        int8=None if best.int8 is None else round(best.int8, 4),
        dense=None if best.dense is None else round(best.dense, 4),
        compiled=None if best.compiled is None else round(best.compiled, 4),
        dequant=None if best.dequant is None else round(best.dequant, 4),
    )


def leave_one_out(points: list[Point]) -> dict[str, float]:
    """Each fitted point's error when the efficiencies are fitted without its publication:
    every point one source gave is left out together (its points share that source's
    unstated settings, so leaving one out alone would flatter the fit)."""
    errors = {}
    for publication in dict.fromkeys(p.publication for p in points if p.fit):
        others = [q for q in points if q.publication != publication]
        if not any(q.fit for q in others):
            continue
        eff = fit(others)
        for p in points:
            if p.fit and p.publication == publication:
                errors[p.name] = p.error(eff)
    return errors


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of values, linear between the order statistics."""
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def band(out_of_sample: dict[str, float]) -> dict:
    """What the out-of-sample errors say about a new prediction: the ratios measured /
    predicted at BAND's quantiles (plan prints the prediction times each), the share within
    +-30% and the median error."""
    ratios = [1 / (1 + e) for e in out_of_sample.values()]
    errors = sorted(abs(e) for e in out_of_sample.values())
    return {
        "low": round(quantile(ratios, BAND[0]), 3),
        "high": round(quantile(ratios, BAND[1]), 3),
        "quantiles": list(BAND),
        "within_30_percent": round(sum(e <= 0.3 for e in errors) / len(errors), 3),
        "median_abs_error": round(quantile(errors, 0.5), 3),
        "points": len(errors),
    }


def covers(points: list[Point]) -> dict[str, list[str]]:
    """Each feature's values among the fitted points (`plan` flags a setting outside them)."""
    seen: dict[str, set[str]] = {}
    for p in points:
        if p.fit:
            for key, value in p.features.items():
                seen.setdefault(key, set()).add(value)
    return {key: sorted(values) for key, values in seen.items()}
