"""What the steps hand each other, defined once: the files in each step's output folder, the
kinds of model folder and the one function that tells them apart, the base-model record, the
progress line the training worker prints (and `run --local` reads back), and the label value
that marks a token as not trained on.

Nothing here imports more than the standard library, so any step, the launcher and the
console can use it without loading torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from .model_files import check_model_folder

# A label that is not trained on: prompt tokens, padding, a packed row's document starts.
# (PyTorch's cross_entropy ignore_index default; prepare writes it, train and evaluate read it.)
IGNORE_INDEX = -100

# prepare's output: an HF `datasets` DatasetDict (train/eval) plus its statistics.
STATS_FILE = "stats.json"
DATASET_DICT_FILE = "dataset_dict.json"  # written by datasets' save_to_disk

# train's and evaluate's summary of their run (train: loss history, speed, memory; evaluate:
# scores and the quality gate). merge copies train's beside the merged weights under
# TRAINING_METRICS_FILE.
METRICS_FILE = "metrics.json"
TRAINING_METRICS_FILE = "training_metrics.json"

# Model folders.
MODEL_CONFIG_FILE = "config.json"  # transformers: a loadable model
PEFT_CONFIG_FILE = "adapter_config.json"  # peft: a LoRA adapter
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_SPEC_FILE = "kubetune_adapter.json"  # kubetune's LLaMA-Adapter / Adapter v2
ADAPTER_WEIGHTS_FILE = "adapter.safetensors"
BASE_MODEL_FILE = "base_model.json"  # train: which base and data an adapter came from
MERGE_FILE = "merge.json"  # merge: what was folded into which base
RECIPE_FILE = "recipe.yaml"  # every step: the resolved recipe it ran


class ModelKind(str, Enum):
    """What a model folder holds."""

    MERGED = "merged"  # merge's output: full weights (a LLaMA-Adapter's prompts beside them)
    LORA = "lora"  # a peft LoRA adapter: loads on its base
    PROMPTS = "prompts"  # kubetune's LLaMA-Adapter (v2) adapter: loads on its base
    FULL = "full"  # a transformers model folder (full fine-tuning, any hub snapshot)
    FILES = "files"  # none of these


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    kind: ModelKind

    @property
    def needs_base(self) -> bool:
        """An adapter without weights of its own to load first."""
        return self.kind is ModelKind.LORA or (
            self.kind is ModelKind.PROMPTS and not (self.path / MODEL_CONFIG_FILE).is_file()
        )

    @property
    def has_prompts(self) -> bool:
        """LLaMA-Adapter modules to add after loading (merged or not)."""
        return (self.path / ADAPTER_SPEC_FILE).is_file()

    @property
    def is_adapter(self) -> bool:
        return self.kind in (ModelKind.LORA, ModelKind.PROMPTS)


def model_folder(path: str | Path) -> ModelFolder:
    """The kind of model folder at `path` (a folder that does not exist holds FILES), once
    model_files has found no hostile or damaged file in it."""
    path = Path(path)
    check_model_folder(path)
    if (path / MERGE_FILE).is_file():
        kind = ModelKind.MERGED
    elif (path / PEFT_CONFIG_FILE).is_file():
        kind = ModelKind.LORA
    elif (path / ADAPTER_SPEC_FILE).is_file():
        kind = ModelKind.PROMPTS
    elif (path / MODEL_CONFIG_FILE).is_file():
        kind = ModelKind.FULL
    else:
        kind = ModelKind.FILES
    return ModelFolder(path, kind)


@dataclass(frozen=True)
class BaseModelRecord:
    """base_model.json: which base model (and fetched commit) and which prepared data a trained
    model came from. merge checks the base against its recipe; push records both."""

    name_or_path: str
    revision: str | None = None
    commit: str | None = None  # the fetched copy's hub commit / S3 listing digest
    method: str | None = None
    dataset_fingerprint: str | None = None

    def write(self, folder: Path) -> None:
        (folder / BASE_MODEL_FILE).write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def read(cls, folder: Path) -> BaseModelRecord | None:
        """The record in `folder`, or None where there is none (a peft adapter from elsewhere)."""
        path = folder / BASE_MODEL_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None where it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict, indent: int | None = 1) -> None:
    """How every step writes its metrics.json / stats.json / merge.json: one line per key. A
    NaN or inf becomes null: JSON has neither, and a reader's parser would refuse the file."""
    text = json.dumps(finite_json(data), indent=indent, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


def finite_json(value):
    """`value` with every NaN/inf float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


_PROGRESS = re.compile(
    r"^\s*step (\d+)/(\d+) loss ([0-9.naninf+-]+)"
    r"(?:.* tokens/s (\d+) progress (\d+)% eta (\S+))?"
)


@dataclass(frozen=True)
class ProgressLine:
    """The worker's log line for a logging step (rank 0):
    `step N/M loss X lr L tokens/s T progress P% eta E`. `run --local` reads it back for its
    progress bar; people read it in `kubectl logs`."""

    step: int
    steps: int
    loss: float
    lr: float | None = None
    tokens_per_second: float | None = None
    percent: int | None = None
    eta: str | None = None  # "1m 05s", or "?" before a step has finished

    def format(self) -> str:
        return (
            f"step {self.step}/{self.steps} loss {self.loss:.4f} lr {self.lr:.2e} "
            f"tokens/s {self.tokens_per_second:.0f} progress {self.percent}% eta {self.eta}"
        )

    @classmethod
    def parse(cls, line: str) -> ProgressLine | None:
        """The figures of a progress line (loss alone in a shorter one), or None."""
        match = _PROGRESS.match(line)
        if match is None:
            return None
        step, steps, loss, speed, percent, eta = match.groups()
        try:
            loss_value = float(loss)
        except ValueError:  # "n", "+-": not a number after all
            return None
        return cls(
            int(step),
            int(steps),
            loss_value,
            tokens_per_second=None if speed is None else float(speed),
            percent=None if percent is None else int(percent),
            eta=eta,
        )
