"""A recipe's `stages:` (SFT then DPO, or any chain): each stage is the recipe with the stage's
settings applied, and every stage after the first starts from the model the one before it
trained and merged (its `model.name_or_path` is that folder at run time; the recipe's model
stands in for it until then, for validation and the plan). `kubetune run`, `submit` and
`compile` run the stages one after another in one pipeline; each stage keeps its own run
folder (RUN_ID-NAME: prepared data, training, merged model, evaluation), and the last one's
evaluation tables it against the stage before (its base). Only the last stage is pushed."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import Field, field_validator

from .config_sections import Section

if TYPE_CHECKING:
    from .config import RunConfig

NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


class StageConfig(Section):
    name: str = Field(description="The stage's name (its run folder is RUN_ID-NAME).")
    set: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted KEY: VALUE settings of this stage over the recipe (as --set gives "
        "them), e.g. {train.objective: dpo, data.format: preference, data.path: ...}.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(
                f"a stage name is lower-case letters, digits and dashes (at most 32), got {value!r}"
            )
        return value

    @field_validator("set")
    @classmethod
    def _keys(cls, value: dict) -> dict:
        for key in value:
            if key.split(".")[0] in ("stages", "stage"):
                raise ValueError(f"a stage cannot set {key!r}")
            if key == "model.name_or_path":
                raise ValueError(
                    "a stage after the first starts from the model the stage before it "
                    "trained: set model.name_or_path at the top of the recipe"
                )
        return value


def stage_configs(cfg: RunConfig) -> list[RunConfig]:
    """The recipe of every stage, in order (each with `stage` set to its name)."""
    from .config import dump_config, parse_recipe

    base = yaml.safe_load(dump_config(cfg))
    base.pop("stages", None)
    text = yaml.safe_dump(base, sort_keys=False)
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stages: every stage needs a name of its own, got {names}")
    configs = []
    for i, stage in enumerate(cfg.stages):
        sets = [f"{key}={json.dumps(value)}" for key, value in stage.set.items()]
        configs.append(
            parse_recipe(text, f"stages[{i}] ({stage.name})", [*sets, f"stage={stage.name}"])
        )
    return configs
