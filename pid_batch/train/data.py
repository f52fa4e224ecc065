"""Training images for the demo decoder: freely licensed photos that scikit-image ships in its wheel.

Every image used is listed here with its licence, as stated in scikit-image's `skimage.data`
docstrings (scikit-image 0.26). Images without a stated licence in that package are not used.
Grey-scale images are repeated over the three channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class SampleImage:
    """One image file of `skimage/data` and the licence its docstring states."""

    name: str
    file: str
    licence: str


TRAIN_IMAGES = (
    SampleImage("astronaut", "astronaut.png", "public domain (NASA photo of Eileen Collins)"),
    SampleImage("rocket", "rocket.jpg", "public domain (SpaceX)"),
    SampleImage("hubble", "hubble_deep_field.jpg", "public domain (NASA)"),
    SampleImage("ihc", "ihc.png", "no known copyright restrictions"),
    SampleImage("retina", "retina.jpg", "CC0 1.0 (Wikimedia Commons)"),
    SampleImage("brick", "brick.png", "CC0 (CC0Textures)"),
    SampleImage("grass", "grass.png", "CC0 (CC0Textures)"),
    SampleImage("gravel", "gravel.png", "CC0 (CC0Textures)"),
    SampleImage("cell", "cell.png", "CC0"),
    SampleImage("clock", "clock_motion.png", "public domain (Stefan van der Walt)"),
    SampleImage("coins", "coins.png", "no known copyright restrictions"),
    SampleImage("text", "text.png", "public domain"),
)
# Never seen in training: the quality report is measured on these.
HELD_OUT_IMAGES = (
    SampleImage("chelsea", "chelsea.png", "CC0 (Stefan van der Walt)"),
    SampleImage("coffee", "coffee.png", "CC0 (Rachel Michetti)"),
    SampleImage("camera", "camera.png", "CC0 (Lav Varshney)"),
)

SR_SCALE = 4  # PiD output / autoencoder decode (docs/model.md#what-pid-decodes)


def skimage_data_dir() -> Path:
    """Folder of scikit-image's bundled sample images (the `train` extra installs it)."""
    try:
        import skimage
    except ImportError:
        raise ImportError(
            "training the demo decoder needs scikit-image: pip install 'pid-batch[train]'"
        ) from None
    return Path(skimage.__file__).parent / "data"


def load_image(image: SampleImage) -> Tensor:
    """[3, H, W] float32 in [-1, 1] (grey repeated to RGB, alpha dropped)."""
    from PIL import Image

    with Image.open(skimage_data_dir() / image.file) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


def load_images(images: tuple[SampleImage, ...]) -> list[Tensor]:
    """All images of a set, in memory ([3, H, W] each; the sets are a few MB)."""
    return [load_image(i) for i in images]


def downscale(hr: Tensor, factor: int = SR_SCALE) -> Tensor:
    """[B, 3, H, W] -> [B, 3, H/f, W/f]: antialiased bicubic, the low-resolution view PiD sees."""
    return F.interpolate(hr, scale_factor=1 / factor, mode="bicubic", antialias=True).clamp(-1, 1)


def upscale(lr: Tensor, factor: int = SR_SCALE) -> Tensor:
    """[B, 3, h, w] -> [B, 3, f h, f w] bicubic: the baseline a learned decoder must beat."""
    return F.interpolate(lr, scale_factor=factor, mode="bicubic").clamp(-1, 1)


def centre_square(image: Tensor, size: int) -> Tensor:
    """Largest centred square of [3, H, W], resized (antialiased) to [3, size, size]."""
    _, h, w = image.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = image[None, :, top : top + s, left : left + s]
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0].clamp(-1, 1)


class CropSampler:
    """Random square crops at random scale with flips: an endless stream of HR training images."""

    def __init__(self, images: list[Tensor], size: int, seed: int = 0, max_zoom_out: float = 3.0):
        if not images:
            raise ValueError("CropSampler needs at least one image")
        self.images = images
        self.size = size
        self.max_zoom_out = max_zoom_out
        self.gen = torch.Generator().manual_seed(seed)
        # Pick images in proportion to their area, so large photos give more crops.
        areas = torch.tensor([float(i.shape[1] * i.shape[2]) for i in images])
        self.weights = areas / areas.sum()

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.gen))

    def crop(self) -> Tensor:
        """One [3, size, size] crop in [-1, 1]."""
        image = self.images[int(torch.multinomial(self.weights, 1, generator=self.gen))]
        _, h, w = image.shape
        side = min(h, w)
        # Crop side between `size` (native pixels) and max_zoom_out * size, then resize to size.
        hi = min(float(side), self.max_zoom_out * self.size)
        s = int(round(self._uniform(min(self.size, side), max(hi, min(self.size, side)))))
        top = int(torch.randint(0, h - s + 1, (), generator=self.gen))
        left = int(torch.randint(0, w - s + 1, (), generator=self.gen))
        crop = image[None, :, top : top + s, left : left + s]
        if s != self.size:
            crop = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", antialias=True)
        if float(torch.rand((), generator=self.gen)) < 0.5:
            crop = crop.flip(-1)
        return crop[0].clamp(-1, 1)

    def batch(self, n: int) -> Tensor:
        """[n, 3, size, size]."""
        return torch.stack([self.crop() for _ in range(n)])
