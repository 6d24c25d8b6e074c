"""Turn what a model produces into PIL images, for the hooks behind `trainer.log_images()`.

Accepted for one image:

- a `PIL.Image.Image` (returned as it is);
- a torch tensor or numpy array of shape `(H, W)` (grayscale), `(C, H, W)` or `(H, W, C)`
  with C = 1 (grayscale), 3 (RGB) or 4 (RGBA). The layout is the one whose first or last
  dimension is 1, 3 or 4; when both are (an image at most 4 pixels high or wide), tensors
  are read as CHW (torch's convention) and numpy arrays as HWC (numpy's and PIL's).

Accepted for a batch: a 4-D tensor or array (`(N, C, H, W)` or `(N, H, W, C)`, decided like
the single image's layout), or a list / tuple of single images.

Values: uint8 is taken as is (0..255); bool becomes 0 / 255; other integer types must hold
values in 0..255; floating point is taken as 0..1: clamped to [0, 1] (NaN counts as 0),
scaled by 255 and rounded to the nearest integer. Values far outside 0..1 (a 0..255 or a
normalized image) are clamped too, so that a logging call never stops training, but they
are reported once per image name in a warning that says how to rescale them.

Tensors may live on any device and require grad: they are detached and copied to the CPU.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["to_pil", "as_image_list", "is_image_batch"]

logger = logging.getLogger("mini_trainer")

_CHANNEL_COUNTS = (1, 3, 4)
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# Beyond this, a float image was almost surely not meant as 0..1 (e.g. 0..255, or normalized
# with a mean and std); a little overshoot (a generator's output) is just clamped.
_FLOAT_WARN_LOW, _FLOAT_WARN_HIGH = -0.5, 1.5
_ALLOWED = (
    "a PIL image, or a torch tensor / numpy array of shape (H, W), (C, H, W) or (H, W, C) with "
    "C = 1, 3 or 4, dtype uint8, bool, integers in 0..255 or floating point in 0..1"
)
_ALLOWED_BATCH = "a 4-D tensor / array (N, C, H, W) or (N, H, W, C), or a list / tuple of images"
_warned_range: set[str] = set()


def is_image_batch(value: Any) -> bool:
    """True when `value` is several images: a list / tuple, or a 4-D tensor or array."""
    if isinstance(value, (list, tuple)):
        return True
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 4


def to_pil(image: Any, name: str = "image") -> Image.Image:
    """One image (see the module docstring for what is accepted) as a PIL image of mode
    L, RGB or RGBA; a PIL image is returned unchanged. `name` only appears in errors.

    Raises:
        TypeError: not an image type, or an unsupported dtype (complex, strings...).
        ValueError: a shape that is not an image (0-, 1-, 4-, 5-D; 2 or 5+ channels;
            an empty dimension) or integers outside 0..255.
    """
    if isinstance(image, Image.Image):
        return image
    array = _to_numpy(image, name)
    if array.ndim == 4:
        raise ValueError(
            f"image {name!r}: a batch of shape {tuple(array.shape)} is several images; "
            "use as_image_list, or log image[0]"
        )
    if array.ndim not in (2, 3):
        raise ValueError(f"image {name!r}: a {array.ndim}-D {_describe(image)} is not an image; allowed: {_ALLOWED}")
    if array.ndim == 3:
        array = _channels_last(array, name, image, channels_first_preferred=isinstance(image, torch.Tensor))
        if array.shape[-1] == 1:
            array = array[..., 0]
    if 0 in array.shape:
        raise ValueError(f"image {name!r}: {_describe(image)} has an empty dimension; allowed: {_ALLOWED}")
    pixels = _to_uint8(array, name, image)
    mode = "L" if pixels.ndim == 2 else _MODES[pixels.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(pixels), mode=mode)


def as_image_list(value: Any, name: str = "image") -> list[Image.Image]:
    """`value` as a list of PIL images: a single image becomes a list of one; a batch (a
    4-D tensor / array, or a list / tuple of single images) one image per element.
    `name` only appears in errors (an element of a list is named `name[i]`)."""
    if isinstance(value, (list, tuple)):
        images = []
        for i, item in enumerate(value):
            if is_image_batch(item):
                raise ValueError(f"image {name!r}[{i}]: a list of batches is not supported; allowed: {_ALLOWED_BATCH}")
            images.append(to_pil(item, f"{name}[{i}]"))
        return images
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 4:
        array = _to_numpy(value, name)
        per_image = _channels_last(
            array, name, value, channels_first_preferred=isinstance(value, torch.Tensor), batch=True
        )
        return [to_pil(per_image[i], f"{name}[{i}]") for i in range(per_image.shape[0])]
    return [to_pil(value, name)]


# ---------------------------------------------------------------------------- helpers


def _describe(image: Any) -> str:
    if isinstance(image, torch.Tensor):
        return f"tensor of shape {tuple(image.shape)} ({image.dtype})"
    if isinstance(image, np.ndarray):
        return f"array of shape {image.shape} ({image.dtype})"
    return type(image).__name__


def _to_numpy(image: Any, name: str) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        tensor = image.detach()
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()  # numpy has no bfloat16
        if tensor.is_complex():
            raise TypeError(f"image {name!r}: a complex {_describe(image)} is not an image; allowed: {_ALLOWED}")
        return tensor.cpu().numpy()
    if isinstance(image, np.ndarray):
        if not (
            image.dtype == np.bool_ or np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
        ):
            raise TypeError(f"image {name!r}: an {_describe(image)} is not an image; allowed: {_ALLOWED}")
        return image
    raise TypeError(
        f"image {name!r}: got {type(image).__name__}; allowed: {_ALLOWED}, or for several images {_ALLOWED_BATCH}"
    )


def _channels_last(
    array: np.ndarray, name: str, original: Any, *, channels_first_preferred: bool, batch: bool = False
) -> np.ndarray:
    """Move the channel dimension of (N,)CHW / (N,)HWC to the end."""
    first, last = array.shape[-3], array.shape[-1]
    first_ok, last_ok = first in _CHANNEL_COUNTS, last in _CHANNEL_COUNTS
    if first_ok and (channels_first_preferred or not last_ok):
        return np.moveaxis(array, -3, -1)
    if last_ok:
        return array
    layout = "(N, C, H, W) or (N, H, W, C)" if batch else "(C, H, W) or (H, W, C)"
    if 2 in (first, last):
        reason = (
            "2 channels are ambiguous (grayscale + alpha, or two separate maps?): "
            "log one channel, or make it 1, 3 or 4"
        )
    else:
        reason = "neither the first nor the last image dimension is 1, 3 or 4 channels"
    raise ValueError(f"image {name!r}: {_describe(original)}: {reason}; allowed: {layout} with C = 1, 3 or 4")


def _to_uint8(array: np.ndarray, name: str, original: Any) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"image {name!r}: integer {_describe(original)} holds values in {low}..{high}; allowed: 0..255 "
                "(scale it, or use a float image in 0..1)"
            )
        return array.astype(np.uint8)
    values = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if (low < _FLOAT_WARN_LOW or high > _FLOAT_WARN_HIGH) and name not in _warned_range:
        _warned_range.add(name)
        logger.warning(
            "image %r: float values in %.3g..%.3g are clamped to 0..1 (a 0..255 image: divide by 255 "
            "or convert to uint8; a [-1, 1] image: (x + 1) / 2; a normalized one: undo the normalization)",
            name, low, high,
        )
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
