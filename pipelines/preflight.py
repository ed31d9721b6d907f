"""What a run on a cluster would refuse only when it reaches the step, refused before any work
by every command that places work there (compile, compare, submit, render-job, render-serve,
deploy), as `plan` refuses what it cannot plan: a setting that can only fail at the end of a
run fails when the pipeline is compiled.

- the GPU type the plan, the pods and the served replica are sized for is a known one;
- train.kernels=liger has kernels for the model's architecture;
- the training job (PyTorchJob or TrainJob) renders, with the admission rules render-job has,
  and a Kueue queue is named only where Kueue queues the training (those two backends);
- evaluation with vLLM has GPUs;
- with serve.enabled, the deploy step's InferenceService renders (a URI KServe reads, GPUs for
  vLLM, a replica that holds the model) from output.uri.
"""

from __future__ import annotations

from kubetune.components.config import RunConfig
from kubetune.components.errors import UserError


def check_gpu_type(cfg: RunConfig) -> None:
    from kubetune.components.planner.plan import gpu_memory_bytes

    gpu_memory_bytes(cfg)


def known_architecture(cfg: RunConfig):
    """The model's counted architecture, or None where this machine cannot read its config (a
    hub model offline, a model.local_dir that is a path inside the pods)."""
    from kubetune.components.planner.architecture import architecture

    try:
        return architecture(cfg)
    except UserError:
        return None


def check_kernels(cfg: RunConfig, arch) -> None:
    """train.kernels as the worker will choose them on the run's device (the trainer image has
    liger-kernel). Only `liger` can be refused (auto and none choose what runs), so the other
    settings cost no import of torch here."""
    if cfg.train.kernels != "liger":
        return
    import torch

    from kubetune.components.planner.kernel_choice import select_kernels

    device = torch.device("cuda" if cfg.hardware.uses_gpu else "cpu")
    select_kernels(cfg, device, arch.model_type, cfg.data.packing, liger_available=True)


def check_training_job(cfg: RunConfig) -> None:
    """The PyTorchJob or TrainJob the train step creates, rendered as render-job renders it."""
    from kubetune.components.backends.pod import default_paths
    from kubetune.components.backends.pytorchjob import render_job
    from kubetune.components.backends.trainjob import render_trainjob

    backend = cfg.distributed.backend
    if backend not in ("pytorchjob", "trainjob"):
        if cfg.kubernetes.queue:
            raise UserError(
                f"kubernetes.queue={cfg.kubernetes.queue}: Kueue queues the training job, and "
                f"with distributed.backend={backend} training runs inside the pipeline's own pod; "
                "set distributed.backend=pytorchjob or trainjob"
            )
        return
    dataset, output = default_paths(cfg, "preflight")
    render = render_trainjob if backend == "trainjob" else render_job
    render(cfg, "preflight", dataset, output)


def check_evaluation(cfg: RunConfig) -> None:
    if cfg.eval.engine == "vllm" and not cfg.hardware.uses_gpu:
        raise UserError(
            "eval.engine=vllm generates on the GPU nodes: set hardware.gpu (and the node pool), "
            "or use eval.engine=hf"
        )


def check_serving(cfg: RunConfig, uri: str, name: str | None = None, where: str = "--uri"):
    """The InferenceService of the model at `uri`, rendered (render_inference_service holds
    KServe's rules); returned for the caller that prints or applies it."""
    from kubetune.components.serve.render import render_inference_service

    return render_inference_service(cfg, uri, name, where=where)


def preflight(cfg: RunConfig, *, cluster: bool = True) -> None:
    """Every check above that applies to the recipe. `cluster`: the pipeline runs on a cluster
    (compile, compare, submit), so the training job and the deploy step are checked too."""
    check_gpu_type(cfg)
    if cfg.train.kernels == "liger" and (arch := known_architecture(cfg)) is not None:
        check_kernels(cfg, arch)
    if not cluster:
        return
    check_evaluation(cfg)
    check_training_job(cfg)
    if cfg.serve.enabled:
        check_serving(cfg, cfg.output.uri, where="output.uri (serve.enabled)")
