"""Images in and out of the endpoint: base64 and file uploads to tensors, tensors to PNG.

Every failure is an :class:`InputError` whose message says what to send instead; the
deployment turns it into a 4xx response.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import torch
from PIL import Image, ImageOps

from mdm.data import load_image, to_pil, to_tensor

__all__ = [
    "InputError",
    "FORMATS",
    "decode_base64",
    "open_image",
    "image_tensor",
    "mask_tensor",
    "encode_png",
    "to_8bit",
]

FORMATS = ("PNG", "JPEG", "WEBP")


class InputError(ValueError):
    """A request the server cannot use; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_base64(data: str, what: str) -> bytes:
    """Base64 (standard alphabet, or a ``data:image/...;base64,`` URL) to bytes."""
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            f"{what} is not valid base64 (standard alphabet A-Z a-z 0-9 + /, padded with = to a multiple of 4 "
            "characters): send the file's bytes base64-encoded"
        ) from None


def open_image(data: bytes, what: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes (EXIF orientation applied), refusing oversized files
    before decoding their pixels."""
    if len(data) > max_bytes:
        raise InputError(
            f"{what} is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.1f} MiB: "
            "send a smaller file (it is resized to the model's resolution anyway)",
            413,
        )
    if not data:
        raise InputError(f"{what} is empty: send a PNG or JPEG file")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - PIL raises many types; its text names internals, not the fix
        raise InputError(f"{what} cannot be decoded as an image: send a PNG, JPEG or WebP file") from None
    if img.format not in FORMATS:
        raise InputError(f"{what} is {img.format}; send one of {', '.join(FORMATS)}")
    w, h = img.size
    if w * h > max_pixels:
        raise InputError(
            f"{what} is {w}x{h} pixels; the limit is {max_pixels / 1e6:.1f} megapixels: downscale it first", 413
        )
    try:
        img.load()
        return to_8bit(ImageOps.exif_transpose(img))
    except Exception:  # noqa: BLE001 - truncated or corrupt data
        raise InputError(f"{what} cannot be decoded (truncated or corrupt): send a complete PNG or JPEG file") from None


def to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit grey images (``I;16*``, ``I``: 16-bit PNGs) as 8-bit ``L``, scaled.

    PIL's own ``convert("L")``/``convert("RGB")`` of these modes clips every value above 255,
    so a 16-bit PNG would come out white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    return img


def image_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: alpha onto white, centre-cropped, resized (antialiased)."""
    return to_tensor(load_image(img, size))[None]


def mask_tensor(mask: Image.Image, image_size: tuple[int, int], size: int) -> torch.Tensor:
    """(1, 1, size, size) fill mask in {0, 1}: white (>= 128) = fill, cropped like the image.

    A pixel of the result is filled if any mask pixel it covers is, so the hole never
    shrinks when the mask is downscaled.
    """
    if mask.size != image_size:
        raise InputError(
            f"mask is {mask.size[0]}x{mask.size[1]} but the image is {image_size[0]}x{image_size[1]}: "
            "send a mask of the image's size (white = fill, black = keep)"
        )
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        mask = Image.alpha_composite(Image.new("RGBA", mask.size, (0, 0, 0, 255)), mask.convert("RGBA"))
    hole = np.asarray(mask.convert("L")) >= 128
    w, h = mask.size
    s = min(w, h)
    top, left = (h - s) // 2, (w - s) // 2
    hole = torch.from_numpy(hole[top : top + s, left : left + s].copy()).float()[None, None]
    if s != size:
        hole = torch.nn.functional.adaptive_max_pool2d(hole, size) if s > size else _nearest(hole, size)
    return hole


def _nearest(x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, size=(size, size), mode="nearest")


def encode_png(x: torch.Tensor) -> bytes:
    """(3, H, W) in [-1, 1] to PNG bytes."""
    buf = io.BytesIO()
    to_pil(x).save(buf, format="PNG")
    return buf.getvalue()
