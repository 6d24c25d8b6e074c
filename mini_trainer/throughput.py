"""Model FLOPs utilisation: peak dense FLOP/s of common GPUs and `MfuHook`.

`MfuHook` puts the step's FLOPs (`flops`) and the device's peak (`peak_flops`) into
`trainer.step_info`; `StepMetrics` (behind `ProgressHook` and `LoggingHook`) turns them
into `mfu` = FLOPs per step / seconds per step / peak FLOP/s. See docs/throughput.md.

The peaks are the vendors' datasheet figures for dense math: NVIDIA prints the tensor-core
figures "with sparsity" (2:4 structured sparsity, which training does not use), so the
table holds half of those. They are what the chip can do at its boost clock; a real
chip under power or thermal limits does less, so a measured MFU of 40-60% is good.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import torch

from .builder import REGISTRY
from .hooks.base import BaseHook
from .utils import check_number

if TYPE_CHECKING:
    from .trainer import BaseTrainer

__all__ = ["GPU_PEAK_FLOPS", "MfuHook", "lookup_peak_flops", "peak_flops"]

logger = logging.getLogger(__name__)

_T = 1e12

#: `(pattern, {"bf16" | "fp16" | "tf32" | "fp32": dense FLOP/s})`, the first pattern found
#: (case-insensitively) in `torch.cuda.get_device_name()` wins, so variants come before the
#: plain name. Patterns stop at word boundaries: "A10" is not "A100" or "A10G", "L4" not
#: "L40S". "fp16" is the FP16 tensor-core rate with FP32 accumulation (what autocast uses),
#: "tf32" the FP32 matmul rate when TF32 is allowed, "fp32" the plain FP32 (CUDA core) rate.
#: A dtype a chip has no tensor cores for is absent: pass `peak_flops` yourself.
GPU_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # H100 datasheet, NVL: FP32 60, TF32 835*, BF16/FP16 1,671* TFLOPS (* with sparsity).
    (r"\bH100 NVL\b", {"bf16": 835.5 * _T, "fp16": 835.5 * _T, "tf32": 417.5 * _T, "fp32": 60 * _T}),
    # H100 datasheet, PCIe: FP32 51, TF32 756*, BF16/FP16 1,513* TFLOPS.
    (r"\bH100 PCIe\b", {"bf16": 756.5 * _T, "fp16": 756.5 * _T, "tf32": 378 * _T, "fp32": 51 * _T}),
    # H100 datasheet, SXM ("NVIDIA H100 80GB HBM3"): FP32 67, TF32 989*, BF16/FP16 1,979* TFLOPS.
    (r"\bH100\b", {"bf16": 989.5 * _T, "fp16": 989.5 * _T, "tf32": 494.5 * _T, "fp32": 67 * _T}),
    # H200 datasheet, NVL: the same figures as the H100 NVL.
    (r"\bH200 NVL\b", {"bf16": 835.5 * _T, "fp16": 835.5 * _T, "tf32": 417.5 * _T, "fp32": 60 * _T}),
    # H200 datasheet, SXM: the same figures as the H100 SXM.
    (r"\bH200\b", {"bf16": 989.5 * _T, "fp16": 989.5 * _T, "tf32": 494.5 * _T, "fp32": 67 * _T}),
    # A100 datasheet (SXM and PCIe, 40 and 80 GB): FP32 19.5, TF32 156, BF16/FP16 312 TFLOPS dense.
    (r"\bA100\b", {"bf16": 312 * _T, "fp16": 312 * _T, "tf32": 156 * _T, "fp32": 19.5 * _T}),
    # A10 datasheet: FP32 31.2, TF32 62.5, BF16/FP16 125 TFLOPS dense. (Not the A10G: no
    # NVIDIA datasheet gives its tensor rates.)
    (r"\bA10\b", {"bf16": 125 * _T, "fp16": 125 * _T, "tf32": 62.5 * _T, "fp32": 31.2 * _T}),
    # L40S datasheet: FP32 91.6, TF32 183, BF16/FP16 362.05 TFLOPS dense.
    (r"\bL40S\b", {"bf16": 362.05 * _T, "fp16": 362.05 * _T, "tf32": 183 * _T, "fp32": 91.6 * _T}),
    # L4 datasheet: FP32 30.3, TF32 120*, BF16/FP16 242* TFLOPS.
    (r"\bL4\b", {"bf16": 121 * _T, "fp16": 121 * _T, "tf32": 60 * _T, "fp32": 30.3 * _T}),
    # V100 datasheet: SXM2 FP32 15.7 / tensor 125, PCIe 14 / 112, V100S PCIe 16.4 / 130 TFLOPS.
    # Volta has FP16 tensor cores only (no BF16, no TF32).
    (r"\bV100S\b", {"fp16": 130 * _T, "fp32": 16.4 * _T}),
    (r"\bV100-PCIE\b", {"fp16": 112 * _T, "fp32": 14 * _T}),
    (r"\bV100\b", {"fp16": 125 * _T, "fp32": 15.7 * _T}),
    # T4 datasheet: FP32 8.1, mixed precision (FP16/FP32) 65 TFLOPS; no BF16, no TF32.
    (r"\bT4\b", {"fp16": 65 * _T, "fp32": 8.1 * _T}),
    # GeForce figures from NVIDIA's architecture whitepapers (FP16 with FP32 accumulate: the
    # GeForce rate is half the FP16-accumulate one). Anchored at the end of the name: the
    # Ti, D and Laptop variants have other figures.
    # GA102 whitepaper, RTX 3090: FP32 35.6, TF32 35.6, BF16/FP16 71 TFLOPS dense.
    (r"\bRTX 3090$", {"bf16": 71 * _T, "fp16": 71 * _T, "tf32": 35.6 * _T, "fp32": 35.6 * _T}),
    # Ada whitepaper, RTX 4090: FP32 82.6, TF32 82.6, BF16/FP16 165.2 TFLOPS dense.
    (r"\bRTX 4090$", {"bf16": 165.2 * _T, "fp16": 165.2 * _T, "tf32": 82.6 * _T, "fp32": 82.6 * _T}),
)

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _dtype_name(dtype: torch.dtype | str | None) -> str:
    if dtype is None:
        return "fp32"  # no autocast: the model computes in float32
    name = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
    if name not in ("bf16", "fp16", "tf32", "fp32"):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16, torch.float32 or one of "
                         f"'bf16', 'fp16', 'tf32', 'fp32'; got {dtype!r}")
    return name


def lookup_peak_flops(device_name: str, dtype: torch.dtype | str | None, tf32: bool = False) -> float | None:
    """The dense peak FLOP/s of the GPU called `device_name` (as `torch.cuda.get_device_name`
    spells it) for `dtype`, from `GPU_PEAK_FLOPS`; None when the GPU or the dtype is not in
    the table. `tf32`: float32 matmuls run on TF32 tensor cores (then float32 takes the
    "tf32" figure where the chip has one)."""
    name = _dtype_name(dtype)
    if name == "fp32" and tf32:
        name = "tf32"
    for pattern, figures in GPU_PEAK_FLOPS:
        if re.search(pattern, device_name.strip(), re.IGNORECASE):
            return figures.get(name, figures.get("fp32") if name == "tf32" else None)
    return None


def _tf32_matmuls() -> bool:
    """Whether float32 matmuls on CUDA may use TF32 (`torch.set_float32_matmul_precision`)."""
    try:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"  # reflects the legacy flag too
    except AttributeError:  # PyTorch before the fp32_precision API
        return bool(torch.backends.cuda.matmul.allow_tf32)


def peak_flops(device: torch.device | str | int, dtype: torch.dtype | str | None = None) -> float | None:
    """The dense peak FLOP/s of `device` computing in `dtype` (None: float32), or None where it
    is not known: CPU, MPS, a GPU or dtype missing from `GPU_PEAK_FLOPS`. Float32 takes the
    TF32 figure when TF32 matmuls are enabled."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        return None
    return lookup_peak_flops(torch.cuda.get_device_name(device), dtype, tf32=_tf32_matmuls())


@REGISTRY.register()
class MfuHook(BaseHook):
    """Report model FLOPs utilisation (`mfu`, a fraction of the device's peak) through
    `ProgressHook` and `LoggingHook`.

    Args:
        flops_per_sample: the FLOPs of one training sample (forward + backward; for a
            transformer about 6 x parameters x sequence length). The step's FLOPs are this x
            `step_info["samples"]` (every micro-batch of this rank).
        flops_per_token: the FLOPs of one token (about 6 x parameters); the step's FLOPs are
            this x the `tokens` record `forward` returns (summed over micro-batches).
        peak_flops: the device's peak FLOP/s; default: `GPU_PEAK_FLOPS` for the trainer's
            GPU and precision (the autocast dtype, else the parameters'). Required on CPU
            and on GPUs not in the table.

    Give exactly one of `flops_per_sample` and `flops_per_token`. The FLOPs are multiplied
    on the device when `tokens` is a tensor: no host read per step.
    """

    # Before LoggingHook (0) and ProgressHook (10) read step_info after a step.
    priority = {"on_after_step": -10, "default": 0}

    def __init__(
        self,
        flops_per_sample: float | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> None:
        check_number("MfuHook.flops_per_sample", flops_per_sample, positive=True, allow_none=True)
        check_number("MfuHook.flops_per_token", flops_per_token, positive=True, allow_none=True)
        check_number("MfuHook.peak_flops", peak_flops, positive=True, allow_none=True)
        if (flops_per_sample is None) == (flops_per_token is None):
            got = "both" if flops_per_sample is not None else "neither"
            raise ValueError(f"MfuHook needs exactly one of flops_per_sample and flops_per_token; got {got}")
        self.flops_per_sample = flops_per_sample
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._peak: float | None = None
        self._warned = False

    def on_before_train(self, trainer: BaseTrainer) -> None:
        if self.peak_flops is not None:
            self._peak = float(self.peak_flops)
            return
        device, dtype = trainer.device, _compute_dtype(trainer)
        self._peak = peak_flops(device, dtype)
        if self._peak is None:
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            raise ValueError(
                f"MfuHook: the peak FLOP/s of {where!r} in {_dtype_name(dtype)} is not known: pass "
                "peak_flops=<the device's dense peak FLOP/s> (e.g. MfuHook(..., peak_flops=312e12) for an A100 in bf16)"
            )

    def on_after_step(self, trainer: BaseTrainer) -> None:
        info = trainer.step_info
        if self.flops_per_sample is not None:
            samples = info.get("samples")
            if samples is None:
                raise RuntimeError("MfuHook(flops_per_sample=...): the trainer put no 'samples' into step_info; "
                                   "use flops_per_token with a 'tokens' record instead")
            if samples == 0 and not self._warned:  # a host int: comparing it reads no device
                self._warned = True
                logger.warning("MfuHook: step %d counted no samples (its batches hold no tensor with a batch "
                               "dimension); mfu will read 0: use flops_per_token with a 'tokens' record", trainer.step)
            info["flops"] = self.flops_per_sample * samples
        else:
            tokens = (info.get("records") or {}).get("tokens")
            if tokens is None:
                raise RuntimeError("MfuHook(flops_per_token=...) needs forward to return a record named 'tokens' "
                                   "(the micro-batch's token count, a number or a 0-d tensor)")
            info["flops"] = _scaled(tokens, self.flops_per_token)
        info["peak_flops"] = self._peak


def _compute_dtype(trainer: BaseTrainer) -> torch.dtype:
    """The dtype the model computes in: the autocast dtype, else its parameters' (a model
    cast to bf16 as a whole runs at the bf16 rate)."""
    if getattr(trainer, "autocast_dtype", None) is not None:
        return trainer.autocast_dtype
    for param in trainer.model.parameters():
        if param.is_floating_point():
            return param.dtype if param.dtype in _DTYPE_NAMES else torch.float32
    return torch.float32


def _scaled(count: Any, factor: float) -> Any:
    """`count * factor` as float64, on the device for a tensor (no host read)."""
    if isinstance(count, torch.Tensor):
        # float64, like the sums MetricMeans keeps: a count that arrives as fp16 would
        # overflow once multiplied by ~1e9 FLOPs, and bf16 keeps only 3 significant digits.
        return count.detach().to(torch.float64) * factor
    return float(count) * factor
