"""Images to PNG bytes, and contact sheets: torchvision where it imports, Pillow otherwise.

torchvision's PyPI wheels are CUDA builds that do not import against a CPU torch, so it is an
optional extra (``aigc[gpu]``) for GPU hosts. Both paths do the same arithmetic as
``torchvision.utils.save_image(..., normalize=True, value_range=(-1, 1))`` and encode with
Pillow's defaults, so they give the same bytes (tests/test_images.py checks it where
torchvision is installed).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import torch
from PIL import Image

try:  # GPU hosts: pip install 'aigc[gpu]'
    import torchvision.utils as tv_utils
except Exception:  # absent, or a CUDA build that cannot load here (OSError, RuntimeError)
    tv_utils = None

PADDING = 2  # pixels between and around the images of a contact sheet (torchvision's default)


def grid_columns(n: int) -> int:
    """Columns of a contact sheet of ``n`` images: as square as possible."""
    return max(1, math.ceil(math.sqrt(n)))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(…, C, H, W) floats in [-1, 1] → uint8 in [0, 255], rounding as torchvision does."""
    return images.clamp(-1, 1).add(1).div(2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int, padding: int = PADDING) -> torch.Tensor:
    """Tile (B, C, H, W) images, ``nrow`` per row, black ``padding``: torchvision's layout."""
    if images.size(0) == 1:
        return images[0]
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    step_h, step_w = height + padding, width + padding
    grid = images.new_zeros((channels, step_h * rows + padding, step_w * columns + padding))
    for k in range(count):
        y, x = divmod(k, columns)
        grid[:, y * step_h + padding: (y + 1) * step_h, x * step_w + padding: (x + 1) * step_w] = images[k]
    return grid  # (C, rows*(H+p)+p, columns*(W+p)+p)


def _pil_png(image: torch.Tensor) -> bytes:
    """(C, H, W) uint8 → PNG bytes with Pillow's default settings."""
    array = image.permute(1, 2, 0).contiguous().numpy()  # (H, W, C)
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, format="png")
    return buffer.getvalue()


def encode_png(image: torch.Tensor, *, use_torchvision: bool | None = None) -> bytes:
    """One (C, H, W) image on the CPU → PNG bytes: floats in [-1, 1], or uint8 already
    converted by :func:`to_uint8` (the Pillow path; the same bytes, one batched conversion)."""
    if image.dtype == torch.uint8:
        return _pil_png(image)
    if _torchvision(use_torchvision):
        buffer = io.BytesIO()
        tv_utils.save_image(image, buffer, format="png", normalize=True, value_range=(-1, 1))
        return buffer.getvalue()
    return _pil_png(to_uint8(image))


def encode_grid(images: Sequence[torch.Tensor] | torch.Tensor, *,
                use_torchvision: bool | None = None) -> tuple[bytes, int, int]:
    """A contact sheet of (C, H, W) float images in [-1, 1] → (PNG bytes, width, height)."""
    batch = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
    nrow = grid_columns(batch.size(0))
    if _torchvision(use_torchvision):
        grid = tv_utils.make_grid(batch, nrow=nrow, padding=PADDING, normalize=True, value_range=(-1, 1))
        buffer = io.BytesIO()
        tv_utils.save_image(grid, buffer, format="png")  # already in [0, 1]
        return buffer.getvalue(), grid.size(2), grid.size(1)
    grid = make_grid(to_uint8(batch), nrow)
    return _pil_png(grid), grid.size(2), grid.size(1)


def _torchvision(requested: bool | None) -> bool:
    if requested and tv_utils is None:
        raise RuntimeError("torchvision is not importable here")
    return tv_utils is not None if requested is None else requested
