"""The efficiencies the speed model (`speed.py`) is fitted with: what a step reaches of a GPU's
peaks, fitted on measured runs by `benchmarks/fit_speed_model.py` (`calibration.py`) and stored
in speed_calibration.json beside this file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CALIBRATION = Path(__file__).with_name("speed_calibration.json")


@dataclass(frozen=True)
class Efficiency:
    """What a step reaches of the GPU's peaks: fitted on measured runs."""

    matmul: float  # share of the best bf16 matmul's rate (GpuType.matmul_flops) GEMMs reach
    memory: float  # share of HBM bandwidth memory-bound kernels reach
    op_seconds: float  # host time per dispatched op
    overlap: float  # p of the power mean of GPU and host time
    points: int = 0  # calibration points it was fitted on
    # the time of an eager (uncompiled) layer's activation traffic over a compiled one's, for
    # the same counted bytes (`Work.bytes["activations"]`): its elementwise ops each write and
    # read their output (about 1.6-1.9x the counted bytes, counted on the tiny models with a
    # TorchDispatchMode), and small unfused kernels reach less of the bandwidth; fitted
    eager_traffic: float = 1.0
    # share of twice that rate (int8's) bitsandbytes' LLM.int8 forward matmuls reach;
    # None where no 8-bit point was measured: as the bf16 matmuls' share (an assumption)
    int8: float | None = None
    # share of MAMF attention reaches computing every score of a dense mask (Setup.dense_attention);
    # None where no such point was measured: as the matmuls' share (an assumption)
    dense: float | None = None
    # share of HBM bandwidth a compiled layer's fused kernels reach on its activation traffic
    # (an eager layer's: memory / eager_traffic); None where no compiled point was measured:
    # as memory-bound kernels' share (an assumption)
    compiled: float | None = None
    # share of HBM bandwidth bitsandbytes' 4-bit dequantization reaches (its kernel decodes
    # each NF4 code; torchtune's NF4 is torchao's, compiled, at memory's share); None where no
    # such point was measured: as memory-bound kernels' share (an assumption)
    dequant: float | None = None

    @property
    def int8_share(self) -> float:
        return self.matmul if self.int8 is None else self.int8

    @property
    def dense_share(self) -> float:
        return self.matmul if self.dense is None else self.dense

    @property
    def compiled_share(self) -> float:
        return self.memory if self.compiled is None else self.compiled

    @property
    def dequant_share(self) -> float:
        return self.memory if self.dequant is None else self.dequant

    @classmethod
    def load(cls, path: Path = CALIBRATION) -> Efficiency:
        return cls(**json.loads(path.read_text())["efficiency"])

    def describe(self) -> str:
        own = "" if self.int8 is None else f", {self.int8:.1%} of twice that for LLM.int8"
        if self.dense is not None:
            own += f", {self.dense:.0%} of it for attention over a dense mask"
        if self.compiled is not None:
            own += f", {self.compiled:.0%} of HBM for compiled layers' activations"
        if self.dequant is not None:
            own += f", {self.dequant:.0%} of HBM for bitsandbytes' 4-bit dequantization"
        return (
            f"{self.matmul:.0%} of the measured best bf16 matmul (MAMF) for matmuls, "
            f"{self.memory:.0%} of HBM bandwidth, "
            f"{self.op_seconds * 1e6:.0f} us of host time per op, GPU and host joined with "
            f"p={self.overlap:g}, eager layers' activation bytes taking "
            f"{self.eager_traffic:.1f}x their time{own}"
        )
