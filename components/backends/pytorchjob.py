"""The Kubeflow Training Operator `PyTorchJob` (kubeflow.org/v1) that runs the training worker.

One Master and `distributed.nodes - 1` Workers (or, with `kubernetes.elastic_min_nodes`, an
elastic group of Workers), `nprocPerNode` processes per pod. Every pod runs the same command as
the local backend, `torchrun -m kubetune.components.train.worker ...`: torchrun takes nodes,
node rank, processes per node and the rendezvous from the PET_* variables the Operator sets. The
resolved recipe travels in the job itself (an environment variable), datasets, model cache and
outputs on the workspace PVC, credentials only as `secretKeyRef`s. Pods meet the "restricted"
Pod Security Standard.
"""

from __future__ import annotations

from ..config import RunConfig, dump_config
from .pod import (
    CONTAINER_SECURITY,
    NO_TASK,
    POD_ANNOTATIONS,
    check_local_dir_in_workspace,
    container_env,
    default_paths,
    job_labels,
    labels,
    node_pool,
    pod_security_context,
    resources,
    storage,
    termination_grace,
    worker_command,
)
from .taskconfig import TaskConfig

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
CONTAINER = "pytorch"  # the Training Operator finds the training container by this name


def pod_template(
    cfg: RunConfig, recipe_text: str, dataset: str, output: str, name: str, task: TaskConfig
) -> dict:
    k8s = cfg.kubernetes
    mounts, pod_volumes = storage(k8s, task)
    spec = {
        "serviceAccountName": k8s.service_account,
        "automountServiceAccountToken": False,  # training never calls the Kubernetes API
        "securityContext": pod_security_context(k8s),
        "containers": [
            {
                "name": CONTAINER,
                "image": k8s.trainer_image,
                "imagePullPolicy": k8s.image_pull_policy,
                "command": worker_command(cfg, dataset, output),
                "env": container_env(cfg, recipe_text, task),
                "resources": resources(cfg, task),
                "securityContext": dict(CONTAINER_SECURITY),
                "volumeMounts": mounts,
            }
        ],
        "volumes": pod_volumes,
        "terminationGracePeriodSeconds": termination_grace(cfg),  # a SIGTERM's checkpoint
        **node_pool(k8s, task),
    }
    if k8s.priority_class:
        spec["priorityClassName"] = k8s.priority_class
    return {
        "metadata": {"labels": labels(name), "annotations": dict(POD_ANNOTATIONS)},
        "spec": spec,
    }


def render_job(
    cfg: RunConfig,
    name: str,
    dataset: str | None = None,
    output: str | None = None,
    task: TaskConfig = NO_TASK,
) -> dict:
    """The PyTorchJob as a dict (apply it with the API, or print it as YAML). With
    kubernetes.queue it is created suspended, for Kueue to admit."""
    check_local_dir_in_workspace(cfg)
    k8s, dist = cfg.kubernetes, cfg.distributed
    default_dataset, default_output = default_paths(cfg, name)
    recipe_text = dump_config(cfg)
    template = pod_template(
        cfg, recipe_text, dataset or default_dataset, output or default_output, name, task
    )

    def replica(count: int) -> dict:
        # OnFailure, not ExitCode: ExitCode would fail the job at once on exit codes 1-127, a
        # worker's traceback from a transient NCCL or network fault and a watchdog's timeout
        # (exit 2) among them; a preempted worker (143) restarts under both and resumes
        return {"replicas": count, "restartPolicy": "OnFailure", "template": template}

    spec: dict = {"nprocPerNode": str(dist.procs_per_node)}
    if k8s.elastic_min_nodes is not None:
        spec["elasticPolicy"] = {
            "rdzvBackend": "c10d",
            "minReplicas": k8s.elastic_min_nodes,
            "maxReplicas": dist.nodes,
            "maxRestarts": k8s.elastic_max_restarts,
        }
        spec["pytorchReplicaSpecs"] = {"Worker": replica(dist.nodes)}
    else:
        spec["pytorchReplicaSpecs"] = {"Master": replica(1)}
        if dist.nodes > 1:
            spec["pytorchReplicaSpecs"]["Worker"] = replica(dist.nodes - 1)
    spec["runPolicy"] = {
        "cleanPodPolicy": k8s.clean_pod_policy,
        "backoffLimit": k8s.backoff_limit,
        "activeDeadlineSeconds": k8s.active_deadline_seconds,
        "ttlSecondsAfterFinished": k8s.ttl_seconds_after_finished,
    }
    if k8s.queue:
        spec["runPolicy"]["suspend"] = True  # Kueue's webhook would too; admission resumes it
    if k8s.priority_class:  # where Kueue reads a Kubeflow job's priority first
        spec["runPolicy"]["schedulingPolicy"] = {"priorityClass": k8s.priority_class}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": k8s.namespace, "labels": job_labels(k8s, name)},
        "spec": spec,
    }


def lead_replica(job: dict) -> str:
    """The replica type whose pod 0 carries the logs worth streaming (rank 0)."""
    return "master" if "Master" in job["spec"]["pytorchReplicaSpecs"] else "worker"
