"""Kubeflow Trainer v2: the `TrainJob` (trainer.kubeflow.org/v1alpha1) that runs the training
worker, and the `ClusterTrainingRuntime` it refers to.

The runtime (`kubetune render-job --kind runtime`, shipped as
manifests/trainer-v2/clustertrainingruntime.yaml) holds what is the same for every run: the
torch-distributed ML policy, one replicated job `node` whose container `node` Trainer v2
configures, the "restricted" pod and container security contexts, no API token, no Istio sidecar,
and the failure policy (a failed pod fails its Job; the JobSet restarts every node, up to
`kubernetes.backoff_limit` times, and training resumes from its checkpoints).

The TrainJob holds what each run sets, the same values as the PyTorchJob's: the trainer image,
the very same torchrun command (Trainer v2 sets the same PET_* variables as the Training
Operator), the environment (the resolved recipe, secrets by reference), resources per node,
nodes and processes per node, and through one `runtimePatches` entry (manager `kubetune.io/launcher`) the
ServiceAccount, the workspace PVC, /dev/shm and /tmp volumes and mounts, the GPU node pool's
selector and tolerations, and the run's labels on the JobSet and its pods.

The API is Trainer v2.2's and later (v2.3.0 is current): v2.2 replaced the TrainJob's
`podSpecOverrides` and `spec.labels` with `runtimePatches` and moved `numProcPerNode` from the
runtime's `mlPolicy.torch` to the TrainJob's trainer. An API server of v2.2+ prunes or refuses
the old fields, so a v2.0/2.1-style job would run without its node selector, tolerations,
volumes and environment; kubetune renders only the new form. v2.4 limits ReplicatedJob names
to 20 characters: kubetune's is `node`.
"""

from __future__ import annotations

from ..config import RunConfig, dump_config
from ..errors import UserError
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

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainJob"
NODE = "node"  # the replicated job and container Trainer v2's torch plugin configures
ANCESTOR = "trainer.kubeflow.org/trainjob-ancestor-step"
# the owner of kubetune's runtimePatches entry: Trainer's webhook admits only a domain-prefixed
# path (kubeflow/trainer v2.3.0, pkg/runtime/framework/plugins/jobset/jobset.go)
MANAGER = "kubetune.io/launcher"


def render_trainjob(
    cfg: RunConfig,
    name: str,
    dataset: str | None = None,
    output: str | None = None,
    task: TaskConfig = NO_TASK,
) -> dict:
    """The TrainJob as a dict (apply it with the API, or print it as YAML). With
    kubernetes.queue it is created suspended, for Kueue to admit."""
    check_local_dir_in_workspace(cfg)
    k8s, dist = cfg.kubernetes, cfg.distributed
    if k8s.elastic_min_nodes is not None:
        raise UserError(
            "kubernetes.elastic_min_nodes: with distributed.backend=trainjob, elastic training "
            "is the runtime's mlPolicy.torch.elasticPolicy; name such a runtime in "
            "kubernetes.runtime and leave elastic_min_nodes unset"
        )
    if k8s.priority_class:
        raise UserError(
            "kubernetes.priority_class: a TrainJob cannot set its pods' priorityClassName "
            "(Trainer v2.3's runtimePatches have no such field). Use "
            "kubernetes.workload_priority_class (Kueue's priority of the job), or a runtime "
            "whose pods have it: `kubetune render-job RECIPE --kind runtime --set "
            "kubernetes.priority_class=NAME --set kubernetes.runtime=RUNTIME` renders one; point "
            "kubernetes.runtime at it and leave priority_class unset"
        )
    default_dataset, default_output = default_paths(cfg, name)
    dataset, output = dataset or default_dataset, output or default_output
    job: dict = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": k8s.namespace, "labels": job_labels(k8s, name)},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": k8s.runtime_kind, "name": k8s.runtime},
            "trainer": {
                "image": k8s.trainer_image,
                "command": worker_command(cfg, dataset, output),
                "env": container_env(cfg, dump_config(cfg), task),
                "numNodes": dist.nodes,
                "numProcPerNode": dist.procs_per_node,
                "resourcesPerNode": resources(cfg, task),
            },
            "runtimePatches": [runtime_patch(cfg, name, task)],
        },
    }
    if k8s.queue:
        job["spec"]["suspend"] = True  # Kueue's webhook would too; admission resumes it
    return job


def runtime_patch(cfg: RunConfig, name: str, task: TaskConfig = NO_TASK) -> dict:
    """kubetune's `runtimePatches` entry: the run's labels on the JobSet and its pods, and the
    pod pieces of the node job (ServiceAccount, volumes and mounts, node pool)."""
    k8s = cfg.kubernetes
    mounts, pod_volumes = storage(k8s, task)
    pod_spec = {
        "serviceAccountName": k8s.service_account,
        "containers": [{"name": NODE, "volumeMounts": mounts}],
        "volumes": pod_volumes,
        "terminationGracePeriodSeconds": termination_grace(cfg),  # a SIGTERM's checkpoint
        **node_pool(k8s, task),
    }
    node_job = {
        "name": NODE,
        "template": {
            "spec": {"template": {"metadata": {"labels": labels(name)}, "spec": pod_spec}}
        },
    }
    return {
        "manager": MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "metadata": {"labels": labels(name)},
                "spec": {"replicatedJobs": [node_job]},
            }
        },
    }


def render_runtime(cfg: RunConfig) -> dict:
    """The ClusterTrainingRuntime (or namespaced TrainingRuntime) the TrainJobs refer to."""
    k8s = cfg.kubernetes
    meta: dict = {
        "name": k8s.runtime,
        "labels": {
            "trainer.kubeflow.org/framework": "torch",
            "app.kubernetes.io/name": "kubetune",
            "app.kubernetes.io/component": "trainer",
            "app.kubernetes.io/managed-by": "kubetune",
        },
    }
    if k8s.runtime_kind == "TrainingRuntime":
        meta["namespace"] = k8s.namespace
    pod = {
        "metadata": {
            "labels": {
                "app.kubernetes.io/name": "kubetune",
                "app.kubernetes.io/component": "trainer",
            },
            "annotations": dict(POD_ANNOTATIONS),
        },
        "spec": {
            "serviceAccountName": k8s.service_account,
            "automountServiceAccountToken": False,  # training never calls the Kubernetes API
            "restartPolicy": "Never",  # a failed node fails the JobSet, which restarts them all
            **({"priorityClassName": k8s.priority_class} if k8s.priority_class else {}),
            "securityContext": pod_security_context(k8s),
            "containers": [
                {
                    "name": NODE,
                    "image": k8s.trainer_image,
                    "imagePullPolicy": k8s.image_pull_policy,
                    "securityContext": dict(CONTAINER_SECURITY),
                }
            ],
        },
    }
    return {
        "apiVersion": API_VERSION,
        "kind": k8s.runtime_kind,
        "metadata": meta,
        "spec": {
            # processes per node are the TrainJob's (trainer.numProcPerNode) since v2.2
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {
                "spec": {
                    "failurePolicy": {"maxRestarts": k8s.backoff_limit},
                    "ttlSecondsAfterFinished": k8s.ttl_seconds_after_finished,
                    "replicatedJobs": [
                        {
                            "name": NODE,
                            "template": {
                                "metadata": {"labels": {ANCESTOR: "trainer"}},
                                "spec": {
                                    "backoffLimit": 0,
                                    "activeDeadlineSeconds": k8s.active_deadline_seconds,
                                    "template": pod,
                                },
                            },
                        }
                    ],
                }
            },
        },
    }


def lead_pod_selector(name: str) -> str:
    """Node 0's pod (rank 0): JobSet's labels and the Indexed Job's completion index."""
    return (
        f"jobset.sigs.k8s.io/jobset-name={name},"
        f"jobset.sigs.k8s.io/replicatedjob-name={NODE},"
        "batch.kubernetes.io/job-completion-index=0"
    )
