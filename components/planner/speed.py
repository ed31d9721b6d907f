"""`kubetune plan`'s speed model: the time of one optimizer step on a GPU type, from the work the
step does and a few efficiencies calibrated on measured runs.

Work per micro batch and GPU, counted from the model's architecture (`architecture.py`: exact
parameter counts of the real config) and the run's settings; T = micro batch x row length:

- matmul FLOPs (as `torch.utils.flop_counter` counts them): forward 2T per weight of every
  linear layer, the output head and the LoRA A/B matrices; backward 2T per weight for the input
  gradients (every layer above the lowest trained one) and 2T per *trained* weight for the
  weight gradients; recomputation: the forward of the checkpointed layers again;
- attention FLOPs: 4 x T x span x hidden per layer forward (QK^T and PV), twice that backward,
  the forward again when recomputed; span is the row for unpacked rows, the mean example for
  packed rows (a document mask). Causal kernels skip the masked half (CAUSAL) in the time;
- memory traffic (bytes through HBM): 4-bit/8-bit dequantization (the packed weight read, the
  bf16 weight written) in the forward, the backward and each recomputation; activations written
  and read by the elementwise kernels (the memory plan's saved bytes per token and layer, x4:
  written and read forward, their gradients backward); LoRA's B output and dropout copy;
  the logits (20 bytes each with transformers' loss, 12 chunked); the weights each GEMM reads;
- host ops: the ops Python and autograd dispatch per layer (LAYER_OPS and LORA_OPS below: each
  a kernel launch and its bookkeeping), forward, backward and recomputation;
- per optimizer step: AdamW's traffic over the (sharded) trainable state, the gradient
  all-reduce (DDP), the weights' all-gathers and the gradients' reduce-scatter (FSDP, ZeRO-3)
  over the node's link (NVLink/PCIe) or, across nodes, its network; what overlaps the backward
  is hidden, the rest is added.

Time: GPU time = matmul / (MAMF x e_matmul) (MAMF: the measured best matmul, gpus.py) +
bytes / (HBM x e_memory), the weights' bytes only beyond the matmuls' time (a GEMM streams its
weight while it computes: a roofline, which short rows meet at the weights); attention that
computes every score of a dense mask (eager attention; SDPA given the block-diagonal mask of
packed rows: no kernel skips a masked block) at e_dense of MAMF, causal and block-sparse kernels
(flash, flex) at e_matmul on half the scores; eager (uncompiled) layers' activation bytes times
eager_traffic (each elementwise op writes and reads its output), a compiled layer's (fused) at
e_compiled of HBM; bitsandbytes' 4-bit dequantization at e_dequant of HBM; LLM.int8's forward
matmuls at e_int8 of 2x MAMF, float32 matmuls (LLM.int8's backward under peft's fp32 upcast) at
e_matmul of the FP32 peak; host time = ops x op_seconds (transformers' layers' ops, or the
stack's: stacks.py) and what the stack does beside them; a micro batch takes the power mean
(GPU^p + host^p)^(1/p) of the two (the GPU runs behind the host asynchronously: p = 1 adds
them, a large p is the slower; a stack whose host waits for the GPU inside every layer adds
them). The nine efficiencies (`efficiency.py`) are fitted by `benchmarks/fit_speed_model.py`
on docs/benchmarks/speed-calibration.json's points and the GPU case lines of the raw benchmark
outputs there (`calibration.py`) and stored in speed_calibration.json beside this file; e_comm
and the startup figures are assumed, below.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..methods import named
from ..methods.lora import quantized_bytes
from . import stacks
from .efficiency import Efficiency
from .gpus import GpuType
from .plan import saved_bytes_per_token_layer

CAUSAL = 0.5  # causal attention kernels compute half the score matrix
# Ops dispatched per decoder layer (forward, backward), counted on the tiny models in eager
# mode with SDPA (transformers 5.17); per adapted linear layer for peft's LoRA forward and for
# kubetune's fused one
LAYER_OPS = {"llama": (77, 142), "falcon": (80, 103)}
# transformers' eager experts loop, per routed expert that gets tokens (forward, backward):
# index, gate_up, chunk, act, mul, down, weight, index_add and their views (counted on
# tiny://qwen3-moe; a test recounts them), which a 4-bit base runs over its bitsandbytes experts
# (train/experts4bit.py; QUANT_OPS per expert layer); a bf16 one runs transformers' grouped_mm.
EXPERT_OPS = (23, 32)
LORA_OPS = {"peft": (14, 15), "fused": (12, 20)}
# kubetune's LLaMA-Adapter modules (methods/llama_adapter.py) per adapted layer, over the
# trained layer's ops as LORA_OPS (the base is frozen: its backward computes no weight gradients)
ADAPTER_OPS: dict[str, stacks.Ops] = {
    "llama": {"adapter": (41, 4), "adapter_v2": (59, 84)},
    "falcon": {"adapter": (40, 27), "adapter_v2": (50, 69)},
}
PROMPT_OPS = {**stacks.STACK_ADAPTER_OPS, "transformers": ADAPTER_OPS}  # per stack
QUANT_OPS = (3, 4)  # assumed: bitsandbytes' dequantization of absmax and weight, a transpose
# bitsandbytes' LLM.int8 (MatMul8bitLt, threshold 6) per linear layer, assumed from its code:
# forward: the activations' row/column quantization and outlier search, the outlier columns
# (unique, gather, zeroing) and their fp16 matmul, the col32 layout transform, the int8 GEMM
# and its dequantization, the add; backward: the int8 weight copied to 16 bits and scaled,
# then a 16-bit matmul
QUANT8_OPS = (14, 6)
# bytes per token and in+out feature of an 8-bit layer's forward: the input read and written
# as int8 row- and column-major (2 + 2), its col32 transform (1 + 1), the int32 GEMM output
# written and read (4 + 4), the 16-bit output (2): 16 over in + out, 8 per feature
INT8_FEATURE_BYTES = 8
# backward: the int8 weight read, copied to the input's dtype (16 or 32 bits), scaled in place
INT8_WEIGHT_BYTES = {2: 7, 4: 13}
LIGER_SAVES = 27  # assumed: the eager RMSNorm x2, rotary and SiLU x mul ops Liger replaces
COMPILED_OPS = 1.5  # assumed: launches per matmul of a compiled layer, with its fused neighbours
LOGIT_BYTES = {"transformers": 20, "chunked": 12}
ADAMW_BYTES = {4: 28, 2: 14}  # per trained param and step: read p, g, m, v; write p, m, v
OPTIMIZER_OPS = 25  # clip_grad_norm + foreach AdamW + zero_grad, per step
HEAD_OPS = 70  # embedding, mask, final norm, head and loss, forward and backward (counted)
# Assumptions (not fitted: no calibration point has the traffic to fit them):
COMM_EFFICIENCY = 0.7  # share of the link's bandwidth a ring collective reaches
PCIE_BYTES_S = 25e9  # host <-> GPU, for CPU offload
CPU_ADAM_PARAMS_S = 1e9  # DeepSpeed's CPU Adam, params per second per process
LOAD_BYTES_S = 1e9  # reading the base model's weights from the workspace volume
COMPILE_SECONDS = 60.0  # torch.compile of the decoder layers and flex_attention, once
SAVE_BYTES_S = 1e9  # writing a checkpoint


@dataclass(frozen=True)
class Setup:
    """A training step as the speed model sees it: everything that changes its work."""

    micro_batch: int
    row_len: int  # tokens of one row as computed (padding included)
    span: int  # tokens attention spans per token: the row, or the example in a packed row
    grad_accum: int
    gpus: int
    procs_per_node: int
    method: str  # lora, qlora, full, llama_adapter, adapter_v2
    quant_bits: int  # 4 or 8 with qlora, else 0
    checkpointed: int  # decoder layers recomputed in backward
    strategy: str = "ddp"  # ddp, fsdp, deepspeed
    zero_stage: int = 0
    sharding: str = "full_shard"  # fsdp
    offload: str = "none"  # deepspeed: optimizer, optimizer+params; fsdp: cpu
    fused_norms: bool = False  # Liger's RMSNorm, RoPE, SwiGLU
    loss: str = "transformers"  # transformers or chunked (Liger's or kubetune's)
    compiled: bool = False
    lora: str = "fused"  # fused (kubetune) or peft
    lora_dropout: bool = True  # LoRA's dropout runs (p > 0): a copy of each adapted input
    # attention computes every score of the row (`span`): eager attention, or SDPA with a dense
    # block-diagonal mask for packed rows; else a causal or block-sparse kernel (half the scores)
    dense_attention: bool = False
    weight_bytes: int = 2  # of the unquantized weights (bf16)
    # dpo/ipo with a live reference: a forward without gradients before each micro batch's
    reference_forward: bool = False
    # the training code around the model: kubetune's worker and transformers' Trainer run
    # transformers' modules; litgpt (0.5), lit-gpt (2023) and torchtune their own (stacks.py)
    stack: str = "transformers"
    # transformers' Trainer after peft's prepare_model_for_kbit_training: unquantized weights
    # and the residual stream in fp32 under 16-bit autocast
    upcast: bool = False

    @property
    def bitsandbytes_4bit(self) -> bool:
        """Its 4-bit layers are bitsandbytes' (torchtune's NF4 is torchao's, compiled)."""
        return self.quant_bits == 4 and self.stack != "torchtune"

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.row_len

    @property
    def nodes(self) -> int:
        return max(1, math.ceil(self.gpus / self.procs_per_node))


@dataclass
class Work:
    """Per micro batch on one GPU (flops, bytes, ops) and per optimizer step (step_*)."""

    flops: dict[str, float] = field(default_factory=dict)  # matmul, as flop_counter counts
    attention_flops: float = 0.0  # dense count (flop_counter's), not halved for causal
    int8_flops: float = 0.0  # 8-bit layers' forward matmuls (LLM.int8), not in `flops`
    fp32_flops: float = 0.0  # float32 matmuls on the CUDA cores, not in `flops`
    bytes: dict[str, float] = field(default_factory=dict)
    ops: float = 0.0
    step_bytes: float = 0.0  # optimizer
    step_ops: float = float(OPTIMIZER_OPS)
    comm: dict[str, float] = field(default_factory=dict)  # bytes each GPU sends, per step
    comm_per_micro: dict[str, float] = field(default_factory=dict)
    offload_seconds: float = 0.0  # per step
    host_seconds: float = 0.0  # per micro batch, beside the ops (lit-gpt's LoRA index lists)
    synchronous: bool = False  # the host waits for the GPU inside every layer: their times add

    @property
    def matmul_flops(self) -> float:
        return sum(self.flops.values())

    @property
    def counted_flops(self) -> float:
        """What torch.utils.flop_counter counts for the micro batch: matmuls and attention."""
        return self.matmul_flops + self.int8_flops + self.fp32_flops + self.attention_flops


def layer_ops(arch, setup: Setup) -> tuple[float, float]:
    """Ops one decoder layer dispatches in its forward and its backward (aten ops, views
    included: each costs the host its dispatch). Counted with a TorchDispatchMode on the tiny
    models (a test recounts them): LAYER_OPS per architecture, LORA_OPS per adapted linear
    layer, ADAPTER_OPS per LLaMA-Adapter layer. Assumed, not countable on a CPU:
    bitsandbytes' dequantization (QUANT_OPS per linear layer), Liger's fused RMSNorm/RoPE/
    SwiGLU (LIGER_SAVES), compiled layers (their Triton kernels launch without dispatch:
    COMPILED_OPS per matmul plus a few per layer)."""
    linears = arch.linear_modules / arch.layers
    adapted = arch.adapted_modules / arch.layers
    family = "falcon" if arch.model_type == "falcon" else "llama"
    stack_lora = stacks.STACK_LORA_OPS.get(setup.stack, {}).get(family)
    lora_f, lora_b = stack_lora or LORA_OPS["fused" if setup.lora == "fused" else "peft"]
    quant_f, quant_b = {0: (0, 0), 4: QUANT_OPS, 8: QUANT8_OPS}[setup.quant_bits]
    if setup.compiled:
        matmuls = linears * (1 + quant_f / 2) + adapted * 2
        return COMPILED_OPS * matmuls + 10, 2 * (COMPILED_OPS * matmuls + 10)
    # transformers' LORA_OPS count over the trained layer's ops, other stacks' over the frozen one's
    tables = stacks.STACK_OPS if named(setup.method).trains_base else stacks.STACK_FROZEN_OPS
    base_f, base_b = tables.get(setup.stack, LAYER_OPS)[family]
    if setup.fused_norms and arch.model_type != "falcon":
        base_f, base_b = base_f - LIGER_SAVES, base_b - LIGER_SAVES
    # the routing cost of a 4-bit base: every expert that gets tokens is its own MLP call
    experts = arch.experts * arch.moe_layers / arch.layers if setup.quant_bits else 0
    expert_f = experts * (EXPERT_OPS[0] + 2 * quant_f)
    expert_b = experts * (EXPERT_OPS[1] + 2 * quant_b)
    # LLaMA-Adapter modules, in the layers from its start layer up (the only ones whose
    # backward runs for v1: work() takes the backward's share of the layers)
    prompts = PROMPT_OPS.get(setup.stack, {}).get(family, {})
    prompt_f, prompt_b = prompts.get(setup.method, (0, 0))
    prompt_f *= arch.trained_share
    return (
        base_f + adapted * lora_f + linears * quant_f + expert_f + prompt_f,
        base_b + adapted * lora_b + linears * quant_b + expert_b + prompt_b,
    )


def work(arch, setup: Setup) -> Work:
    T = setup.tokens
    L = arch.layers
    recompute = setup.checkpointed / L
    head = arch.hidden * arch.vocab
    # what one token multiplies (a MoE model: its top-k experts of every layer)
    linear = arch.linear_params if arch.matmul_params is None else arch.matmul_params
    method = named(setup.method)
    adapter = (
        arch.adapter_params if arch.adapter_matmul_params is None else arch.adapter_matmul_params
    )
    adapter = adapter if method.lora_matmuls else 0
    full = method.trains_base
    w = Work()
    w.flops["forward"] = 2 * T * (linear + head + adapter)
    below = arch.trained_share  # input gradients (and the backward) stop at the lowest trained
    w.flops["backward"] = 2 * T * (linear * below + head + adapter)  # input gradients
    w.flops["weight gradients"] = 2 * T * ((linear * below + head) if full else adapter)
    # non-reentrant checkpointing stops recomputing once the tensors backward needs are back:
    # with full fine-tuning, before the layer's last matmul (the MLP's down projection)
    last = arch.intermediate * arch.hidden * L if full else 0
    w.flops["recompute"] = 2 * T * (linear - last + adapter) * recompute
    w.attention_flops = 4 * T * setup.span * arch.hidden * L * (1 + 2 * below + recompute)
    passes = 2 + recompute  # weights dequantized: forward, backward, recomputation
    # every quantized weight, the experts' too (a few thousand tokens reach every expert)
    stored = arch.linear_params
    # in + out features of every linear layer, from the adapted ones' (8-bit and upcast traffic)
    features = arch.adapted_features * arch.linear_modules / max(1, arch.adapted_modules)
    if setup.quant_bits == 4:  # double quantization assumed (the recipes' and QLoRA's setting)
        w.bytes["dequantize"] = stored * (quantized_bytes(4) + 2) * passes
    elif setup.quant_bits == 8:
        _int8_work(arch, setup, w, linear, recompute, features)
    # the weights each matmul reads (16-bit: a quantized layer's dequantized copy; LLM.int8's
    # forward its int8 weight), the head's forward and backward
    weight_reads = passes - 1 + below
    if setup.quant_bits == 8:
        weight_reads = (1 + recompute) / 2 + 1
    w.bytes["weights"] = (stored * weight_reads + 2 * head) * setup.weight_bytes
    w.bytes["activations"] = T * L * saved_bytes_per_token_layer(arch) * (4 + recompute)
    if setup.upcast:
        # peft's k-bit preparation made every unquantized weight fp32 (the embeddings too, so
        # the residual stream and its saved activations are fp32) and autocast casts each
        # weight to 16 bits on every pass (a cast kernel beside the GEMM: fp32 read, 16-bit
        # written) and each linear layer's fp32 input forward and its gradient backward
        unquantized = 0 if setup.quant_bits else stored * weight_reads
        w.bytes["weight casts"] = (unquantized + 2 * head) * 6
        w.bytes["activations"] *= 2
        w.bytes["upcast casts"] = T * features / 2 * 6 * (2 + recompute)  # inputs: half
    if adapter:  # B's output, forward and backward, and dropout's copy of the input (about half)
        w.bytes["lora"] = T * arch.adapted_features * 2 * 3 / (1 if setup.lora_dropout else 2)
    if adapter and arch.materialized_experts:
        # assumed: peft's parameter LoRA makes every expert weight W + B_e A_e anew at each
        # forward (read W, write and read the sum: 3 bf16 passes over the experts) and its
        # backward writes and reads the gradient of that whole tensor before A and B get theirs
        w.bytes["expert lora"] = arch.expert_params * 2 * (3 * (1 + recompute) + 3)
    w.bytes["logits"] = T * arch.vocab * LOGIT_BYTES[setup.loss]
    forward, backward = layer_ops(arch, setup)
    w.ops = L * (forward * (1 + recompute) + backward * below) + HEAD_OPS
    if adapter and setup.stack in stacks.INDEX_LIST_STACKS:
        # its index list: the adapted projections' output features (q and v: half their in + out)
        w.host_seconds = stacks.INDEX_LIST_SECONDS * arch.adapted_features / 2 * (1 + recompute)
        w.synchronous = True  # the list's copy to the GPU waits for the queued kernels
    if setup.reference_forward:  # its matmuls (adapters off or a frozen copy), no gradients
        w.flops["reference forward"] = 2 * T * (linear + head)
        w.attention_flops += 4 * T * setup.span * arch.hidden * L
        w.ops += L * forward + HEAD_OPS
        if setup.quant_bits:
            w.bytes["dequantize"] *= (passes + 1) / passes
    _step_work(arch, setup, w)
    return w


def _int8_work(arch, setup: Setup, w: Work, linear: float, recompute: float, features) -> None:
    """LLM.int8 (bitsandbytes' MatMul8bitLt): int8 GEMMs forward, a dequantized copy of the
    weight backward; `linear` as work()'s, `features` the linear layers' in + out."""
    T = setup.tokens
    forward = 1 + recompute
    w.int8_flops = 2 * T * linear * forward
    w.flops["forward"] -= 2 * T * linear
    w.flops["recompute"] -= 2 * T * linear * recompute
    w.bytes["dequantize"] = arch.linear_params * INT8_WEIGHT_BYTES[4 if setup.upcast else 2]
    w.bytes["int8 activations"] = T * features * INT8_FEATURE_BYTES * forward
    if setup.upcast:
        # its backward (bitsandbytes 0.39 to 0.50) copies the weight to its input's dtype and
        # multiplies in it outside autocast (no custom_bwd): float32 for every 8-bit layer the
        # fp32 residual stream feeds (through a norm, or another 8-bit layer's fp32 output),
        # all but attention's output projection (its input: SDPA's, 16-bit)
        fp32 = 2 * T * (linear - min(linear, arch.hidden**2 * arch.layers)) * arch.trained_share
        w.flops["backward"] -= fp32
        w.fp32_flops = fp32


def _step_work(arch, setup: Setup, w: Work) -> None:
    """The optimizer's traffic and the collectives, per optimizer step."""
    g = setup.gpus
    full = named(setup.method).trains_base
    trained = (arch.total_params - arch.frozen_params) if full else arch.adapter_params
    state_bytes = setup.weight_bytes if full else 4
    grad_bytes = trained * state_bytes
    if setup.quant_bits:
        packed = quantized_bytes(setup.quant_bits)
        weights = arch.linear_params * packed + (arch.total_params - arch.linear_params) * 2
    else:
        weights = arch.total_params * setup.weight_bytes
    sharded = (
        setup.strategy == "fsdp"
        and setup.sharding != "no_shard"
        or (setup.strategy == "deepspeed" and setup.zero_stage == 3)
    )
    group = g
    if setup.strategy == "fsdp" and setup.sharding == "hybrid":
        group = min(g, setup.procs_per_node)
    state_group = group if (sharded or setup.strategy == "deepspeed") else 1
    w.step_bytes = trained / state_group * ADAMW_BYTES[state_bytes]
    if g > 1:
        ring = (g - 1) / g
        if sharded:
            gather = 2 * weights * (group - 1) / group  # forward and backward
            w.comm_per_micro["all-gather weights"] = gather
            w.comm_per_micro["reduce-scatter gradients"] = grad_bytes * ring
        elif setup.strategy == "deepspeed":  # ZeRO-1/2: gradients reduced, parameters gathered
            w.comm["reduce-scatter gradients"] = grad_bytes * ring
            w.comm["all-gather parameters"] = trained * setup.weight_bytes * ring
        else:
            w.comm["all-reduce gradients"] = 2 * grad_bytes * ring
    if setup.offload.startswith("optimizer"):
        w.step_bytes = 0.0
        w.offload_seconds = (
            trained / state_group * 8 / PCIE_BYTES_S + trained / state_group / CPU_ADAM_PARAMS_S
        )
    if setup.offload in ("optimizer+params", "cpu"):
        w.offload_seconds += setup.grad_accum * weights / state_group * 2 / PCIE_BYTES_S


@dataclass
class StepTime:
    """Predicted seconds of one optimizer step on one GPU type, and what they are made of."""

    gpu: str
    step_seconds: float
    micro_seconds: float
    gpu_seconds: float  # per micro batch
    host_seconds: float  # per micro batch
    parts: dict[str, float]  # seconds per micro batch (GPU terms), per step (the rest)
    tokens_per_step: int  # computed tokens of the whole job per step
    rows_per_step: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_seconds

    @property
    def samples_per_second(self) -> float:
        return self.rows_per_step / self.step_seconds

    @property
    def bound(self) -> str:
        """What limits a micro batch: the GPU or the host that feeds it."""
        return "host" if self.host_seconds > self.gpu_seconds else "GPU"


def link_bytes_s(gpu: GpuType, setup: Setup) -> float:
    return gpu.network_bytes_s if setup.nodes > 1 else gpu.link_bytes_s


def step_time(arch, setup: Setup, gpu: GpuType, eff: Efficiency, w: Work | None = None) -> StepTime:
    """The step's time; `w` is work(arch, setup) where the caller has it (the fit reuses it)."""
    w = w or work(arch, setup)
    peak, hbm = gpu.matmul_flops * eff.matmul, gpu.hbm_bytes_s * eff.memory
    if setup.dense_attention:
        attention = w.attention_flops / (gpu.matmul_flops * eff.dense_share)
    else:
        attention = w.attention_flops * CAUSAL / peak
    parts = {
        "matmul": w.matmul_flops / peak,
        "attention": attention,
        **(
            {"int8 matmul": w.int8_flops / (2 * gpu.matmul_flops * eff.int8_share)}
            if w.int8_flops
            else {}
        ),
        **({"fp32 matmul": w.fp32_flops / (gpu.fp32_flops * eff.matmul)} if w.fp32_flops else {}),
        **{name: b / hbm for name, b in w.bytes.items()},
    }
    if "activations" in parts:  # a compiled layer's fused kernels, else eager ops
        compiled = eff.memory / eff.compiled_share
        parts["activations"] *= compiled if setup.compiled else eff.eager_traffic
    if "dequantize" in parts and setup.bitsandbytes_4bit:
        parts["dequantize"] *= eff.memory / eff.dequant_share
    parts["weights"] = max(0.0, parts.get("weights", 0.0) - parts["matmul"])  # the roofline
    gpu_s = sum(parts.values())
    host_s = w.ops * eff.op_seconds + w.host_seconds
    p = 1.0 if w.synchronous else eff.overlap
    micro = (gpu_s**p + host_s**p) ** (1 / p)
    link = link_bytes_s(gpu, setup) * COMM_EFFICIENCY
    # collectives overlap the compute they run beside: per micro batch (FSDP, ZeRO-3) all of
    # it, per step (DDP's gradient buckets) the backward of the last micro batch
    micro_comm = sum(w.comm_per_micro.values()) / link
    micro_total = max(micro, micro_comm)
    step_comm = sum(w.comm.values()) / link
    exposed = max(0.0, step_comm - gpu_s * 2 / 3)
    optimizer = w.step_bytes / hbm + w.step_ops * eff.op_seconds
    step = setup.grad_accum * micro_total + optimizer + exposed + w.offload_seconds
    parts = {f"{k} (per micro batch)": v for k, v in parts.items()}
    parts["host (per micro batch)"] = host_s
    parts["collectives exposed (per micro batch)"] = micro_total - micro
    parts["optimizer (per step)"] = optimizer
    parts["collectives exposed (per step)"] = exposed
    parts["cpu offload (per step)"] = w.offload_seconds
    rows = setup.gpus * setup.micro_batch * setup.grad_accum
    return StepTime(gpu.name, step, micro_total, gpu_s, host_s, parts, rows * setup.row_len, rows)


def as_dict(t: StepTime) -> dict:
    record = asdict(t)
    record["parts"] = {k: round(v, 6) for k, v in t.parts.items()}
    record.update(
        tokens_per_second=t.tokens_per_second,
        samples_per_second=t.samples_per_second,
        bound=t.bound,
    )
    return record
