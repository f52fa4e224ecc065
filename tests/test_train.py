"""pid_batch.train: each trainer learns on a fixed batch, resumes exactly, and round-trips checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from pid_batch.checkpoint import load_net, save_checkpoint
from pid_batch.config import VARIANTS, demo, tiny
from pid_batch.model.demo_ae import (
    AutoencoderConfig,
    DemoAutoencoder,
    load_autoencoder,
    save_autoencoder,
)
from pid_batch.model.pid_net import PidNet

pytest.importorskip("skimage", reason="the train extra (scikit-image) provides the sample photos")

from pid_batch.train import autoencoder as ae_train  # noqa: E402
from pid_batch.train import dmd, teacher  # noqa: E402
from pid_batch.train.common import null_caption, x0_regression_loss  # noqa: E402
from pid_batch.train.data import (  # noqa: E402
    HELD_OUT_IMAGES,
    TRAIN_IMAGES,
    CropSampler,
    downscale,
    load_image,
)
from pid_batch.train.evaluate import seam_ratio  # noqa: E402

TINY = tiny(VARIANTS["v1_sr4x_c16"])


def fit(loss, params, steps: int, lr: float) -> tuple[float, float]:
    """Adam on a fixed-batch loss closure; (loss before, loss after)."""
    opt = torch.optim.Adam(params, lr=lr)
    first = loss().item()
    for _ in range(steps):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
    return first, loss().item()


@pytest.fixture(scope="module")
def images():
    return [load_image(i) for i in TRAIN_IMAGES[:2]]


@pytest.fixture(scope="module")
def small_ae():
    torch.manual_seed(0)
    return DemoAutoencoder(AutoencoderConfig(widths=(8, 8, 16, 16))).eval()


def test_image_sets_are_disjoint_and_licensed():
    train = {i.file for i in TRAIN_IMAGES}
    held = {i.file for i in HELD_OUT_IMAGES}
    assert not train & held
    assert all(i.licence for i in TRAIN_IMAGES + HELD_OUT_IMAGES)
    img = load_image(HELD_OUT_IMAGES[0])
    assert img.shape[0] == 3 and -1 <= img.min() and img.max() <= 1


def test_crops_are_seeded_and_in_range(images):
    a = CropSampler(images, 64, seed=3).batch(3)
    b = CropSampler(images, 64, seed=3).batch(3)
    assert a.shape == (3, 3, 64, 64) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1


def test_autoencoder_loss_decreases_on_a_fixed_batch(images):
    torch.manual_seed(0)
    ae = DemoAutoencoder(AutoencoderConfig(widths=(8, 8, 16, 16)))
    x = downscale(CropSampler(images, 128, seed=0).batch(4))  # [4, 3, 32, 32]
    first, last = fit(lambda: ae_train.ae_loss(ae, x), ae.parameters(), steps=30, lr=2e-3)
    assert last < 0.7 * first


def test_autoencoder_round_trip_and_normalisation(tmp_path, small_ae):
    small_ae.latent_mean.fill_(0.5)
    small_ae.latent_std.fill_(2.0)
    path = tmp_path / "ae.safetensors"
    save_autoencoder(small_ae, path)
    back = load_autoencoder(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = back.encode(x)
    assert z.shape == (2, 16, 4, 4)
    torch.testing.assert_close(z, (small_ae.encode_raw(x) - 0.5) / 2.0)
    torch.testing.assert_close(back.decode(z), small_ae.decode(z))
    with pytest.raises(ValueError, match="multiple of 8"):
        back.encode(torch.zeros(1, 3, 30, 32))
    small_ae.latent_mean.zero_()
    small_ae.latent_std.fill_(1.0)


def test_teacher_loss_decreases_on_a_fixed_batch(images, small_ae):
    torch.manual_seed(0)
    net = PidNet(TINY)
    x0 = CropSampler(images, 64, seed=1).batch(4)
    lq, sigma = teacher.make_condition(small_ae, x0, torch.Generator().manual_seed(0))
    assert lq.shape == (4, 16, 2, 2) and sigma.shape == (4,) and sigma.max() <= 0.8

    def loss() -> torch.Tensor:  # same t and eps every call
        return teacher.flow_matching_loss(net, x0, lq, sigma, torch.Generator().manual_seed(5))

    first, last = fit(loss, net.parameters(), steps=15, lr=1e-3)
    assert last < 0.8 * first


def grey_rgb(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0, 255).astype(np.uint8)[..., None].repeat(3, axis=2)


def test_seam_ratio_sees_a_patch_grid_and_not_a_smooth_picture():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:128]
    smooth = 60 + 0.5 * xx + 0.4 * yy + rng.normal(0, 4, (128, 128))  # same steps everywhere
    tiles = rng.normal(0, 20, (8, 8)).repeat(16, axis=0).repeat(16, axis=1)  # a 16-px mosaic
    columns = rng.normal(0, 20, (1, 8)).repeat(16, axis=1)  # jumps across one axis only
    assert 0.9 < seam_ratio(grey_rgb(smooth)) < 1.1
    assert seam_ratio(grey_rgb(smooth + tiles)) > 2.0
    assert seam_ratio(grey_rgb(smooth + columns)) > 1.5
    assert seam_ratio(grey_rgb(smooth + tiles), patch=13) < 1.3  # not the grid it was made on


def test_seam_ratio_sees_patches_framed_by_a_dark_border():
    """A decoder trained to hide its seams drew the same dark line on both sides of every patch
    border: the step across the line vanishes, the steps into the frame do not."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:128]
    smooth = 60 + 0.5 * xx + 0.4 * yy + rng.normal(0, 4, (128, 128))
    edge = np.isin(np.arange(128) % 16, (0, 15))
    frames = np.where(edge[:, None] | edge[None, :], -20.0, 0.0)
    assert seam_ratio(grey_rgb(smooth + frames)) > 2.0
    assert seam_ratio(grey_rgb(smooth + frames), patch=13) < 1.3


def test_regression_step_term_penalises_a_mosaic_error_more_than_a_flat_one():
    x0 = torch.zeros(1, 3, 32, 32)
    flat = torch.full_like(x0, 0.2)  # same error everywhere
    signs = (
        torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat_interleave(16, 0).repeat_interleave(16, 1)
    )
    mosaic = 0.2 * signs.expand_as(x0)  # same squared error, jumps at the 16-px borders
    assert x0_regression_loss(flat, x0, 0.0) == pytest.approx(x0_regression_loss(mosaic, x0, 0.0))
    assert x0_regression_loss(flat, x0, 1.0) == pytest.approx(0.04)
    assert x0_regression_loss(mosaic, x0, 1.0) > 0.04 * 1.05


def test_dmd_gradient_is_zero_when_fake_equals_real_and_points_from_fake_to_real(images, small_ae):
    torch.manual_seed(0)
    real = PidNet(TINY).eval()
    hp = dmd.DistillTraining(hr_size=64, batch=2)
    x0 = CropSampler(images, 64, seed=2).batch(2)
    lq, sigma = teacher.make_condition(
        small_ae, x0, torch.Generator().manual_seed(0), augment=False
    )
    x = x0.clone().requires_grad_(True)
    dmd.dmd_loss(x, real, copy.deepcopy(real), lq, sigma, hp, torch.Generator().manual_seed(1))
    loss = dmd.dmd_loss(
        x, real, copy.deepcopy(real), lq, sigma, hp, torch.Generator().manual_seed(1)
    )
    assert loss.item() == 0.0
    fake = copy.deepcopy(real)
    with torch.no_grad():
        fake.final_layer.linear.bias.add_(0.5)  # fake's velocity +0.5 -> fake x0 lower by 0.5 t
    loss = dmd.dmd_loss(x, real, fake, lq, sigma, hp, torch.Generator().manual_seed(1))
    loss.backward()
    # d loss / d x0 = (fake_x0 - real_x0) * w / numel: negative, so descent raises x0 toward real.
    assert loss.item() > 0 and (x.grad < 0).float().mean() > 0.99


def test_fake_score_learns_the_students_outputs(images, small_ae):
    torch.manual_seed(0)
    fake = PidNet(TINY)
    generated = CropSampler(images, 64, seed=4).batch(2)
    lq, sigma = teacher.make_condition(small_ae, generated, torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        return teacher.flow_matching_loss(
            fake, generated, lq, sigma, torch.Generator().manual_seed(9)
        )

    first, last = fit(loss, fake.parameters(), steps=15, lr=1e-3)
    assert last < 0.8 * first


def test_student_steps_write_a_checkpoint_the_inference_path_loads(tmp_path, images, small_ae):
    torch.manual_seed(0)
    t = PidNet(TINY).eval()
    hp = dmd.DistillTraining(steps=2, batch=2, hr_size=64, save_every=1)
    path = dmd.train_student(t, small_ae, images, tmp_path / "s", hp, log=lambda m: None)
    student = load_net(path, TINY)  # strict: every key, every shape
    changed = [
        n
        for (n, a), b in zip(t.named_parameters(), student.parameters())
        if not torch.equal(a.bfloat16().float(), b)
    ]
    assert changed, "two DMD steps left the student equal to the teacher"
    assert (tmp_path / "s" / "state.pt").exists()


def test_autoencoder_training_resumes_exactly(tmp_path, images):
    hp = ae_train.AutoencoderTraining(steps=4, batch=2, lr_size=16, stats_batches=1, save_every=100)
    quiet = lambda m: None  # noqa: E731
    whole = ae_train.train_autoencoder(images, tmp_path / "a", hp, log=quiet)
    # Budget 0: one step, then a resumable stop; the rerun finishes the remaining steps.
    assert ae_train.train_autoencoder(images, tmp_path / "b", hp, max_minutes=0, log=quiet) is None
    split = ae_train.train_autoencoder(images, tmp_path / "b", hp, log=quiet)
    a, b = load_autoencoder(whole).state_dict(), load_autoencoder(split).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pid_checkpoint_round_trip_bf16(tmp_path):
    torch.manual_seed(0)
    cfg = demo(VARIANTS["v1_sr4x_c16"])
    net = PidNet(cfg).eval()
    path = tmp_path / "student.safetensors"
    save_checkpoint(net, path, dtype=torch.bfloat16)
    back = load_net(path, cfg)
    for (k, a), b in zip(net.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a.bfloat16().float(), b), k
    x = torch.randn(1, 3, 64, 64)
    y = null_caption(cfg, 1)
    args = (torch.full((1,), 500.0), y, torch.randn(1, 16, 2, 2), torch.zeros(1))
    assert back(x, *args).shape == (1, 3, 64, 64)


def test_inference_package_does_not_import_training():
    code = (
        "import sys, pid_batch.pipeline, pid_batch.decoder, pid_batch.demo, pid_batch.cli; "
        "bad = [m for m in sys.modules if m.startswith('pid_batch.train')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_student_training_resumes_exactly(tmp_path, images, small_ae):
    torch.manual_seed(0)
    t = PidNet(TINY).eval()
    hp = dmd.DistillTraining(steps=2, batch=1, hr_size=64, save_every=100)
    quiet = lambda m: None  # noqa: E731
    whole = dmd.train_student(t, small_ae, images, tmp_path / "a", hp, log=quiet)
    assert (
        dmd.train_student(t, small_ae, images, tmp_path / "b", hp, max_minutes=0, log=quiet) is None
    )
    split = dmd.train_student(t, small_ae, images, tmp_path / "b", hp, log=quiet)
    a, b = load_net(whole, TINY).state_dict(), load_net(split, TINY).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_forward_after_an_inference_decode_of_the_same_size():
    """Cached RoPE tables first built under inference_mode (a decoder) serve a trainer's forward."""
    from pid_batch.model.layers import _TABLE_CACHE

    _TABLE_CACHE.clear()
    torch.manual_seed(0)
    cfg = demo(VARIANTS["v1_sr4x_c16"])
    net = PidNet(cfg)
    args = (torch.full((1,), 500.0), null_caption(cfg, 1), torch.randn(1, 16, 2, 2), torch.zeros(1))
    with torch.inference_mode():
        net(torch.randn(1, 3, 64, 64), *args)
    net(torch.randn(1, 3, 64, 64), *args).square().mean().backward()
    assert net.final_layer.linear.weight.grad is not None


@pytest.mark.slow  # four 256² steps of the demo decoder on three photos
def test_bundled_quality_table_is_what_the_bundled_files_measure():
    """quality.json (printed by `pid-batch demo`, copied into README) re-measured from the
    bundled student and autoencoder: the student's and the baselines' rows agree."""
    import json

    from pid_batch.assets import DEMO_DIR, DEMO_FILES
    from pid_batch.train import evaluate
    from pid_batch.train.__main__ import demo_net_config

    cfg = demo_net_config()
    ae = load_autoencoder(DEMO_DIR / DEMO_FILES["autoencoder"])
    student = load_net(DEMO_DIR / DEMO_FILES["student"], cfg)
    recon = evaluate.reconstruct(list(HELD_OUT_IMAGES), ae, student, None)
    fresh = evaluate.quality_table(list(HELD_OUT_IMAGES), recon, cfg.patch_size)
    bundled = json.loads((DEMO_DIR / DEMO_FILES["quality"]).read_text())
    assert bundled["images"] == fresh["images"]
    assert bundled["photo_seam_ratio"] == fresh["photo_seam_ratio"]
    for method in ("bicubic_true_lr", "bicubic_ae_decode", "student"):
        b, f = bundled["methods"][method], fresh["methods"][method]
        assert b["mean_psnr_db"] == pytest.approx(f["mean_psnr_db"], abs=0.02), method
        assert b["worst_seam_ratio"] == pytest.approx(f["worst_seam_ratio"], abs=0.01), method


def test_student_regression_term_alone_pulls_its_output_toward_the_crops(
    tmp_path, images, small_ae
):
    torch.manual_seed(0)
    t = PidNet(TINY).eval()
    hp = dmd.DistillTraining(batch=2, hr_size=32, dmd_weight=0.0, reg_weight=1.0, lr_student=2e-3)
    x0 = CropSampler(images, 32, seed=11).batch(2)
    lq, sigma = teacher.make_condition(small_ae, x0, torch.Generator().manual_seed(0))

    def loss(net) -> float:
        with torch.no_grad():
            pred = dmd.student_x0(net, lq, sigma, (32, 32), 3, torch.Generator().manual_seed(4))
        return x0_regression_loss(pred, x0, hp.grad_weight).item()

    before = loss(t)
    hp = dataclasses.replace(hp, steps=10, ema_decay=0.0, save_every=100)  # EMA = last weights
    path = dmd.train_student(t, small_ae, images, tmp_path, hp, log=lambda m: None)
    assert loss(load_net(path, TINY)) < 0.9 * before
