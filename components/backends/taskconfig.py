"""What the KFP train task passes through to the training job (KFP's TaskConfig,
`task_config_passthroughs` on the train component): resources, env, node selector, tolerations,
affinity and volumes set on the task in the pipeline (`task.set_env_variable`,
`kubernetes.add_toleration`, ...), and the run's KFP workspace volume.

The recipe wins where both set the same thing: a resource the recipe requests, an env variable
it sets, a node selector key, a volume mounted at the same path. The task adds what the recipe
leaves out. Outside KFP (the CLI, `run --local`) there is nothing to pass through.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

from ..errors import UserError

# What `kubetune train` hands a cluster backend from its environment (the KFP train step passes
# both as arguments): a TaskConfig as JSON, and the job's name (the same on every retry).
ENV = "KUBETUNE_TASK_CONFIG"
JOB_NAME_ENV = "KUBETUNE_JOB_NAME"


@dataclass(frozen=True)
class TaskConfig:
    resources: dict = field(default_factory=dict)
    env: list = field(default_factory=list)
    node_selector: dict = field(default_factory=dict)
    tolerations: list = field(default_factory=list)
    affinity: dict = field(default_factory=dict)
    volumes: list = field(default_factory=list)
    volume_mounts: list = field(default_factory=list)

    @classmethod
    def _of(cls, value_of) -> TaskConfig:
        """Each field from `value_of(name)`, empty where that is None or empty."""
        empty = {f.name: f.default_factory for f in fields(cls)}
        return cls(**{name: value_of(name) or make() for name, make in empty.items()})  # type: ignore[operator]

    @classmethod
    def from_kfp(cls, config) -> TaskConfig:
        """From kfp.dsl.TaskConfig (its fields are None when not passed through)."""
        return cls._of(lambda name: getattr(config, name, None))

    @classmethod
    def from_env(cls) -> TaskConfig:
        text = os.environ.get(ENV)
        if not text:
            return cls()
        try:
            given = json.loads(text)
        except ValueError:
            raise UserError(f"{ENV}: not JSON") from None
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"{ENV}: unknown keys {sorted(unknown)}")
        return cls._of(given.get)

    @classmethod
    def from_command_line(cls) -> tuple[TaskConfig, str | None]:
        """(the TaskConfig, the job name) a `kubetune train` command line was given through
        KUBETUNE_TASK_CONFIG and KUBETUNE_JOB_NAME: how a KFP task is reproduced by hand."""
        return cls.from_env(), os.environ.get(JOB_NAME_ENV) or None

    def to_json(self) -> str:
        return json.dumps(
            {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}
        )

    def workspace_claim(self, mount: str) -> str | None:
        """The PVC mounted at `mount` in the task (KFP's run workspace at /kfp-workspace)."""
        names = {m.get("name") for m in self.volume_mounts if m.get("mountPath") == mount}
        for volume in self.volumes:
            if volume.get("name") in names and "persistentVolumeClaim" in volume:
                return volume["persistentVolumeClaim"]["claimName"]
        return None


def merge_resources(recipe: dict, task: TaskConfig) -> dict:
    out = {k: dict(v) for k, v in recipe.items()}
    for part in ("requests", "limits"):
        for key, value in (task.resources.get(part) or {}).items():
            out.setdefault(part, {}).setdefault(key, value)
    return out


def merge_env(recipe: list[dict], task: TaskConfig) -> list[dict]:
    names = {e["name"] for e in recipe}
    return recipe + [e for e in task.env if e.get("name") not in names]


def merge_pool(pool: dict, task: TaskConfig) -> dict:
    """nodeSelector, tolerations and affinity of the training pods."""
    out = dict(pool)
    if task.node_selector:
        out["nodeSelector"] = {**task.node_selector, **pool.get("nodeSelector", {})}
    tolerations = list(pool.get("tolerations", []))
    tolerations += [t for t in task.tolerations if t not in tolerations]
    if tolerations:
        out["tolerations"] = tolerations
    if task.affinity:
        out["affinity"] = task.affinity
    return out


def extra_volumes(
    mounts: list[dict], volumes: list[dict], task: TaskConfig
) -> tuple[list[dict], list[dict]]:
    """The recipe's mounts and volumes, and the task's at paths (and names) the recipe does not
    use; a task volume the KFP workspace comes from is the recipe's workspace already."""
    paths = {m["mountPath"] for m in mounts}
    names = {v["name"] for v in volumes}
    added = [m for m in task.volume_mounts if m.get("mountPath") not in paths]
    wanted = {m["name"] for m in added} - names
    return (
        mounts + [m for m in added if m["name"] in wanted],
        volumes + [v for v in task.volumes if v.get("name") in wanted],
    )
