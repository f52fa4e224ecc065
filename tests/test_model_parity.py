"""Checkpoint-exact parity with the official PiD code (fixtures in tests/data, fp32 CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pid_batch.config import NetConfig
from pid_batch.model import LQProjection, PidNet, build_net
from pid_batch.sampling import sample

FULL = ["tiny_v1", "tiny_v1p5", "tiny_v1p5_flux2"]
LQ_ONLY = ["lqproj_ratio4_flux2v1", "lqproj_ratio8_siglip"]
TOL = dict(atol=1e-4, rtol=1e-4)


def _load(data_dir, name):
    meta = json.loads((data_dir / f"{name}.json").read_text())
    return meta, load_file(str(data_dir / f"{name}.safetensors"))


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = actual.reshape(expected.shape)
    diff = (actual - expected).abs().max().item()
    print(f"{name}: max|d| = {diff:.2e}")
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{name}: {m}")
    return diff


def _fixture(data_dir, name):
    meta, tensors = _load(data_dir, name)
    net = build_net(meta["effective_constructor_kwargs"]).eval()
    state = {k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")}
    net.load_state_dict(state, strict=True)  # raises on any missing/unexpected key
    return name, meta, tensors, net


@pytest.fixture(scope="module", params=FULL)
def fixture_net(request, data_dir):
    return _fixture(data_dir, request.param)


def test_constructor_kwargs_and_effective_agree(fixture_net):
    _, meta, _, net = fixture_net
    assert NetConfig.from_kwargs(meta["constructor_kwargs"]) == net.cfg
    n_params = sum(p.numel() for p in net.parameters())
    expected = {"tiny_v1": 1_193_669, "tiny_v1p5": 1_228_809, "tiny_v1p5_flux2": 1_231_113}
    assert n_params == expected[meta["fixture"]]


def test_forward_and_intermediates(fixture_net):
    name, _, T, net = fixture_net
    seen: dict[str, object] = {}

    def keep(key):
        return lambda _m, _i, out: seen.__setitem__(key, out)

    net.t_embedder.register_forward_hook(keep("t_emb"))
    net.y_embedder.register_forward_hook(keep("y_embedder_out"))
    net.s_embedder.register_forward_hook(keep("s_embedder_out"))
    net.lq_proj.register_forward_hook(keep("lq"))
    net.pixel_embedder.register_forward_hook(keep("pixel_embedder_out"))
    net.pixel_blocks[0].register_forward_hook(keep("pixel_block0_out"))
    for i, block in enumerate(net.patch_blocks):
        block.register_forward_hook(keep(f"block{i}"))
    if net.pit_lq_gate is not None:
        net.pit_lq_gate.register_forward_hook(keep("pit_gate_out"))
    with torch.no_grad():
        out = net(
            T["inputs.x_t"],
            T["inputs.t"],
            T["inputs.caption_embs"],
            T["inputs.lq_latent"],
            T["inputs.degrade_sigma"],
        )
    # Pipeline order, so the first failure localises a bug.
    for key in ("t_emb", "y_embedder_out", "s_embedder_out", "pixel_embedder_out"):
        if f"intermediates.{key}" in T:
            _close(f"{name}/{key}", seen[key], T[f"intermediates.{key}"])
    feats = seen["lq"]
    n_out = net.cfg.num_lq_outputs
    for k in range(n_out):
        _close(f"{name}/lq_feature.{k}", feats[k], T[f"intermediates.lq_feature.{k}"])
    if net.cfg.pit_lq_inject:
        assert len(feats) == n_out + 1
        _close(f"{name}/lq_feature.pit", feats[-1], T["intermediates.lq_feature.pit"])
    depth = net.cfg.patch_depth
    for i in range(depth):
        img, txt = seen[f"block{i}"]
        _close(f"{name}/patch_block{i}.img", img, T[f"intermediates.patch_block{i}_out.img"])
        if i < depth - 1:  # the last block's text output is never used, so it is not computed
            _close(f"{name}/patch_block{i}.txt", txt, T[f"intermediates.patch_block{i}_out.txt"])
    if "pit_gate_out" in seen:
        _close(f"{name}/pit_gate_out", seen["pit_gate_out"], T["intermediates.pit_gate_out"])
    _close(f"{name}/pixel_block0", seen["pixel_block0_out"], T["intermediates.pixel_block0_out"])
    diff = _close(f"{name}/net_out", out, T["outputs.net_out"])
    assert diff < 1e-5  # measured ~1-2e-6; well below the 1e-4 fixture tolerance


def test_sampler_replay(fixture_net):
    name, meta, T, net = fixture_net
    t_list = T["sampler.t_list"].tolist()
    assert t_list == pytest.approx(meta["student_t_list"])
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    states: dict[int, torch.Tensor] = {}

    def recording_net(x, t, *cond):
        calls.append((x.clone(), t.clone()))
        return net(x, t, *cond)

    out = sample(
        recording_net,
        T["sampler.noise_init"],
        T["inputs.caption_embs"],
        T["inputs.lq_latent"],
        T["inputs.degrade_sigma"],
        t_list,
        step_noises=[T[f"sampler.step_noise.{k}"] for k in range(3)],
        callback=lambda k, t, x: states.__setitem__(k, x),
        timescale=meta["timescale"],
    )
    assert len(calls) == 4
    for k, (x_in, t_in) in enumerate(calls):
        assert torch.equal(t_in, T[f"sampler.step{k}.t_in"])  # 999, 866, 634, 342 exactly
        if k:
            _close(f"{name}/step{k}.x_in", x_in, T[f"sampler.step{k}.x_in"])
    _close(f"{name}/x0_final_unclamped", states[3], T["sampler.x0_final_unclamped"])
    _close(f"{name}/sampler.output", out, T["sampler.output"])


def test_sampler_single_steps_from_fixture_inputs(fixture_net):
    """Per-step check: feeding the reference x_in of step k reproduces x_in of step k+1."""
    name, _, T, net = fixture_net
    t_list = T["sampler.t_list"].tolist()
    for k in (1, 2):
        x = sample(
            net,
            T[f"sampler.step{k}.x_in"],
            T["inputs.caption_embs"],
            T["inputs.lq_latent"],
            T["inputs.degrade_sigma"],
            t_list[k : k + 2],
            step_noises=[T[f"sampler.step_noise.{k}"]],
        )
        ref = T[f"sampler.step{k + 1}.x_in"]
        # sample() clamps; compare where the reference is inside (-1, 1)
        inside = ref.abs() < 1
        _close(f"{name}/step{k}->{k + 1}", x[inside], ref[inside])


def _lq_from_kwargs(kw: dict) -> LQProjection:
    """Map official LQProjection2D constructor arguments onto LQProjection."""
    assert kw["in_channels"] == 0 and kw["lq_aux_rgb_head_latent_block_idx"] == -1
    f = kw["latent_unpatchify_factor"]
    ratio = kw["sr_scale"] * (kw["latent_spatial_down_factor"] // f) // kw["patch_size"]
    return LQProjection(
        latent_channels=kw["latent_channels"],
        hidden_dim=kw["hidden_dim"],
        out_dim=kw["out_dim"],
        num_outputs=kw["num_outputs"],
        gate_type=kw["gate_type"],
        ratio=ratio,
        unpatchify_factor=f,
        num_res_blocks=kw["num_res_blocks"],
        padding_mode=kw["conv_padding_mode"],
        pit_output=kw["pit_output"],
        aux_rgb_head=kw["lq_aux_rgb_head"],
    )


@pytest.mark.parametrize("name", LQ_ONLY)
def test_lq_projection_and_gates(data_dir, name):
    meta, T = _load(data_dir, name)
    lq = _lq_from_kwargs(meta["effective_constructor_kwargs"]).eval()
    state = {k.removeprefix("lq_proj."): v for k, v in T.items() if k.startswith("lq_proj.")}
    lq.load_state_dict(state, strict=True)
    hs, ws = (n // 16 for n in meta["output_hw"])
    latent, x_tokens, sigma = T["inputs.lq_latent"], T["inputs.x_tokens"], T["inputs.degrade_sigma"]
    with torch.no_grad():
        aligned = lq.align(latent, hs, ws)
        feats = lq(latent, hs, ws)
        gated = [lq.gate_modules[k](x_tokens, feats[k], sigma) for k in range(len(feats))]
    assert torch.equal(aligned, T["intermediates.latent_aligned"])  # pure replication
    for k in range(meta["effective_constructor_kwargs"]["num_outputs"]):
        _close(f"{name}/lq_feature.{k}", feats[k], T[f"outputs.lq_feature.{k}"])
        _close(f"{name}/gated.{k}", gated[k], T[f"outputs.gated.{k}"])


def test_lq_latent_grid_mismatch_is_rejected(fixture_net):
    _, _, T, net = fixture_net
    x = T["inputs.x_t"]
    bigger = torch.zeros(*x.shape[:2], x.shape[2] + 16, x.shape[3])
    with pytest.raises(ValueError, match="patch grid"), torch.no_grad():
        net(
            bigger,
            T["inputs.t"],
            T["inputs.caption_embs"],
            T["inputs.lq_latent"],
            T["inputs.degrade_sigma"],
        )


def _fixture_args(T):
    keys = ("x_t", "t", "caption_embs", "lq_latent", "degrade_sigma")
    return [T[f"inputs.{k}"] for k in keys]


def test_bf16_autocast_and_weight_dtype_rules(fixture_net):
    _, _, T, net = fixture_net
    ref = T["outputs.net_out"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(*_fixture_args(T))
    assert out.dtype == torch.bfloat16  # like the reference: velocity leaves the net as bf16
    assert 1e-3 < (out.float() - ref).abs().max() < 0.15  # bf16-level, not fp32-exact
    bf16 = PidNet(net.cfg).eval().to(torch.bfloat16)
    bf16.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match="need torch.autocast"), torch.no_grad():
        bf16(*_fixture_args(T))


@pytest.mark.slow  # torch.compile (dynamo tracing, eager backend): ~2-4 s
def test_traces_as_one_graph(data_dir):
    """torch.compile-friendly: dynamo captures the whole forward without graph breaks."""
    name, _, T, net = _fixture(data_dir, "tiny_v1p5_flux2")  # the path with every feature
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(*_fixture_args(T))
    _close(f"{name}/compiled net_out", out, T["outputs.net_out"])


def test_position_tables_are_cached_per_grid(fixture_net):
    _, _, _, net = fixture_net
    cpu = torch.device("cpu")
    first = net.rope_tables(4, 6, 8, cpu)
    again = net.rope_tables(4, 6, 8, cpu)
    assert all(a is b for a, b in zip(first, again, strict=True) if a is not None)
    other = net.rope_tables(6, 4, 8, cpu)
    assert other[0] is not first[0] and other[0].shape == first[0].shape
    assert not torch.equal(other[0], first[0])  # per-axis positions/bases differ
