"""Sampler: step schedules, per-sample seeding (batch independence), callbacks, uint8 conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pid_batch.backbones.tensors import to_uint8
from pid_batch.config import DEFAULT_T_LIST, VARIANTS, tiny
from pid_batch.model import PidNet
from pid_batch.sampling import (
    initial_noise,
    per_sample_generators,
    sample,
    student_t_list,
)


@pytest.mark.parametrize(
    "steps, expected",
    [
        (1, [1.0, 0.0]),
        (2, [0.999, 0.634, 0.0]),
        (3, [0.999, 0.866, 0.342, 0.0]),
        (4, [0.999, 0.866, 0.634, 0.342, 0.0]),
        (
            8,
            [0.999, 0.999, 0.866, 0.634, 0.634, 0.634, 0.342, 0.0, 0.0],
        ),  # half-even: 1.5->2, 2.5->2
    ],
)
def test_student_t_list(steps, expected):
    assert student_t_list(DEFAULT_T_LIST, steps) == expected


def test_student_t_list_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps"):
        student_t_list(DEFAULT_T_LIST, 0)


@pytest.fixture(scope="module")
def tiny_setup():
    cfg = tiny(VARIANTS["v1p5_sr4x_c16"])
    torch.manual_seed(0)
    net = PidNet(cfg).eval()
    B, H, W = 3, 32, 64
    g = torch.Generator().manual_seed(1)
    caption = torch.randn(B, cfg.txt_max_length, cfg.txt_embed_dim, generator=g)
    lq = torch.randn(B, cfg.lq_latent_channels, H // 32, W // 32, generator=g)
    sigma = torch.tensor([0.0, 0.3, 0.6])
    return net, caption, lq, sigma, (3, H, W)


def _decode(net, caption, lq, sigma, shape, seeds):
    gens = per_sample_generators(seeds, "cpu")
    noise = initial_noise(gens, shape, "cpu")
    return sample(net, noise, caption, lq, sigma, student_t_list(), generator=gens)


def test_per_sample_seeds_make_batches_independent(tiny_setup):
    net, caption, lq, sigma, shape = tiny_setup
    seeds = [11, 22, 33]
    batch = _decode(net, caption, lq, sigma, shape, seeds)
    for i, seed in enumerate(seeds):
        alone = _decode(net, caption[i : i + 1], lq[i : i + 1], sigma[i : i + 1], shape, [seed])
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-6, rtol=0)
    # Reversing the batch reverses the images.
    rev = _decode(net, caption.flip(0), lq.flip(0), sigma.flip(0), shape, seeds[::-1])
    torch.testing.assert_close(rev.flip(0), batch, atol=1e-6, rtol=0)
    # Seeds matter (the test above is not vacuous).
    other = _decode(net, caption, lq, sigma, shape, [12, 22, 33])
    assert (other[0] - batch[0]).abs().max() > 0.1
    torch.testing.assert_close(other[1:], batch[1:], atol=1e-6, rtol=0)


def test_initial_noise_is_first_draw_and_renoising_continues_the_stream(tiny_setup):
    net, caption, lq, sigma, shape = tiny_setup
    noise = initial_noise(per_sample_generators([5], "cpu"), shape, "cpu")
    g = torch.Generator().manual_seed(5)
    assert torch.equal(noise[0], torch.randn(shape, generator=g))
    eps = [torch.randn(shape, generator=g)[None] for _ in range(3)]  # next draws, in order
    via_gen = sample(
        net, noise, caption[:1], lq[:1], sigma[:1], student_t_list(), generator=_advanced(5, shape)
    )
    via_list = sample(net, noise, caption[:1], lq[:1], sigma[:1], student_t_list(), step_noises=eps)
    assert torch.equal(via_gen, via_list)


def _advanced(seed: int, shape) -> list[torch.Generator]:
    """A per-sample generator that has already produced the initial noise."""
    g = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=g)
    return [g]


def test_single_generator_is_reproducible(tiny_setup):
    net, caption, lq, sigma, shape = tiny_setup
    noise = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    a = sample(
        net, noise, caption, lq, sigma, student_t_list(), generator=torch.Generator().manual_seed(7)
    )
    b = sample(
        net, noise, caption, lq, sigma, student_t_list(), generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1


def test_net_sees_the_right_times_and_callback_runs(tiny_setup):
    _, caption, lq, sigma, shape = tiny_setup
    seen_t, steps = [], []

    def fake_net(x, t, *cond):
        seen_t.append(t.tolist())
        return torch.zeros_like(x)

    noise = torch.randn(3, *shape)
    for n, expected in [(1, [1000.0]), (2, [999.0, 634.0]), (3, [999.0, 866.0, 342.0])]:
        seen_t.clear()
        steps.clear()
        sample(fake_net, noise, caption, lq, sigma, student_t_list(steps=n),
               callback=lambda k, t, x: steps.append((k, t)))  # fmt: skip
        assert [ts[0] for ts in seen_t] == expected and all(len(ts) == 3 for ts in seen_t)
        assert [k for k, _ in steps] == list(range(n))


def test_x0_update_in_float64_and_no_clamp_between_steps():
    x = torch.full((1, 3, 16, 16), 3.0)
    v = torch.full((1, 3, 16, 16), 0.5)
    states = []
    out = sample(lambda x_, t, *c: v, x, None, None, None, [0.999, 0.0],
                 callback=lambda k, t, s: states.append(s))  # fmt: skip
    expected = (
        torch.tensor(3.0, dtype=torch.float64)
        - torch.tensor(0.999, dtype=torch.float32).double() * 0.5
    )
    assert torch.equal(states[0], torch.full_like(x, expected.float().item()))  # unclamped (~2.5)
    assert torch.equal(out, torch.ones_like(x))


def test_bad_noise_arguments():
    x = torch.zeros(2, 3, 16, 16)
    net = lambda x_, t, *c: x_  # noqa: E731
    with pytest.raises(ValueError, match="got 1 generators for a batch of 2"):
        sample(
            net, x, None, None, None, student_t_list(), generator=per_sample_generators([1], "cpu")
        )
    with pytest.raises(ValueError, match="step noises"):
        sample(net, x, None, None, None, student_t_list(), step_noises=[x])


def test_to_uint8_truncates():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 1.7]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 7, 3)
    # (x + 1) * 127.5 = 0, 0.1275, 127.5, 191.25, 254.87, 255, (clamped) 255 -> truncated
    assert out[0, 0, :, 0].tolist() == [0, 0, 127, 191, 254, 255, 255]


def test_conditioning_runs_once_per_decode_not_per_step(tiny_setup):
    net, caption, lq, sigma, shape = tiny_setup
    calls = {"lq_proj": 0, "y_embedder": 0, "step": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1

        return hook

    handles = [
        net.lq_proj.register_forward_hook(count("lq_proj")),
        net.y_embedder.register_forward_hook(count("y_embedder")),
        net.s_embedder.register_forward_hook(count("step")),
    ]
    try:
        x = _decode(net, caption, lq, sigma, shape, seeds=[1, 2, 3])
    finally:
        for h in handles:
            h.remove()
    assert calls == {"lq_proj": 1, "y_embedder": 1, "step": 4}
    # ... and the images are those of a plain callable that recomputes everything per step.
    plain = _decode(lambda *a: net(*a), caption, lq, sigma, shape, seeds=[1, 2, 3])
    torch.testing.assert_close(x, plain, rtol=0, atol=1e-6)
