"""ImageFileLoggerHook: write what `trainer.log_images()` receives as image files,
`<path>/<step>/<name>.<format>`, every `interval` steps, on the main process."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, features

from ..builder import REGISTRY
from ..checkpoint import write_file
from ..distributed import is_main_process
from ..images import as_image_list, is_image_batch
from ..utils import check_int, in_workspace
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

# format name (as the user writes it) -> Pillow's format name
_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF", "gif": "GIF"}


@REGISTRY.register()
class ImageFileLoggerHook(BaseHook):
    """Save the images given to `trainer.log_images({name: image_or_batch})` as files.

    A single image goes to `<path>/<step>/<name>.<format>`, a batch to
    `<name>_0.<format>`, `<name>_1.<format>`, ... (see `mini_trainer.images` for the
    accepted images: PIL, tensors and arrays in CHW / HWC, uint8 or float in 0..1,
    batches as 4-D or lists). A name may contain "/" ("val/sample" writes
    `<step>/val/sample.png`); "." and ".." parts, empty parts and absolute names are refused.

    Args:
        interval: write only the calls made at a step that is a multiple of this; the others
            are ignored, so a `forward` may call `log_images` at every step and the files
            still come every `interval` steps (convert nothing you do not need, though:
            `trainer.step % interval` is cheap to check in your own code too).
        path: the output directory; a relative path is taken inside `trainer.workspace`
            (without a workspace: the current directory).
        max_images: at most this many files per call, over all names (the first ones, in
            the order given): a 256-sample batch does not become 256 files.
        format: png, jpeg / jpg, webp, bmp, tiff or gif (also the file extension). JPEG has
            no alpha: RGBA images are written as RGB (alpha dropped), LA as grayscale.

    Only the main process writes, and nothing is written for a `dry_run` call. Each file is
    written to a temporary file in the same directory and renamed into place, so a killed
    process never leaves a truncated image behind (a stray `.<name>.tmp-*` file at worst).
    """

    def __init__(
        self, interval: int = 100, path: str | os.PathLike = "images", max_images: int = 8, format: str = "png"
    ) -> None:
        check_int("ImageFileLoggerHook.interval", interval, minimum=1)
        check_int("ImageFileLoggerHook.max_images", max_images, minimum=1)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"ImageFileLoggerHook.path must be a str or Path; got {type(path).__name__} {path!r}")
        if not isinstance(format, str) or format.lower() not in _FORMATS:
            raise ValueError(f"ImageFileLoggerHook.format must be one of {', '.join(_FORMATS)}; got {format!r}")
        if format.lower() == "webp" and not features.check("webp"):
            raise ValueError("ImageFileLoggerHook.format='webp': this Pillow was built without WebP support; use png")
        self.interval = interval
        self.path = Path(path)
        self.max_images = max_images
        self.format = format.lower()

    def directory(self, trainer: BaseTrainer) -> Path:
        """Where this hook writes (the step directories are inside)."""
        return in_workspace(trainer.workspace, self.path)

    def on_log_images(self, trainer: BaseTrainer, records: Mapping[str, Any], dry_run: bool = False) -> None:
        # Names are checked at every call, so a bad one fails at the first call, not at the
        # first step that is a multiple of `interval`.
        parts = {name: _name_parts(name) for name in records}
        if dry_run or not is_main_process() or trainer.step % self.interval != 0:
            return
        step_dir = self.directory(trainer) / str(trainer.step)
        left = self.max_images
        for name, value in records.items():
            if left <= 0:
                break
            batch = is_image_batch(value)
            # Cut a batch before converting it: 256 samples must not cost 256 conversions.
            images = as_image_list(value[:left] if batch else value, name)
            left -= len(images)
            *folders, stem = parts[name]
            target_dir = step_dir.joinpath(*folders)
            target_dir.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                filename = f"{stem}_{i}.{self.format}" if batch else f"{stem}.{self.format}"
                write_file(target_dir / filename, _encode(image, _FORMATS[self.format]), fsync=False, atomic=True)


def _name_parts(name: Any) -> list[str]:
    """'val/sample' -> ['val', 'sample'], refusing anything that could leave the step directory."""
    allowed = 'a non-empty string of parts separated by "/" (e.g. "val/sample"), without ".", ".." or empty parts'
    if not isinstance(name, str):
        raise TypeError(f"ImageFileLoggerHook: image name must be {allowed}; got {type(name).__name__} {name!r}")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\\" in name or "\0" in name:
        raise ValueError(f"ImageFileLoggerHook: image name must be {allowed}, without backslashes; got {name!r}")
    return parts


def _encode(image: Image.Image, pil_format: str) -> bytes:
    """The file's bytes; modes a format cannot store are converted (JPEG: no alpha)."""
    if pil_format == "JPEG" and image.mode not in ("1", "L", "RGB", "CMYK"):
        image = image.convert("L" if image.mode in ("LA", "I;16", "I", "F") else "RGB")
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=pil_format)
    except (OSError, ValueError):  # e.g. LA or 16-bit to BMP: keep alpha when there is one
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        buffer = io.BytesIO()
        image.convert("RGBA" if has_alpha else "RGB").save(buffer, format=pil_format)
    return buffer.getvalue()

