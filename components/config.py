"""The run config: one typed model that a recipe YAML fills, validated on load.

Every field is documented once, here. `load_recipe(path, overrides)` reads a recipe, applies
`--set key=value` overrides and validates; any problem is a `UserError` that names the key and,
for recipe values, the file and line (`recipe.yaml:12: data.max_seq_len must be > 0, got -5`).
The resolved config is written next to every output (`write_resolved`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .artifacts import RECIPE_FILE
from .config_cluster import (
    DEFAULT_WORKSPACE,
    KFP_WORKSPACE,
    KubernetesConfig,
    ServeConfig,
)
from .config_sections import (
    AdapterConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    FlopCounterConfig,
    FsdpConfig,
    HardwareConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    ProfileConfig,
    QuantConfig,
    RegistryConfig,
    Section,
    TrainConfig,
)
from .errors import UserError
from .methods import NAMES, method_of
from .objectives import objective_of
from .objectives.settings import PreferenceConfig
from .stages import StageConfig, stage_configs

__all__ = [
    "DEFAULT_WORKSPACE",
    "KFP_WORKSPACE",
    "RECIPES_DIR",
    "AdapterConfig",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "FlopCounterConfig",
    "FsdpConfig",
    "HardwareConfig",
    "KubernetesConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "PreferenceConfig",
    "ProfileConfig",
    "QuantConfig",
    "RegistryConfig",
    "RunConfig",
    "ServeConfig",
    "TrainConfig",
    "dump_config",
    "load_recipe",
    "parse_recipe",
    "write_resolved",
]

RECIPES_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "recipes"


class RunConfig(Section):
    """The whole typed config of a run; a recipe YAML fills it."""

    model: ModelConfig
    data: DataConfig
    method: Literal[NAMES] = Field(  # type: ignore[valid-type]  # components/methods/
        "lora",
        description="qlora, lora or full fine-tuning; adapter (LLaMA-Adapter) or adapter_v2 "
        "(LLaMA-Adapter v2: adds linear-layer bias/scale and trained norms).",
    )
    quant: QuantConfig = Field(default_factory=QuantConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig,
        description="train.objective dpo, ipo, simpo, orpo: the preference loss's parameters.",
        # left out of a dumped recipe while it is the default: recipes and compiled pipelines
        # from before preference objectives read the same
        exclude_if=lambda value: value == PreferenceConfig(),
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    stages: list[StageConfig] = Field(
        default_factory=list,
        description="Train in stages (SFT, then DPO on the SFT model): each stage the recipe "
        "with its `set`, starting from the model of the stage before (components/stages.py).",
        exclude_if=lambda value: not value,
    )
    stage: str | None = Field(
        None,
        description="Set by kubetune: the stage of `stages` this recipe runs.",
        exclude_if=lambda value: value is None,
    )
    compare: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="kubetune compare: per method, dotted KEY: VALUE settings its branch trains "
        "with (over the published defaults; e.g. adapter: {train.lr: 0.05}).",
    )

    @field_validator("compare")
    @classmethod
    def _compare(cls, value: dict) -> dict:
        from .compare_methods.settings import check_key

        for method, settings in value.items():
            if method not in NAMES:
                raise ValueError(f"compare.{method}: not a method ({', '.join(NAMES)})")
            for key in settings or {}:
                try:
                    check_key(key, f"compare.{method}")
                except UserError as exc:
                    raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.data.format == "template" and not self.data.template:
            raise ValueError("data.template is required when data.format is template")
        prompt_len = self.data.max_prompt_len
        if prompt_len is not None and self.data.format != "preference":
            raise ValueError("data.max_prompt_len is for data.format=preference")
        if prompt_len is not None and prompt_len >= self.data.max_seq_len:
            raise ValueError(
                f"data.max_prompt_len={prompt_len} leaves no room for an answer in "
                f"data.max_seq_len={self.data.max_seq_len}"
            )
        if self.distributed.nodes > 1 and self.distributed.backend == "local":
            raise ValueError(
                f"distributed.nodes={self.distributed.nodes} needs "
                "distributed.backend=pytorchjob or trainjob (local runs on one machine)"
            )
        method_of(self).validate(self)
        objective_of(self).validate(self)
        if self.stages:  # every stage's recipe must be valid too
            try:
                stage_configs(self)
            except UserError as exc:
                raise ValueError(str(exc)) from None
        fsdp = self.distributed.fsdp
        if fsdp != FsdpConfig() and self.distributed.strategy != "fsdp":
            raise ValueError("distributed.fsdp.* needs distributed.strategy=fsdp")
        if self.train.flop_counter is not None and self.train.profile is not None:
            raise ValueError(
                "train.flop_counter and train.profile measure each other's overhead: use one "
                "at a time (as llama-recipes does)"
            )
        world = self.distributed.world_size
        rows = self.train.global_batch_size
        micro = self.train.micro_batch_size
        if rows is not None and rows % world:
            raise ValueError(
                f"train.global_batch_size={rows} is not a multiple of the {world} processes"
            )
        if rows is not None and micro != "auto" and rows != micro * self.train.grad_accum * world:
            raise ValueError(
                f"train.global_batch_size={rows} but micro_batch_size {micro} x grad_accum "
                f"{self.train.grad_accum} x {world} processes = "
                f"{micro * self.train.grad_accum * world}; set one of them, or "
                "micro_batch_size: auto"
            )
        if self.distributed.offload != "none" and self.distributed.strategy != "deepspeed":
            raise ValueError("distributed.offload needs distributed.strategy=deepspeed")
        if self.distributed.strategy == "deepspeed" and (
            self.train.nonfinite == "skip"
            or (self.train.spike_guard and self.train.spike_guard.action == "rollback")
        ):
            raise ValueError(
                "train.nonfinite=skip and train.spike_guard.action=rollback need ddp or fsdp: "
                "DeepSpeed's engine steps its optimizer inside backward, before a bad step "
                "could be dropped (nonfinite: stop and spike_guard.action: log work)"
            )
        low = self.kubernetes.elastic_min_nodes
        if low is not None and low > self.distributed.nodes:
            raise ValueError(
                f"kubernetes.elastic_min_nodes={low} is more than distributed.nodes="
                f"{self.distributed.nodes}"
            )
        k8s = self.kubernetes
        if not k8s.workspace_mount.startswith("/"):
            raise ValueError("kubernetes.workspace_mount must be an absolute path")
        if k8s.workload_priority_class and not k8s.queue:
            raise ValueError(
                "kubernetes.workload_priority_class is Kueue's: it needs kubernetes.queue (the "
                "LocalQueue the job is submitted to)"
            )
        if k8s.workspace == "kfp" and k8s.workspace_mount != KFP_WORKSPACE:
            if k8s.workspace_mount != DEFAULT_WORKSPACE:
                raise ValueError(
                    f"kubernetes.workspace=kfp: KFP mounts the run's workspace at "
                    f"{KFP_WORKSPACE}, not kubernetes.workspace_mount={k8s.workspace_mount}"
                )
            k8s.__dict__["workspace_mount"] = KFP_WORKSPACE  # no re-validation loop
        return self


# --- loading ---------------------------------------------------------------------------------


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys of a YAML mapping to their 1-based line numbers."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    with contextlib.suppress(yaml.YAMLError):  # the caller reports invalid YAML itself
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    return lines


def _describe(err: Mapping[str, Any]) -> str:
    """One pydantic error as `key must ..., got X`."""
    key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        return f"{key} must be {bounds[kind]} {next(iter(ctx.values()))}, got {got!r}"
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "literal_error":
        return f"{key} must be one of {ctx.get('expected')}, got {got!r}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{key}: {err['msg'].lower()}, got {got!r}"


def _error_key(err: Mapping[str, Any]) -> str:
    return ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item}: expected key=value (e.g. data.max_seq_len=1024)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # `--set data.template=Q: {question}` means the string, not a YAML mapping; lists and
    # mappings must be written in flow style ([a, b], {k: v}).
    if isinstance(value, dict | list) and not raw.lstrip().startswith(("[", "{")):
        value = raw
    return key.strip(), value


def apply_override(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A path, or the bare name of a shipped recipe (`tiny-demo`)."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{Path(recipe).stem}.yaml"
    if not path.suffix and shipped.is_file():
        return shipped
    raise UserError(f"{recipe}: no such recipe file")


def load_recipe(recipe: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a recipe file (or a shipped recipe's name), apply overrides, validate."""
    path = resolve_recipe_path(recipe)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return parse_recipe(text, str(path), overrides)


def parse_recipe(text: str, origin: str = "recipe", overrides: Sequence[str] = ()) -> RunConfig:
    """Validate recipe YAML text; `origin` names it in errors (a file path, or "recipe")."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{origin}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raise UserError(f"{origin}: the recipe is empty")
    if not isinstance(raw, dict):
        raise UserError(
            f"{origin}: a recipe is a YAML mapping of sections, got {type(raw).__name__}"
        )
    overridden: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        apply_override(raw, key, value)
        overridden[key] = item
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = _key_lines(text)
        messages = []
        for err in exc.errors():
            key = _error_key(err)
            where = next(
                (
                    f"--set {overridden[k]}"
                    for k in overridden
                    if key == k or key.startswith(k + ".")
                ),
                None,
            )
            if where is None:
                number = lines.get(key) or lines.get(key.rsplit(".", 1)[0])
                where = f"{origin}:{number}" if number else origin
            messages.append(f"{where}: {_describe(err)}")
        raise UserError("\n".join(messages)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def write_resolved(cfg: RunConfig, out_dir: Path) -> Path:
    """Write the resolved config beside an output, as litgpt writes hyper_parameters.yaml."""
    target = Path(out_dir) / RECIPE_FILE
    target.write_text(dump_config(cfg), encoding="utf-8")
    return target
