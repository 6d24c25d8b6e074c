"""`SpelaConfig`: SPELA's settings, with the seed project's (fast-ann-training) field names."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...utils import check_choice, check_int, check_number
from ..class_vectors import METHODS

__all__ = ["SpelaConfig"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass
class SpelaConfig:
    """SPELA's settings (also accepted as `SpelaTrainer` keywords).

    num_classes: classes of the task. lr, momentum, weight_decay: each layer's SGD.
    device: the trainer's device (None: the trainer's `device` keyword, default "auto").
    dtype: the layers' parameter dtype, e.g. torch.float64 or "float64" (None: as built);
        float inputs are cast to it.
    auto_flatten: flatten the raw input for a first `nn.Linear`, and any layer output that
        is not yet a vector per sample (a CNN block without pool + flatten); False raises.
    normalize_layer_inputs: L2-normalise every layer's input, the raw input included.
    center_layer_inputs: subtract from each hidden layer's input (not the raw input) its
        mean over the features of the sample, before normalising (not in the seed project).
        ReLU outputs, and most of all BatchNorm + ReLU + global pooling, share one large
        common direction that hides what tells the classes apart from the next layer.
    amp: autocast in the device's best dtype: the trainer's mixed_precision="auto" (bf16 or
        fp16 on CUDA, full precision on CPU and MPS).
    grad_clip_norm: clip each layer's gradient norm to this: the trainer's `grad_clip`.
    embeddings_method: "energy" (least electrostatic energy; a regular simplex when
        classes <= width + 1), "farthest" (greedy farthest points) or "random".
    seed: the class vectors' seed (layer k uses seed + k).
    nonnegative_vectors: give a layer whose output ends in ReLU (or another non-negative
        activation; pooling, flatten and dropout after it allowed) and has >= num_classes
        outputs class vectors with disjoint supports in the positive orthant, which it can
        reach (not in the seed project; it helps that layer's own exit, not the last one).
    """

    num_classes: int
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    device: str | torch.device | int | None = None
    dtype: torch.dtype | str | None = None
    auto_flatten: bool = True
    normalize_layer_inputs: bool = True
    center_layer_inputs: bool = True
    amp: bool = False
    grad_clip_norm: float | None = None
    embeddings_method: str = "energy"
    seed: int = 0
    nonnegative_vectors: bool = False

    def __post_init__(self) -> None:
        check_int("SpelaConfig.num_classes", self.num_classes, minimum=2)
        check_number("SpelaConfig.lr", self.lr, positive=True)
        check_number("SpelaConfig.momentum", self.momentum)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"SpelaConfig.momentum must be in [0, 1); got {self.momentum!r}")
        check_number("SpelaConfig.weight_decay", self.weight_decay)
        if self.weight_decay < 0:
            raise ValueError(f"SpelaConfig.weight_decay must be >= 0; got {self.weight_decay!r}")
        _check_device(self.device)
        self.dtype = _as_dtype(self.dtype)
        for name in ("auto_flatten", "normalize_layer_inputs", "center_layer_inputs", "amp", "nonnegative_vectors"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SpelaConfig.{name} must be True or False; got {getattr(self, name)!r}")
        check_number("SpelaConfig.grad_clip_norm", self.grad_clip_norm, positive=True, allow_none=True)
        check_choice("SpelaConfig.embeddings_method", self.embeddings_method, METHODS)
        check_int("SpelaConfig.seed", self.seed)


def _check_device(device: Any) -> None:
    allowed = 'None, "auto", a device name such as "cpu" or "cuda:0", a torch.device or a GPU index'
    if device is None or isinstance(device, torch.device) or device == "auto":
        return
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"SpelaConfig.device must be {allowed}; got {device!r}")
    if isinstance(device, int) and device < 0:
        raise ValueError(f"SpelaConfig.device must be {allowed}; got {device!r}")
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"SpelaConfig.device must be {allowed}; got {device!r}") from error


def _as_dtype(dtype: Any) -> torch.dtype | None:
    allowed = f"None or a floating dtype ({', '.join(_DTYPES)}, as a torch.dtype or its name)"
    if dtype is None or dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"SpelaConfig.dtype must be {allowed}; got {dtype!r}")
