"""`python -m pid_batch.train STAGE --work DIR`: build the bundled demo decoder, resumably.

Stages: autoencoder, teacher, student, evaluate, bundle, or `all` (runs what is not done yet).
Each training stage checkpoints to DIR/<stage>/state.pt; `--max-minutes` stops a run cleanly and
the same command resumes it. Reproduce the bundled files: `python -m pid_batch.train all
--work runs/demo --bundle` (about 1-1.5 h on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pid_batch import codecs
from pid_batch.assets import DEMO_DIR, DEMO_FILES
from pid_batch.backbones import resolve_checkpoint
from pid_batch.checkpoint import load_net
from pid_batch.config import demo
from pid_batch.model.demo_ae import load_autoencoder
from pid_batch.train import evaluate
from pid_batch.train.autoencoder import AutoencoderTraining, train_autoencoder
from pid_batch.train.data import (
    HELD_OUT_IMAGES,
    TRAIN_IMAGES,
    centre_square,
    downscale,
    load_image,
    load_images,
)
from pid_batch.train.dmd import DistillTraining, train_student
from pid_batch.train.teacher import TeacherTraining, load_teacher, train_teacher

STAGES = ("autoencoder", "teacher", "student", "evaluate", "bundle", "all")
DEMO_BACKBONE, DEMO_CKPT_TYPE = "flux", "2k"  # the demo net is the demo preset of v1_sr4x_c16
SAMPLE_SIZE = 256  # output side of the bundled sample latents (8x8 latents)
SAMPLE_IMAGES = HELD_OUT_IMAGES + TRAIN_IMAGES[:3]


def demo_net_config():
    return demo(resolve_checkpoint(DEMO_BACKBONE, DEMO_CKPT_TYPE).net_config)


def _override(hp, pairs: list[str]):
    """Apply KEY=VALUE overrides to a hyper-parameter dataclass (type from the default)."""
    changes = {}
    names = {f.name: f for f in dataclasses.fields(hp)}
    for item in pairs:
        key, _, value = item.partition("=")
        if key not in names:
            continue
        changes[key] = type(getattr(hp, key))(value)
    return dataclasses.replace(hp, **changes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pid_batch.train", description=__doc__)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--work", type=Path, required=True, help="folder for states and results")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a hyper-parameter of the stage(s) run, e.g. steps=200",
    )
    p.add_argument("--bundle", action="store_true", help="with 'all': copy results to the package")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_evaluate(work: Path) -> dict:
    """Held-out PSNR/SSIM/seam ratio of the student (bf16 weights, as bundled) and teacher, and
    the contact sheet."""
    cfg = demo_net_config()
    ae = load_autoencoder(work / "autoencoder" / "autoencoder.safetensors")
    student = load_net(work / "student" / "student.safetensors", cfg)
    teacher = load_teacher(work / "teacher" / "teacher.safetensors", cfg)
    recon = evaluate.reconstruct(list(HELD_OUT_IMAGES), ae, student, teacher)
    table = evaluate.quality_table(list(HELD_OUT_IMAGES), recon, cfg.patch_size)
    evaluate.contact_sheet(recon, work / "held_out_sheet.png")
    notes = {
        "what": "held-out images (never trained on), centre square at 256x256; PiD decodes the "
        "demo autoencoder's latent of the 4x-downscaled image (8x8x16), sigma 0, empty caption",
        "student": "4-step SDE sampler of pid_batch.sampling, bf16 weights as bundled, seeds 0..",
        "teacher": "Euler ODE, 16 steps",
        "teacher_4step": "the teacher through the student's 4-step SDE sampler (no distillation)",
        "bicubic_ae_decode": "bicubic 4x of the autoencoder's own decode (no PiD)",
        "bicubic_true_lr": "bicubic 4x of the true low-resolution image (no autoencoder loss)",
        "seam_ratio": "mean |step| between neighbouring grey levels at the 16-px patch grid (worst "
        "of: last step inside a patch, step across the line, first step of the next patch) / the "
        "median over the 16 step phases; a photo is about 1, a mosaic or framed patches above",
        "command": "python -m pid_batch.train evaluate --work <dir>",
    }
    evaluate.write_quality(table, work / "quality.json", notes)
    log("held-out quality:\n" + evaluate.format_table(table))
    return table


def write_samples(work: Path) -> Path:
    """The bundled sample shard: latents of SAMPLE_IMAGES at SAMPLE_SIZE output, empty captions."""
    ae = load_autoencoder(work / "autoencoder" / "autoencoder.safetensors")
    hr = torch.stack([centre_square(load_image(i), SAMPLE_SIZE) for i in SAMPLE_IMAGES])
    with torch.no_grad():
        lq = ae.encode(downscale(hr)).numpy().astype(np.float32)
    held = {i.name for i in HELD_OUT_IMAGES}
    ids = [f"{'heldout' if i.name in held else 'train'}-{i.name}" for i in SAMPLE_IMAGES]
    data = codecs.write_safetensors_shard(
        lq, ids, captions=[""] * len(ids), backbone=DEMO_BACKBONE, latent_format="pid"
    )
    path = work / DEMO_FILES["samples"]
    path.write_bytes(data)
    return path


def bundle(work: Path) -> None:
    """Copy the student, autoencoder, sample shard and quality table into pid_batch/assets/demo."""
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    sources = {
        "student": work / "student" / "student.safetensors",
        "autoencoder": work / "autoencoder" / "autoencoder.safetensors",
        "samples": write_samples(work),
        "quality": work / "quality.json",
    }
    for name, src in sources.items():
        shutil.copyfile(src, DEMO_DIR / DEMO_FILES[name])
        log(f"bundled {DEMO_DIR / DEMO_FILES[name]} ({src.stat().st_size / 1e6:.2f} MB)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    stages = (
        [args.stage]
        if args.stage != "all"
        else list(STAGES[:4]) + (["bundle"] if args.bundle else [])
    )
    deadline = None if args.max_minutes is None else time.monotonic() + args.max_minutes * 60

    def left() -> float | None:
        return None if deadline is None else max(0.0, (deadline - time.monotonic()) / 60)

    images = None
    cfg = demo_net_config()
    for stage in stages:
        if stage in ("autoencoder", "teacher", "student") and images is None:
            images = load_images(TRAIN_IMAGES)
        if stage == "autoencoder":
            hp = _override(AutoencoderTraining(), args.set)
            done = train_autoencoder(images, work / "autoencoder", hp, left(), log)
        elif stage == "teacher":
            ae = load_autoencoder(work / "autoencoder" / "autoencoder.safetensors")
            hp = _override(TeacherTraining(), args.set)
            done = train_teacher(cfg, ae, images, work / "teacher", hp, left(), log)
        elif stage == "student":
            ae = load_autoencoder(work / "autoencoder" / "autoencoder.safetensors")
            teacher = load_teacher(work / "teacher" / "teacher.safetensors", cfg)
            hp = _override(DistillTraining(), args.set)
            done = train_student(teacher, ae, images, work / "student", hp, left(), log)
        elif stage == "evaluate":
            done = run_evaluate(work)
        else:
            bundle(work)
            done = True
        if done is None:
            log(f"stopped inside stage {stage!r}; run the same command again to resume")
            return 3
    (work / "done.json").write_text(json.dumps({"stages": stages}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
