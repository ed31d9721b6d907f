"""The recipe's sections for the model, data, method and training (model, data, quant, lora,
adapter, train, distributed, hardware, eval, output): each field documented once, validated on
load. config.py assembles them into RunConfig."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Section (every section's base) and the measuring sections live there; imported from here too
from .config_measure import (  # noqa: F401
    FlopCounterConfig,
    ProfileConfig,
    Section,
    SpikeGuardConfig,
)

# the distributed section lives there; imported from here too
from .config_parallel import DistributedConfig, FsdpConfig  # noqa: F401
from .objectives import NAMES as OBJECTIVES


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Hub id (tiiuae/falcon-7b), local folder, s3:// URI, or tiny://ARCH "
        "(falcon, falcon-40b, llama, mistral, qwen2) for a tiny model built locally."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    local_dir: str | None = Field(
        None,
        description="A fetched copy of the model (WORKSPACE/models/NAME@REVISION, written by "
        "`kubetune fetch-model` and the pipeline's fetch step): every step loads from it, with "
        "the hub off.",
    )
    commit: str | None = Field(
        None,
        description="The fetched copy's commit (hub) or listing digest (s3), set with local_dir.",
    )
    trust_remote_code: bool = Field(
        False, description="Run the model repo's own code. Off unless you trust it."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Weights dtype for training/merge; auto = bf16 where the hardware has it.",
    )
    attn_implementation: Literal[
        "auto", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "eager"
    ] = Field(
        "auto",
        description="auto = flash-attention 3 on Hopper when installed, else flash-attention "
        "2 when installed on CUDA (packed rows as varlen); else on CUDA flex_attention with "
        "a document mask for packed rows; else SDPA.",
    )


class DataConfig(Section):
    path: str = Field(
        description="JSON/JSONL/CSV/Parquet file or folder, saved HF dataset folder, "
        "s3:// URI, hub dataset id, or sample://NAME for data shipped with kubetune."
    )
    format: Literal["alpaca", "dolly", "samsum", "chat", "template", "preference"] = Field(
        description="alpaca: instruction/input/output; dolly: instruction/context/response; "
        "samsum: dialogue/summary; chat: messages[{role, content}]; template: data.template; "
        "preference: prompt/chosen/rejected pairs (text or chat messages), the Anthropic HH "
        "layout (chosen/rejected dialogues sharing a prompt) or UltraFeedback's message lists, "
        "for the preference objectives (train.objective dpo, ipo, simpo, orpo)."
    )
    template: str | None = Field(
        None, description="format=template: the prompt, with {field} names."
    )
    response_field: str = Field(
        "response", description="format=template: the field holding the answer."
    )
    split: str = Field(
        "train", description="Split to read from a hub dataset or a saved DatasetDict."
    )
    max_seq_len: int = Field(
        512,
        gt=0,
        description="Tokens per training row (prompt + response + EOS). data.format=preference: "
        "tokens per sequence (prompt + chosen or rejected answer + EOS); a row holds a pair, "
        "or packed pairs, in up to 2 x max_seq_len tokens.",
    )
    max_prompt_len: int | None = Field(
        None,
        gt=0,
        description="data.format=preference: a longer prompt keeps its last max_prompt_len "
        "tokens (the turn the answers reply to; a BOS the tokenizer adds stays); then an answer "
        "that still does not fit max_seq_len loses its tail. Default: max_seq_len / 2.",
        # left out of a dumped recipe while unset: recipes and compiled pipelines from before
        # preference data read the same
        exclude_if=lambda value: value is None,
    )
    overlength: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Rows longer than max_seq_len: truncate keeps the first max_seq_len "
        "tokens (the response's tail and EOS are cut; rows left with no response token are "
        "dropped); drop removes them. Both are counted in stats.json.",
    )
    packing: bool = Field(
        False,
        description="Pack examples into max_seq_len rows (best-fit "
        "decreasing); position ids restart at each example.",
    )
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of rows held out for eval."
    )
    seed: int = Field(42, description="Seed of the train/eval split.")
    on_bad_row: Literal["error", "drop"] = Field(
        "error",
        description="A row with a missing/null/ill-typed field: stop with an error naming "
        "the row, or drop it and count it in stats.json.",
    )
    max_rows: int | None = Field(
        None, gt=0, description="Read at most this many rows (smoke tests)."
    )
    num_proc: int | None = Field(
        None,
        gt=0,
        description="Processes that render and tokenize records (default: the CPUs this "
        "process may use, a pod's CPU limit included). The output is the same for any value.",
    )


class QuantConfig(Section):
    bits: Literal[4, 8] = Field(4, description="qlora: 4-bit NF4 or 8-bit (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Matmul dtype of 4-bit layers."
    )


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        "auto",
        description="auto: the architecture's attention and MLP projections; all-linear; "
        "or a list of module names.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")


class AdapterConfig(Section):
    """method=adapter / adapter_v2: LLaMA-Adapter's learned prompts (see methods/llama_adapter.py)."""

    prompt_length: int = Field(10, gt=0, description="Learned prompt vectors per adapted layer.")
    start_layer: int = Field(
        2, ge=0, description="The first decoder layer (0-based) that gets a prompt and a gate."
    )


class TrainConfig(Section):
    max_steps: int | None = Field(
        None, gt=0, description="Optimizer steps; overrides epochs when set."
    )
    epochs: float = Field(
        1.0, gt=0, description="Passes over the train split (when max_steps is unset)."
    )
    micro_batch_size: int | Literal["auto"] = Field(
        1,
        description="Rows per process per forward pass; auto: the largest micro batch that "
        "`kubetune plan` says fits the GPU (hardware.gpu, else the device's own memory), "
        "grad_accum then derived from train.global_batch_size when it is set. The choice is "
        "recorded in metrics.json (`micro_batch`).",
    )
    grad_accum: int = Field(1, gt=0, description="Micro batches per optimizer step.")
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="Rows per optimizer step over all processes. With micro_batch_size auto, "
        "grad_accum = global_batch_size / (micro batch x processes); with a fixed micro batch "
        "it must equal micro_batch_size x grad_accum x processes.",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in backward. auto: off when the plan says the run "
        "fits the GPU's memory with a 10% margin, else only as many decoder layers as needed "
        "to fit (recorded in metrics.json with the reason); true: every layer; false: none.",
    )
    save_steps: int = Field(100, gt=0, description="Checkpoint every N optimizer steps.")
    eval_steps: int | None = Field(
        None, gt=0, description="Eval loss every N steps (None: at the end)."
    )
    logging_steps: int = Field(10, gt=0, description="Log loss every N steps.")
    seed: int = Field(42, description="Seed of init, dropout and data order.")
    keep_checkpoints: int = Field(
        2,
        gt=0,
        description="Complete checkpoints kept (the newest N); a resume falls back to an older "
        "one when the newest fails its checksums, so keep at least 2.",
    )
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A NaN or inf loss or gradient norm on any rank (all ranks agree): stop "
        "ends the run with one line (the step, the value, the batch's rows) and keeps the last "
        "good checkpoint; skip drops that optimizer step, up to train.max_skipped_steps.",
    )
    max_skipped_steps: int = Field(
        10,
        ge=0,
        description="nonfinite: skip (and spike_guard rollbacks): steps a run may skip before it "
        "stops as under nonfinite: stop.",
    )
    spike_guard: SpikeGuardConfig | None = Field(
        None,
        description="Loss spikes: a step's loss more than `z` standard deviations above the "
        "mean of the `window` steps before it is logged, and with action: rollback the run "
        "goes back to its last checkpoint and skips that step's batch.",
    )

    @field_validator("micro_batch_size", mode="before")
    @classmethod
    def _micro_batch(cls, value: Any) -> Any:
        if value == "auto":
            return value
        whole = not isinstance(value, bool) and isinstance(value, int | str)
        if not (whole and str(value).strip().isdigit() and int(value) > 0):
            raise ValueError(f"train.micro_batch_size must be > 0 or auto, got {value!r}")
        return int(value)

    @field_validator("gradient_checkpointing", "compile", mode="before")
    @classmethod
    def _switch(cls, value: Any, info: ValidationInfo) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"train.{info.field_name} must be true, false or auto, got {value!r}")

    kernels: Literal["auto", "liger", "none"] = Field(
        "auto",
        description="auto: Liger-Kernel's RMSNorm/RoPE/SwiGLU/fused linear cross-entropy where "
        "installed on CUDA for Llama/Mistral/Qwen2, else kubetune's chunked linear + "
        "cross-entropy (never the full logits); liger: Liger or an error; none: "
        "transformers' own forward.",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile each decoder layer. auto: on CUDA with ddp or fsdp and "
        "static batch shapes (packed rows); a layer that fails to compile runs eagerly with "
        "one log line. true: everywhere (CPU too); false: never.",
    )
    freeze_layers: int = Field(
        0,
        ge=0,
        description="method=full: freeze the input embeddings and the first N decoder layers, "
        "and train the rest (llama-recipes' num_freeze_layers).",
    )
    flop_counter: FlopCounterConfig | None = Field(
        None,
        description="Count one step's FLOPs with torch.utils.flop_counter; metrics.json gets "
        "measured FLOPs per token, TFLOP/s and MFU beside the analytic estimate.",
    )
    profile: ProfileConfig | None = Field(
        None,
        description="PyTorch profiler traces (wait/warmup/active steps) into OUTPUT/tensorboard/ "
        "(TensorBoard's profiler plugin, or chrome://tracing).",
    )
    reference: Literal["auto", "live", "precomputed"] = Field(
        "auto",
        description="dpo, ipo: the reference model's log-probabilities. live: each step runs "
        "the reference forward (lora/qlora/adapters: the base with the adapters disabled, no "
        "second copy; full: a frozen copy sharded like the policy); precomputed: one pass "
        "over the data before training, stored in the output (reference/) and read from "
        "there on resume. auto: live for adapters, precomputed for method=full.",
        # left out of a dumped recipe while auto: recipes from before preference objectives read
        # the same
        exclude_if=lambda value: value == "auto",
    )
    objective: Literal[OBJECTIVES] = Field(  # type: ignore[valid-type]  # components/objectives/
        "sft",
        description="What the loss is: sft, the next-token cross-entropy over the completion; "
        "dpo, ipo (against a reference model), simpo, orpo (reference-free) on preference "
        "pairs (data.format=preference; their parameters in `preference`).",
        # left out of a dumped recipe while it is the default: recipes and compiled pipelines
        # from before objectives read the same
        exclude_if=lambda value: value == "sft",
    )


class HardwareConfig(Section):
    gpu: str = Field(
        "none",
        description="GPU the plan is checked against (A100-80GB, H100-80GB, A10G-24GB, none).",
    )
    gpu_memory_gb: float | None = Field(None, gt=0, description="Override the GPU memory of `gpu`.")
    price_per_gpu_hour: float | dict[str, float] | None = Field(
        None,
        description="What one GPU costs per hour, for `kubetune plan`'s cost column: one price, "
        "or one per GPU type ({A100-80GB: 1.8, H100-80GB: 3.2}).",
    )

    @property
    def uses_gpu(self) -> bool:
        """Pods ask for GPUs (hardware.gpu is not none)."""
        return self.gpu.lower() != "none"

    @field_validator("price_per_gpu_hour")
    @classmethod
    def _prices(cls, value: Any) -> Any:
        from .planner.gpus import GPU_TYPES, named

        prices = value if isinstance(value, dict) else {}
        unknown = sorted(k for k in prices if len(named(k)) != 1)
        if unknown:
            raise ValueError(f"unknown GPU type {unknown[0]!r}; known: {', '.join(GPU_TYPES)}")
        for price in prices.values() if isinstance(value, dict) else [value]:
            if price is not None and price <= 0:
                raise ValueError(f"a price per GPU-hour is more than 0, got {price}")
        return value


class EvalConfig(Section):
    num_prompts: int = Field(32, gt=0, description="Held-out prompts to generate answers for.")
    max_new_tokens: int = Field(64, gt=0, description="Tokens generated per prompt.")
    batch_size: int = Field(8, gt=0, description="Prompts per generate() call.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (do_sample only).")
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="What generates the answers: hf (transformers' generate, CPU or GPU) or "
        "vllm (vLLM on the GPU nodes, in kubernetes.eval_image; far faster for many prompts).",
    )
    min_rouge_l: float | None = Field(None, ge=0, le=1, description="Push only if ROUGE-L >= this.")
    max_eval_loss: float | None = Field(None, gt=0, description="Push only if eval loss <= this.")
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks scored on base and tuned: registered task or "
        "group names (their datasets come from the hub), or paths to task YAML files (their "
        "data files relative to the YAML; these work offline).",
    )
    lm_eval_limit: int | None = Field(
        None, gt=0, description="Score at most this many documents per lm-eval task (all: unset)."
    )
    lm_eval_num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per lm-eval prompt (unset: the task's own)."
    )
    max_regression: float | None = Field(
        None,
        ge=0,
        description="Push only if no lm-eval task's score falls below the base model's by more "
        "than this, on the metric's own scale (0.02: two accuracy points).",
    )

    @field_validator("lm_eval_tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        for i, task in enumerate(value):
            if not task.strip():
                raise ValueError(f"eval.lm_eval_tasks[{i}] is empty")
        if len(set(value)) != len(value):
            raise ValueError("eval.lm_eval_tasks lists a task twice")
        return value

    @model_validator(mode="after")
    def _regression_needs_tasks(self) -> EvalConfig:
        if self.max_regression is not None and not self.lm_eval_tasks:
            raise ValueError("eval.max_regression needs eval.lm_eval_tasks (the tasks it guards)")
        return self


class RegistryConfig(Section):
    """Kubeflow Model Registry: the push step registers the pushed model there."""

    server: str = Field(
        description="The registry's REST address, http(s)://HOST[:PORT] (in-cluster e.g. "
        "https://model-registry-service.kubeflow.svc.cluster.local:8443)."
    )
    model_name: str = Field(description="The registered model; each run adds a version.")
    author: str = Field(description="Author (and owner) recorded on the model and its versions.")

    @field_validator("server")
    @classmethod
    def _server(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+$", value.rstrip("/")):
            raise ValueError(
                f"output.model_registry.server must be http(s)://HOST[:PORT], got {value!r}"
            )
        return value.rstrip("/")

    @field_validator("model_name", "author")
    @classmethod
    def _not_blank(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise ValueError(f"output.model_registry.{info.field_name} must not be empty")
        return value


class OutputConfig(Section):
    uri: str = Field(
        "./kubetune-output",
        description="Where the finished model is pushed: s3://bucket/prefix or a folder.",
    )
    model_registry: RegistryConfig | None = Field(
        None,
        description="Register the pushed model (a version per run, its S3 artifact, metrics and "
        "gate verdict) in Kubeflow Model Registry.",
    )
    sse: Literal["AES256", "aws:kms"] | None = Field(
        None,
        description="Server-side encryption asked for on every object the push writes (each "
        "file, multipart uploads included, the manifest): AES256 (SSE-S3) or aws:kms (SSE-KMS). "
        "None: the bucket's default.",
    )
    sse_kms_key_id: str | None = Field(
        None,
        description="With sse: aws:kms, the KMS key (id, ARN or alias); none: the account's "
        "aws/s3 key.",
    )

    @model_validator(mode="after")
    def _kms_key_needs_kms(self) -> OutputConfig:
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ValueError("output.sse_kms_key_id is only used with output.sse: aws:kms")
        return self
