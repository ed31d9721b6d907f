"""What the PyTorchJob and the TrainJob renderers share (pytorchjob.py, trainjob.py): the
training pod's container (the worker command, its environment with the resolved recipe and
secretKeyRefs, resources), its volumes on the workspace PVC, the GPU node pool, the "restricted"
Pod Security Standard, labels, job names, and the YAML dump."""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath

import yaml

from ..config import RunConfig
from ..errors import UserError
from ..train.entry import worker_args
from .taskconfig import TaskConfig, extra_volumes, merge_env, merge_pool, merge_resources

RECIPE_ENV = "KUBETUNE_RECIPE"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # Kueue's LocalQueue of a job
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"  # Kueue's WorkloadPriorityClass of a job
NO_TASK = TaskConfig()
MAX_NAME = 40  # pods are NAME-worker-N and need room under the 63-character DNS label limit


def hashed_job_name(prefix: str, key: str) -> str:
    """A DNS-1123 name, the same for the same key: a retry finds the job it created."""
    slug = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-") or "run"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    room = MAX_NAME - len("kt--") - len(digest)
    return f"kt-{slug[:room].rstrip('-')}-{digest}"


def default_paths(cfg: RunConfig, name: str) -> tuple[str, str]:
    """Dataset and output folders on the workspace volume when none are given."""
    root = PurePosixPath(cfg.kubernetes.workspace_mount)
    return str(root / "runs" / name / "dataset"), str(root / "runs" / name / "train")


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {
        "name": name,
        "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}},
    }


def container_env(cfg: RunConfig, recipe_text: str, task: TaskConfig = NO_TASK) -> list[dict]:
    k8s, mount = cfg.kubernetes, cfg.kubernetes.workspace_mount.rstrip("/")
    threads = max(1, _whole_cpus(k8s.cpu) // cfg.distributed.procs_per_node)
    env = [
        {"name": RECIPE_ENV, "value": recipe_text},
        {"name": "KUBETUNE_CACHE", "value": f"{mount}/cache/kubetune"},
        {"name": "HF_HOME", "value": f"{mount}/cache/huggingface"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "TRITON_CACHE_DIR", "value": "/tmp/triton"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        {"name": "OMP_NUM_THREADS", "value": str(threads)},
        {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
        # after SIGTERM torchrun gives the workers this long to save a checkpoint (its own
        # default, 30 s, would kill them mid-save): the pod's grace less a margin to exit
        {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(shutdown_seconds(cfg))},
    ]
    if not cfg.hardware.uses_gpu:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    if cfg.model.local_dir:  # the fetch step's copy on the workspace volume: no pod downloads
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        env.append(_secret_env(key, k8s.s3_secret, key))
    if k8s.hf_secret:
        env.append(_secret_env("HF_TOKEN", k8s.hf_secret, "HF_TOKEN"))
    return merge_env(env, task)


def termination_grace(cfg: RunConfig) -> int:
    """terminationGracePeriodSeconds of a training pod (planner/grace.py)."""
    from ..planner.grace import grace_seconds

    return grace_seconds(cfg)


def shutdown_seconds(cfg: RunConfig) -> int:
    grace = termination_grace(cfg)
    return max(1, grace - min(15, grace // 4))


def _whole_cpus(quantity: str) -> int:
    """Whole CPUs of a Kubernetes quantity ("8" → 8; "500m" and the like → 1)."""
    try:
        return int(float(quantity))
    except ValueError:
        return 1


def resources(cfg: RunConfig, task: TaskConfig = NO_TASK) -> dict:
    """Requests and limits of one training pod (one node): its CPUs, memory and GPUs, and
    what else the KFP task passes through."""
    k8s = cfg.kubernetes
    requests: dict[str, str | int] = {"cpu": k8s.cpu, "memory": k8s.memory}
    limits: dict[str, str | int] = {"memory": k8s.memory}
    if cfg.hardware.uses_gpu:
        requests[k8s.gpu_resource] = cfg.distributed.procs_per_node
        limits[k8s.gpu_resource] = cfg.distributed.procs_per_node
    return merge_resources({"requests": requests, "limits": limits}, task)


def worker_command(cfg: RunConfig, dataset: str, output: str) -> list[str]:
    """torchrun over the worker; nodes, ranks and rendezvous come from the PET_* variables
    that both the Training Operator and Kubeflow Trainer set in every pod."""
    k8s = cfg.kubernetes
    elastic = k8s.elastic_min_nodes is not None
    return [
        "python",
        "-m",
        "torch.distributed.run",
        *(["--max-restarts", str(k8s.elastic_max_restarts)] if elastic else []),
        *worker_args(f"env:{RECIPE_ENV}", dataset, output),
    ]


def pod_security_context(k8s) -> dict:
    """The "restricted" Pod Security Standard, as the image's non-root user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": k8s.run_as_user,
        "runAsGroup": k8s.run_as_user,
        "fsGroup": k8s.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def workspace_claim(k8s, task: TaskConfig = NO_TASK) -> str:
    """The workspace PVC: kubernetes.workspace_pvc, or with workspace=kfp the KFP run's own
    (the train task's volume at /kfp-workspace; workspace_pvc outside KFP, e.g. render-job)."""
    if k8s.workspace == "kfp":
        return task.workspace_claim(k8s.workspace_mount) or k8s.workspace_pvc
    return k8s.workspace_pvc


def storage(k8s, task: TaskConfig = NO_TASK) -> tuple[list[dict], list[dict]]:
    """(volume mounts, volumes) of a training pod: the workspace, /dev/shm, /tmp, and the KFP
    task's other volumes."""
    mounts = [
        {"name": "workspace", "mountPath": k8s.workspace_mount},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes = [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": workspace_claim(k8s, task)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    return extra_volumes(mounts, volumes, task)


def node_pool(k8s, task: TaskConfig = NO_TASK) -> dict:
    """nodeSelector and tolerations of the GPU node pool, where the recipe names them (and the
    KFP task's, beside them)."""
    pool: dict = {}
    if k8s.node_selector:
        pool["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        pool["tolerations"] = [dict(t) for t in k8s.tolerations]
    return merge_pool(pool, task)


def job_labels(k8s, name: str) -> dict[str, str]:
    """The job's labels: kubetune's, and Kueue's queue and workload priority."""
    out = labels(name)
    if k8s.queue:
        out[QUEUE_LABEL] = k8s.queue
    if k8s.workload_priority_class:
        out[PRIORITY_LABEL] = k8s.workload_priority_class
    return out


# an Istio sidecar never exits and would keep a finished pod Running
POD_ANNOTATIONS = {"sidecar.istio.io/inject": "false"}


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "kubetune",
    }


def check_local_dir_in_workspace(cfg: RunConfig) -> None:
    """The pods see the workspace volume only: a fetched copy must lie on it."""
    local = cfg.model.local_dir
    mount = PurePosixPath(cfg.kubernetes.workspace_mount)
    if local and not PurePosixPath(local).is_relative_to(mount):
        raise UserError(
            f"model.local_dir: {local} is not on the workspace volume "
            f"(kubernetes.workspace_mount {mount}), so the training pods cannot read it"
        )


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # every replica spells its template out
        return True


def _str(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(job: dict) -> str:
    return yaml.dump(job, Dumper=_Dumper, sort_keys=False, width=100)
