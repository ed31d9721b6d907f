"""The GPU types `kubetune plan` knows: memory, peak dense bf16 tensor FLOP/s, HBM bandwidth, the
link between GPUs of a node and the network between nodes (vendor data sheets; SXM parts where
there are several), and the share of that peak a bf16 matmul measurably reaches. One table for
the memory plan, the speed model and MFU."""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class GpuType:
    name: str
    memory_gb: float
    bf16_flops: float  # dense tensor-core peak, FLOP/s (V100: fp16, it has no bf16)
    hbm_bytes_s: float  # memory bandwidth, bytes/s
    link: str  # what joins the GPUs of one node
    link_bytes_s: float  # per GPU and direction, bytes/s
    network_bytes_s: float  # per GPU between nodes, bytes/s (the usual NIC per GPU of its nodes)
    device_names: tuple[str, ...]  # substrings of torch.cuda.get_device_name that mean this type
    # the best bf16 matmul's share of bf16_flops, measured: stas00/ml-engineering's "Maximum
    # Achievable Matmul FLOPS comparison table" (compute/accelerator/README.md, mamf-finder.py).
    # Newer, faster parts reach less of their data sheet (H100 80%, B200 78%, MI300X 51%: its 668.4 TFLOP/s, A100
    # 87%); a type it has not measured takes its data sheet's (MAMF_UNMEASURED): an assumption
    mamf_share: float | None = None
    # the FP32 (non-tensor) peak, FLOP/s, from the same data sheets: a float32 matmul with TF32
    # off (PyTorch's default for matmuls since 1.12) runs on the CUDA cores at this rate.
    # Assumed where no sheet says it: A10G as the A10, B200 as GB200 NVL72's per-GPU share
    fp32_flops: float = 0.0

    @property
    def matmul_flops(self) -> float:
        """What the best bf16 matmul reaches: the speed model's matmul peak."""
        return self.bf16_flops * (MAMF_UNMEASURED if self.mamf_share is None else self.mamf_share)


MAMF_UNMEASURED = 1.0  # a type the table has not measured: its data sheet (an assumption)


GPU_TYPES = {
    g.name: g
    for g in (
        GpuType("A100-80GB", 80, 312e12, 2.039e12, "NVLink 3", 300e9, 25e9, ("A100-SXM4-80GB", "A100 80GB", "A100-PCIE-80GB"), 0.869, fp32_flops=19.5e12),
        GpuType("A100-40GB", 40, 312e12, 1.555e12, "NVLink 3", 300e9, 25e9, ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100"), 0.869, fp32_flops=19.5e12),
        GpuType("H100-80GB", 80, 989e12, 3.35e12, "NVLink 4", 450e9, 50e9, ("H100",), 0.803, fp32_flops=67e12),
        GpuType("H200-141GB", 141, 989e12, 4.8e12, "NVLink 4", 450e9, 50e9, ("H200",), 0.803, fp32_flops=67e12),
        GpuType("L40S-48GB", 48, 362e12, 0.864e12, "PCIe 4", 32e9, 12.5e9, ("L40S",), fp32_flops=91.6e12),
        GpuType("A10G-24GB", 24, 70e12, 0.6e12, "PCIe 4", 32e9, 12.5e9, ("A10G",), fp32_flops=31.2e12),
        GpuType("A10-24GB", 24, 125e12, 0.6e12, "PCIe 4", 32e9, 12.5e9, ("A10",), fp32_flops=31.2e12),
        GpuType("L4-24GB", 24, 121e12, 0.3e12, "PCIe 4", 32e9, 12.5e9, ("L4",), fp32_flops=30.3e12),
        GpuType("V100-32GB", 32, 125e12, 0.9e12, "NVLink 2", 150e9, 12.5e9, ("V100-SXM2-32GB", "V100-PCIE-32GB", "V100S"), fp32_flops=15.7e12),
        GpuType("V100-16GB", 16, 125e12, 0.9e12, "NVLink 2", 150e9, 12.5e9, ("V100",), fp32_flops=15.7e12),
        # rented often (issue 40): bf16 with fp32 accumulate for the RTX cards (GeForce halves
        # it against fp16 accumulate), HGX B200's per-GPU share, MI300X under ROCm ("cuda")
        GpuType("RTX4090-24GB", 24, 165.2e12, 1.008e12, "PCIe 4", 32e9, 12.5e9, ("RTX 4090",), fp32_flops=82.6e12),
        GpuType("RTXA6000-48GB", 48, 154.8e12, 0.768e12, "PCIe 4", 32e9, 12.5e9, ("RTX A6000",), fp32_flops=38.7e12),
        GpuType("B200-180GB", 180, 2250e12, 8.0e12, "NVLink 5", 900e9, 50e9, ("B200",), 0.776, fp32_flops=80e12),
        GpuType("MI300X-192GB", 192, 1307.4e12, 5.3e12, "Infinity Fabric", 448e9, 50e9, ("MI300X",), 0.511, fp32_flops=163.4e12),
    )
}  # fmt: skip
# Offered by `kubetune plan` when neither --gpus nor hardware.gpu names one.
COMMON = ("A100-80GB", "H100-80GB", "H200-141GB", "L40S-48GB")


def gpu_type_of(device_name: str) -> GpuType | None:
    """The table's type of a CUDA device name ("NVIDIA H100 80GB HBM3" -> H100-80GB); the most
    specific match wins (A100-SXM4-80GB before A100)."""
    matches = [
        (len(part), g) for g in GPU_TYPES.values() for part in g.device_names if part in device_name
    ]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def named(name: str) -> list[GpuType]:
    """The types `name` means: its exact entry, else every type whose name before the memory
    suffix it is, in any case ("L40S" -> L40S-48GB; "A100" -> both A100s)."""
    if name in GPU_TYPES:
        return [GPU_TYPES[name]]
    return [g for g in GPU_TYPES.values() if g.name.rsplit("-", 1)[0].lower() == name.lower()]
