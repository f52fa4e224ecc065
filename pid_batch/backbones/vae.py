"""The backbones' own VAEs: images -> PiD-form latents (image input) and latents -> images (baseline).

torch and diffusers are imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pid_batch.backbones import BACKBONES, FLUX2_BN_EPS, Backbone
from pid_batch.backbones import backbone as backbone_row

if TYPE_CHECKING:
    import torch

_MAX_BATCH = 8  # images per VAE call; bounds activation memory of 2k-px encodes on one GPU


def _vae_backbone(backbone: str) -> Backbone:
    """The backbone's table row; ValueError for RAE backbones, which have no diffusers VAE here."""
    row = backbone_row(backbone)
    if row.is_rae:
        vaes = sorted(b.name for b in BACKBONES.values() if not b.is_rae)
        raise ValueError(
            f"backbone {backbone!r} is an RAE (representation autoencoder): image input and the "
            "native baseline decode are not available for RAE backbones; pass its features as "
            f"latents instead. VAE backbones: {', '.join(vaes)}"
        )
    return row


def _vae_dir(path: str | Path) -> tuple[Path, str | None]:
    """(root, subfolder) of a VAE: a model folder with config.json, or a pipeline with vae/."""
    root = Path(path)
    if (root / "config.json").is_file():
        return root, None
    if (root / "vae" / "config.json").is_file():
        return root, "vae"
    raise ValueError(
        f"no diffusers VAE at {str(path)!r}: expected config.json + weights there, or a pipeline "
        "folder with vae/config.json"
    )


def _check_config(vae, name: str, where: str) -> None:
    """Raise if the VAE's config disagrees with the backbone's row of `pid_batch.backbones`."""
    conv, cfg = backbone_row(name), vae.config

    def fail(what: str, got, want) -> None:
        raise ValueError(f"{where}: {what} is {got!r}, but the {name} convention needs {want!r}")

    if name == "qwenimage":
        if cfg.z_dim != conv.raw_channels:
            fail("z_dim", cfg.z_dim, conv.raw_channels)
        if 2 ** len(cfg.temperal_downsample) != conv.vae_scale:
            fail("spatial factor", 2 ** len(cfg.temperal_downsample), conv.vae_scale)
        for key, want in (
            ("latents_mean", conv.latents_mean),
            ("latents_std", conv.latents_std),
        ):
            got = tuple(float(v) for v in cfg[key])
            if len(got) != len(want) or not np.allclose(got, want, rtol=0, atol=1e-6):
                fail(key, got, want)
        return
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if cfg.latent_channels != conv.raw_channels:
        fail("latent_channels", cfg.latent_channels, conv.raw_channels)
    if name == "flux2":
        if factor * 2 != conv.vae_scale:
            fail("spatial factor × 2×2 packing", factor * 2, conv.vae_scale)
        if tuple(cfg.patch_size) != (2, 2):
            fail("patch_size", tuple(cfg.patch_size), (2, 2))
        if not math.isclose(cfg.batch_norm_eps, FLUX2_BN_EPS):
            fail("batch_norm_eps", cfg.batch_norm_eps, FLUX2_BN_EPS)
        return
    if factor != conv.vae_scale:
        fail("spatial factor", factor, conv.vae_scale)
    shift = cfg.shift_factor if cfg.shift_factor is not None else 0.0
    if not math.isclose(cfg.scaling_factor, conv.scaling_factor, abs_tol=1e-6):
        fail("scaling_factor", cfg.scaling_factor, conv.scaling_factor)
    if not math.isclose(shift, conv.shift_factor, abs_tol=1e-6):
        fail("shift_factor", shift, conv.shift_factor)


def load_vae(path: str | Path, backbone: str, device="cpu", dtype=None):
    """Load a backbone's diffusers VAE from a local folder (model folder or pipeline with vae/)."""
    import diffusers
    import torch
    from diffusers.utils import is_accelerate_available

    row = _vae_backbone(backbone)
    name, cls_name = row.name, row.vae_class
    root, subfolder = _vae_dir(path)
    where = f"{name} VAE at {str(path)!r}"
    config = json.loads((root / (subfolder or "") / "config.json").read_text())
    found = config.get("_class_name")
    if found != cls_name:
        raise ValueError(
            f"{where}: config _class_name is {found!r}; the {name} VAE is {cls_name!r}"
        )
    cls = getattr(diffusers, cls_name)
    vae = cls.from_pretrained(
        str(root),
        subfolder=subfolder,
        local_files_only=True,
        torch_dtype=torch.float32,
        low_cpu_mem_usage=is_accelerate_available(),  # else diffusers warns and falls back
    )
    _check_config(vae, name, where)
    dtype = torch.float32 if dtype is None else dtype
    for child_name, child in vae.named_children():
        if child_name != "bn":  # Flux2 BN running stats stay fp32: they normalise the latents
            child.to(dtype=dtype)
    return vae.to(device=device).eval().requires_grad_(False)


def center_crop_box(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred crop to the largest multiple-of-`multiple` size."""
    h, w = (height // multiple) * multiple, (width // multiple) * multiple
    if h == 0 or w == 0:
        raise ValueError(
            f"image {height}×{width} (H×W) is smaller than the VAE's crop multiple {multiple}"
        )
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def resize_long_side(img: np.ndarray, long_side: int) -> np.ndarray:
    """H×W×3 uint8 → the same picture with its long side `long_side` px (Lanczos), aspect kept
    (short side rounded); returned unchanged when it already has that long side."""
    from PIL import Image

    h, w = img.shape[:2]
    if max(h, w) == long_side:
        return img
    scale = long_side / max(h, w)
    size = (
        (long_side, max(1, round(h * scale))) if w >= h else (max(1, round(w * scale)), long_side)
    )
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))


def _groups(shapes: Sequence[tuple], max_batch: int) -> list[list[int]]:
    """Indices grouped by equal shape (first-seen order), each group split into ≤ max_batch."""
    by_shape: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(i)
    return [
        idx[k : k + max_batch] for idx in by_shape.values() for k in range(0, len(idx), max_batch)
    ]


class VaeCodec:
    """One backbone's VAE: images -> PiD-form latents (`encode`), latents -> images (`decode`)."""

    def __init__(
        self,
        vae,
        backbone: str,
        crop_multiple: int | None = None,
        max_batch: int = _MAX_BATCH,
    ):
        self.conv = _vae_backbone(backbone)
        self.backbone = self.conv.name
        self.vae = vae
        step = self.conv.vae_scale  # flux2: 8× VAE × 2×2 packing = 16 px per PiD latent cell
        multiple = step if crop_multiple is None else int(crop_multiple)
        if multiple < step or multiple % step:
            raise ValueError(
                f"{self.backbone}: crop_multiple must be a positive multiple of {step}; got {crop_multiple!r}"
            )
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1; got {max_batch!r}")
        self._crop_multiple = multiple
        self.max_batch = int(max_batch)
        self.flux2_bn = None  # (running_mean, running_var) [128] fp32, flux2 only
        if self.backbone == "flux2":
            self.flux2_bn = (vae.bn.running_mean.float(), vae.bn.running_var.float())
        self._video = self.backbone == "qwenimage"  # Wan-style 3-D VAE: [B, C, T, H, W]
        self.last_encode_ms = 0.0  # wall time of the last encode() call (results are on the CPU)
        self.last_decode_ms = 0.0  # wall time of the last decode() call (results are on the CPU)

    @classmethod
    def from_path(cls, path: str | Path, backbone: str, device="cpu", dtype=None, **kwargs):
        """load_vae + VaeCodec."""
        return cls(load_vae(path, backbone, device=device, dtype=dtype), backbone, **kwargs)

    @property
    def crop_multiple(self) -> int:
        """Image sides are centre-cropped to multiples of this before encoding."""
        return self._crop_multiple

    @property
    def device(self):
        return next(self.vae.parameters()).device

    @property
    def dtype(self):
        return next(self.vae.encoder.parameters()).dtype

    def encode_raw(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> raw VAE posterior mean [B, C_raw, H/8, W/8] fp32."""
        x = pixels.to(device=self.device, dtype=self.dtype)
        if self._video:
            x = x.unsqueeze(2)  # [B, 3, 1, H, W]: one frame
        z = self.vae.encode(x).latent_dist.mean  # posterior mean, never a sample
        if self._video:
            z = z.squeeze(2)  # [B, C_raw, h, w]
        return z.float()

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent [B, C_raw, h, w] -> images [B, 3, 8h, 8w] in [-1, 1] fp32."""
        z = z.to(device=self.device, dtype=self.dtype)
        if self._video:
            z = z.unsqueeze(2)  # [B, C_raw, 1, h, w]
        x = self.vae.decode(z).sample
        if self._video:
            x = x.squeeze(2)  # [B, 3, H, W]
        return x.float().clamp(-1, 1)

    def _check_image(self, img, i: int) -> np.ndarray:
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(
                f"image {i}: expected an H×W×3 uint8 array; got dtype {img.dtype}, shape {img.shape}"
            )
        return img

    def encode(
        self, images: Sequence[np.ndarray]
    ) -> list[tuple[torch.Tensor, tuple[int, int, int, int]]]:
        """H×W×3 uint8 images -> [(PiD-form latent [C, h, w] fp32 on CPU, crop box (l, t, r, b))]."""
        import torch

        from pid_batch.backbones.tensors import normalize_vae_latent

        start = time.perf_counter()
        images = [self._check_image(img, i) for i, img in enumerate(images)]
        boxes = [center_crop_box(*img.shape[:2], self._crop_multiple) for img in images]
        crops = [
            img[top:bot, left:right]
            for img, (left, top, right, bot) in zip(images, boxes, strict=True)
        ]
        out: list = [None] * len(images)
        with torch.no_grad():  # not inference_mode: callers get ordinary tensors
            for idx in _groups([c.shape for c in crops], self.max_batch):
                # [B, H, W, 3] uint8 -> [B, 3, H, W] in [-1, 1]
                batch = torch.from_numpy(np.stack([crops[i] for i in idx])).to(self.device)
                pixels = batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0
                z = self.encode_raw(pixels)  # [B, C_raw, H/8, W/8]
                lat = normalize_vae_latent(z, self.backbone, flux2_bn=self.flux2_bn).cpu()
                for j, i in enumerate(idx):  # lat: [B, C, h, w]
                    out[i] = (lat[j].clone(), boxes[i])
        self.last_encode_ms = (time.perf_counter() - start) * 1e3
        return out

    def decode_float(self, pid_latents: Sequence) -> list[torch.Tensor]:
        """PiD-form latents [C, h, w] -> images [3, H, W] in [-1, 1] fp32 on CPU (native VAE decode)."""
        import torch

        from pid_batch.backbones.tensors import denormalize_vae_latent

        lats = [torch.as_tensor(x) for x in pid_latents]
        c = self.conv.channels
        for i, x in enumerate(lats):
            if x.dim() != 3 or x.shape[0] != c or min(x.shape) < 1:
                raise ValueError(
                    f"latent {i}: {self.backbone} decode needs [{c}, h, w]; got shape {tuple(x.shape)}"
                )
        out: list = [None] * len(lats)
        with torch.no_grad():
            for idx in _groups([x.shape for x in lats], self.max_batch):
                x = torch.stack([lats[i] for i in idx]).to(self.device, torch.float32)
                z = denormalize_vae_latent(x, self.backbone, flux2_bn=self.flux2_bn)  # raw
                images = self.decode_raw(z).cpu()  # [B, 3, H, W]
                for j, i in enumerate(idx):
                    out[i] = images[j].clone()
        return out

    def decode(self, pid_latents: Sequence) -> list[np.ndarray]:
        """PiD-form latents [C, h, w] -> H×W×3 uint8 images: the backbone's own decode (baseline)."""
        from pid_batch.backbones.tensors import to_uint8

        start = time.perf_counter()
        images = [to_uint8(x[None])[0] for x in self.decode_float(pid_latents)]
        self.last_decode_ms = (time.perf_counter() - start) * 1e3
        return images


def make_tiny_vae(dir: Path, backbone: str, seed: int = 0) -> Path:
    """Write a tiny random diffusers VAE of the backbone's class and latent width; return its folder."""
    import diffusers
    import torch

    conv = _vae_backbone(backbone)
    name = conv.name
    out = Path(dir) / f"tiny-vae-{name}"
    four = dict(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # 3 downsamplings: 8×
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=conv.raw_channels,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "qwenimage":
            vae = diffusers.AutoencoderKLQwenImage(
                base_dim=8, z_dim=conv.raw_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1
            )
        elif name == "flux2":
            vae = diffusers.AutoencoderKLFlux2(**four)
            # Non-trivial BN running stats so tests see the normalisation act.
            n = vae.bn.running_mean.numel()
            vae.bn.running_mean.copy_(0.1 * torch.randn(n))
            vae.bn.running_var.copy_(0.5 + torch.rand(n))
        else:
            vae = diffusers.AutoencoderKL(
                **four,
                scaling_factor=conv.scaling_factor,
                shift_factor=conv.shift_factor if name != "sdxl" else None,
                use_quant_conv=name == "sdxl",  # Flux1 / SD3 VAEs have no quant convs
                use_post_quant_conv=name == "sdxl",
            )
    vae.save_pretrained(str(out))
    return out
