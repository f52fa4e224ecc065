"""Stage 4: quality on held-out images, and the files bundled with the package.

For each held-out image (centre square at `hr_size`): the ground truth, its 4x-downscaled view,
the autoencoder's latent of that view, and four reconstructions at full size — bicubic upscaling
of the true low-resolution image, bicubic upscaling of the autoencoder's own decode (what a user
gets without PiD), the teacher (Euler ODE) and the bundled 4-step student (the inference sampler).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pid_batch import codecs
from pid_batch.backbones.tensors import to_uint8
from pid_batch.config import DEFAULT_T_LIST
from pid_batch.model.demo_ae import DemoAutoencoder
from pid_batch.model.pid_net import PidNet
from pid_batch.sampling import per_sample_generators, sample, student_t_list
from pid_batch.train.common import null_caption
from pid_batch.train.data import SampleImage, centre_square, downscale, load_image, upscale
from pid_batch.train.teacher import euler_sample

METHODS = ("bicubic_true_lr", "bicubic_ae_decode", "teacher", "teacher_4step", "student")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def seam_ratio(img: np.ndarray, patch: int = 16) -> float:
    """How visible a `patch`-px grid is in a uint8 HxWx3 image (both axes, grey levels).

    Steps between neighbouring pixels fall into `patch` phases by their place on the grid (phase
    `patch - 1` crosses a grid line). The ratio is the mean |step| of the worst of the three
    phases at a grid line — the last step inside a patch, the step across the line, the first
    step of the next patch — divided by the median over all phases. A photo scores about 1; a
    mosaic (flat patches that jump at their borders) scores well above it, and so does a patch
    framed by a darker or brighter border, which a ratio of the crossing step alone misses.
    """
    grey = img.astype(np.float64).mean(axis=2)  # [H, W]
    per_phase = np.zeros(patch)
    for axis in (0, 1):
        d = np.abs(np.diff(grey, axis=axis))  # d[i] lies between pixel i and i + 1 on `axis`
        phase = np.arange(d.shape[axis]) % patch
        for o in range(patch):
            per_phase[o] += np.compress(phase == o, d, axis=axis).mean()
    border = per_phase[[patch - 2, patch - 1, 0]].max()
    return float(border / np.median(per_phase))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 HxWx3 images (scikit-image, Gaussian window, per channel)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=2, data_range=255, gaussian_weights=True))


@torch.no_grad()
def reconstruct(
    images: list[SampleImage],
    ae: DemoAutoencoder,
    student: PidNet,
    teacher: PidNet | None,
    hr_size: int = 256,
    teacher_steps: int = 16,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """uint8 [N, hr, hr, 3] per method, plus 'ground_truth' and 'ae_decode' (low resolution)."""
    hr = torch.stack([centre_square(load_image(i), hr_size) for i in images])  # [N, 3, S, S]
    lr = downscale(hr)
    lq = ae.encode(lr)
    sigma = torch.zeros(len(images))
    ae_dec = ae.decode(lq)
    out = {
        "ground_truth": to_uint8(hr),
        "ae_decode": to_uint8(ae_dec),
        "bicubic_true_lr": to_uint8(upscale(lr)),
        "bicubic_ae_decode": to_uint8(upscale(ae_dec)),
    }
    gens = per_sample_generators([seed + i for i in range(len(images))], "cpu")
    noise = torch.stack([torch.randn((3, hr_size, hr_size), generator=g) for g in gens])
    y = null_caption(student.cfg, len(images))
    ts = student_t_list(DEFAULT_T_LIST, 4)
    out["student"] = to_uint8(sample(student, noise, y, lq, sigma, ts, generator=gens))
    if teacher is not None:  # the undistilled teacher through the same 4-step sampler
        gens = per_sample_generators([seed + i for i in range(len(images))], "cpu")
        noise = torch.stack([torch.randn((3, hr_size, hr_size), generator=g) for g in gens])
        out["teacher_4step"] = to_uint8(sample(teacher, noise, y, lq, sigma, ts, generator=gens))
    if teacher is not None:
        gen = torch.Generator().manual_seed(seed)
        out["teacher"] = to_uint8(
            euler_sample(teacher, lq, sigma, (hr_size, hr_size), teacher_steps, gen)
        )
    return out


def quality_table(images: list[SampleImage], recon: dict[str, np.ndarray], patch: int = 16) -> dict:
    """PSNR/SSIM against the photo and seam ratio on the `patch` grid, per image and summarised
    (mean PSNR/SSIM, worst seam ratio), for every method present; the photos' own seam ratios."""
    gt = recon["ground_truth"]
    seams = [round(seam_ratio(g, patch), 3) for g in gt]
    table: dict = {"images": [i.name for i in images], "photo_seam_ratio": seams, "methods": {}}
    for m in METHODS:
        if m not in recon:
            continue
        p = [psnr(recon[m][i], gt[i]) for i in range(len(images))]
        s = [ssim(recon[m][i], gt[i]) for i in range(len(images))]
        r = [seam_ratio(recon[m][i], patch) for i in range(len(images))]
        table["methods"][m] = {
            "psnr_db": [round(v, 3) for v in p],
            "ssim": [round(v, 4) for v in s],
            "seam_ratio": [round(v, 3) for v in r],
            "mean_psnr_db": round(float(np.mean(p)), 3),
            "mean_ssim": round(float(np.mean(s)), 4),
            "worst_seam_ratio": round(max(r), 3),
        }
    return table


def contact_sheet(recon: dict[str, np.ndarray], path: Path) -> None:
    """One row per image: AE decode (nearest up) | bicubic | teacher | teacher 4-step | student | truth."""
    cols = ["ae_decode", "bicubic_ae_decode", "teacher", "teacher_4step", "student", "ground_truth"]
    cols = [c for c in cols if c in recon]
    n, s = recon["ground_truth"].shape[:2]
    rows = []
    for i in range(n):
        cells = []
        for c in cols:
            img = recon[c][i]
            if img.shape[0] != s:
                f = s // img.shape[0]
                img = img.repeat(f, axis=0).repeat(f, axis=1)
            cells.append(img)
        rows.append(np.concatenate(cells, axis=1))
    sheet = np.concatenate(rows, axis=0)
    path.write_bytes(codecs.encode_image(sheet, "png"))


def write_quality(table: dict, path: Path, notes: dict) -> None:
    """quality.json: the table plus how it was measured."""
    path.write_text(json.dumps({**notes, **table}, indent=2) + "\n")


def format_table(table: dict) -> str:
    """Markdown table of mean PSNR / SSIM and worst seam ratio per method."""
    lines = ["| method | PSNR (dB) | SSIM | worst seam ratio |", "|---|---|---|---|"]
    for m, v in table["methods"].items():
        seam = f"{v['worst_seam_ratio']:.2f}" if "worst_seam_ratio" in v else "not measured"
        lines.append(f"| {m} | {v['mean_psnr_db']:.2f} | {v['mean_ssim']:.4f} | {seam} |")
    lines.append(f"| photo | | | {max(table['photo_seam_ratio']):.2f} |")
    return "\n".join(lines)


def as_images(x: Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return to_uint8(x)
