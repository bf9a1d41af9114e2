"""Small in-memory image sets for local training, tests and demos.

The sharded, streaming path for real training is ``pipelines/`` (Ray Data); this module
holds what the model library needs on its own: image decoding to the training range and
a handful of real captioned images shipped with the package (``mdm/assets/emoji``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .conditioning import TextEncoder, make_condition
from .config import MDMConfig
from .diffusion import image_pyramid
from .training import Batch

__all__ = [
    "ASSETS",
    "load_image",
    "to_tensor",
    "to_pil",
    "make_grid",
    "load_captioned_folder",
    "demo_images",
    "InMemoryImageSet",
]

ASSETS = Path(__file__).parent / "assets"


def load_image(source: str | Path | bytes | Image.Image, size: int | None = None) -> Image.Image:
    """Decode to RGB (EXIF orientation applied, alpha onto white), centre-crop and resize."""
    if isinstance(source, Image.Image):
        img = source
    else:
        import io

        try:
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            img.load()
        except Exception as e:  # noqa: BLE001 - PIL raises many types
            raise ValueError(f"cannot decode image: {e}") from e
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "P", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    img = img.convert("RGB")
    if size is not None:
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != size:
            img = img.resize((size, size), Image.Resampling.LANCZOS)
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    arr = np.array(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [-1, 1] -> PIL RGB."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def load_captioned_folder(folder: str | Path, size: int) -> tuple[torch.Tensor, list[str]]:
    """Images of a folder with captions from ``captions.json`` ({"images": {file: caption}})
    or ``<name>.txt`` sidecars; returns (N, 3, size, size) in [-1, 1] and the captions."""
    folder = Path(folder)
    captions: dict[str, str] = {}
    meta = folder / "captions.json"
    if meta.exists():
        data = json.loads(meta.read_text())
        captions = data.get("images", data)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise FileNotFoundError(f"no images (.png/.jpg/.webp) in {folder}")
    images, texts = [], []
    for p in files:
        images.append(to_tensor(load_image(p, size)))
        side = p.with_suffix(".txt")
        texts.append(captions.get(p.name) or (side.read_text().strip() if side.exists() else ""))
    return torch.stack(images), texts


def demo_images(size: int = 128) -> tuple[torch.Tensor, list[str]]:
    """The 16 captioned emoji shipped with the package (MIT, see assets/emoji/LICENSE.md)."""
    return load_captioned_folder(ASSETS / "emoji", size)


class InMemoryImageSet:
    """Random batches from a small tensor of images with captions (or labels).

    Captions are encoded once with the frozen text encoder; each batch carries the image
    pyramid for the model's resolutions.
    """

    def __init__(
        self,
        images: torch.Tensor,
        config: MDMConfig,
        captions: Sequence[str] | None = None,
        labels: Sequence[int] | None = None,
        encoder: TextEncoder | None = None,
    ):
        self.config = config
        res = config.model.resolutions
        top = res[-1]
        if images.shape[-1] != top:
            images = torch.nn.functional.interpolate(
                images, size=(top, top), mode="bilinear", antialias=True, align_corners=False
            )
        self.pyramid = image_pyramid(images, res)
        n = images.shape[0]
        kind = config.model.conditioning.kind
        self.cond = make_condition(
            config.model.conditioning,
            n,
            prompts=list(captions) if (kind == "text" and captions is not None) else None,
            labels=list(labels) if (kind == "class" and labels is not None) else None,
            source_size=float(top),
            encoder=encoder,
        )
        self.n = n

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(0, self.n, (batch_size,), generator=g)
            yield Batch([x[idx] for x in self.pyramid], self.cond.select(idx))


def make_grid(
    images: torch.Tensor, nrow: int | None = None, pad: int = 2, upscale_to: int | None = None
) -> Image.Image:
    """Tile (N, 3, H, W) images in [-1, 1] into one white-padded picture.

    ``upscale_to`` enlarges small images (nearest neighbour) so grids of every resolution
    show at one size.
    """
    n, _, h, w = images.shape
    if upscale_to is not None and h < upscale_to:
        f = upscale_to // h
        images = images.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
        h, w = h * f, w * f
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / nrow))
    canvas = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas.paste(to_pil(images[i]), (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas
