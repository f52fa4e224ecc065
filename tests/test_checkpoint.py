"""Strict checkpoint loading: official layout round-trips; every kind of mismatch is rejected."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

# imported at collection: run() binds sys.stderr as its default log when first imported
from pid_batch import pipeline
from pid_batch.checkpoint import load_net, read_state_dict, save_checkpoint
from pid_batch.config import VARIANTS, tiny
from pid_batch.model import PidNet

CFG = tiny(VARIANTS["v1p5_sr4x_c16"])


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return PidNet(CFG).eval()


@pytest.fixture(scope="module")
def official_state(net):
    """The released file layout: `net.<key>` -> bf16 tensor."""
    return {f"net.{k}": v.detach().to(torch.bfloat16) for k, v in net.state_dict().items()}


def _assert_same_weights(loaded: torch.nn.Module, net: torch.nn.Module, dtype=torch.float32):
    ref = net.state_dict()
    got = loaded.state_dict()
    assert got.keys() == ref.keys()
    for k, v in got.items():
        assert v.dtype == dtype, k
        assert torch.equal(v, ref[k].to(torch.bfloat16).to(dtype)), k


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_load_round_trip(tmp_path, net, suffix):
    path = tmp_path / f"model_ema_bf16{suffix}"
    save_checkpoint(net, path)
    raw = torch.load(path, weights_only=True) if suffix == ".pth" else None
    if raw is not None:  # the official format: plain dict, net. prefix, bf16, 0-d log_alpha
        assert all(k.startswith("net.") and v.dtype == torch.bfloat16 for k, v in raw.items())
        assert raw["net.pit_lq_gate.log_alpha"].shape == ()
    loaded = load_net(path, CFG)
    _assert_same_weights(loaded, net)
    assert not loaded.training
    bf16 = load_net(path, CFG, dtype=torch.bfloat16)
    _assert_same_weights(bf16, net, torch.bfloat16)
    x = torch.randn(1, 3, 64, 64)
    args = (
        x,
        torch.full((1,), 999.0),
        torch.randn(1, 8, 24),
        torch.randn(1, 16, 2, 2),
        torch.zeros(1),
    )
    with torch.no_grad():
        rounded = PidNet(CFG).eval()
        rounded.load_state_dict(
            {k: v.to(torch.bfloat16).float() for k, v in net.state_dict().items()}
        )
        assert torch.equal(loaded(*args), rounded(*args))


def test_read_state_dict_strips_prefix_only(tmp_path, official_state):
    path = tmp_path / "m.pth"
    torch.save(official_state, path)
    state = read_state_dict(path)
    assert set(state) == {k.removeprefix("net.") for k in official_state}
    # Un-prefixed keys pass through unchanged (like the official loader).
    torch.save({k.removeprefix("net."): v for k, v in official_state.items()}, path)
    assert set(read_state_dict(path)) == set(state)


def _write(tmp_path: Path, state: dict, suffix=".pth") -> Path:
    path = tmp_path / f"bad{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_renamed_key_is_rejected(tmp_path, official_state, suffix):
    state = dict(official_state)
    state["net.final_layer.linear.weights"] = state.pop("net.final_layer.linear.weight")
    with pytest.raises(ValueError) as err:
        load_net(_write(tmp_path, state, suffix), CFG)
    msg = str(err.value)
    assert "missing keys: 1 (final_layer.linear.weight)" in msg
    assert "unexpected keys: 1 (final_layer.linear.weights)" in msg


def test_wrong_shape_is_rejected(tmp_path, official_state):
    state = dict(official_state)
    state["net.y_pos_embedding"] = torch.zeros(1, 9, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"y_pos_embedding: file \[1, 9, 32\] vs net \[1, 8, 32\]"):
        load_net(_write(tmp_path, state), CFG)


def test_missing_key_is_rejected(tmp_path, official_state):
    state = {k: v for k, v in official_state.items() if "lq_aux_rgb_head" not in k}
    with pytest.raises(ValueError, match=r"missing keys: 6 \(lq_proj.lq_aux_rgb_head.0.bias"):
        load_net(_write(tmp_path, state), CFG)


def test_wrong_variant_is_rejected(tmp_path, net):
    path = tmp_path / "m.pth"
    save_checkpoint(net, path)
    with pytest.raises(ValueError) as err:
        load_net(path, tiny(VARIANTS["v1_sr4x_c16"]))
    # v1.5 file into a v1 net: aux head (6) + pit_head (2) + pit_lq_gate (3) are extra, and the
    # per-token gates ([1, 2D]) do not fit the per-dim ones ([D, 2D]).
    assert "unexpected keys: 11 (lq_proj.lq_aux_rgb_head.0.bias" in str(err.value)
    assert (
        "shape mismatches: 4 (lq_proj.gate_modules.0.content_proj.bias: file [1] vs net [32]"
        in str(err.value)
    )


def test_training_state_prefixes_are_reported(tmp_path, official_state):
    state = {k.replace("net.", "net_ema.", 1): v for k, v in official_state.items()}
    with pytest.raises(ValueError, match="training-state prefixes"):
        load_net(_write(tmp_path, state), CFG)


class _Payload:
    """Unpickling this would create a file (stands in for arbitrary code execution)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickled_object_is_refused_and_not_executed(tmp_path, official_state):
    marker = tmp_path / "executed.txt"
    state = dict(official_state)
    state["net.extra"] = _Payload(marker)
    path = _write(tmp_path, state)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_net(path, CFG)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_state_dict(path)
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_non_dict_and_non_tensor_values_are_refused(tmp_path, official_state):
    with pytest.raises(ValueError, match="plain dict"):
        read_state_dict(_write(tmp_path, list(official_state.values())))
    with pytest.raises(ValueError, match="plain dict"):
        read_state_dict(_write(tmp_path, {"net.a": 1}))
    with pytest.raises(ValueError, match="suffix"):
        read_state_dict(tmp_path / "model.bin")


def test_sha256_is_verified(tmp_path, net):
    path = tmp_path / "m.pth"
    save_checkpoint(net, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    load_net(path, CFG, sha256=digest.upper())
    with pytest.raises(ValueError, match="sha256 .* does not match expected 0000"):
        load_net(path, CFG, sha256="0" * 64)


def _tampered_job(tmp_path: Path, key_to_rename: str | None):
    """A tiny flux job spec whose checkpoint has `key_to_rename` renamed (None: intact)."""
    from pid_batch import codecs
    from pid_batch.checkpoint import PREFIX
    from pid_batch.job import job_from_dict
    from pid_batch.sample_checks import net_config_for

    model = {"backbone": "flux", "ckpt_type": "2k", "preset": "tiny"}
    spec = job_from_dict({"input": "x", "output": "y", "model": model}).model.spec
    torch.manual_seed(0)
    state = {
        PREFIX + k: v.detach() for k, v in PidNet(net_config_for(spec, "tiny")).state_dict().items()
    }
    if key_to_rename is not None:
        state[PREFIX + key_to_rename + "_renamed"] = state.pop(PREFIX + key_to_rename)
    ckpt = tmp_path / "model.safetensors"
    save_file(state, str(ckpt))
    data = tmp_path / "latents"
    data.mkdir(exist_ok=True)
    (data / "s.safetensors").write_bytes(
        codecs.write_safetensors_shard(torch.zeros(2, 16, 8, 8).numpy(), ["a", "b"])
    )
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(
        f"input: {data}\noutput: {tmp_path / 'out'}\n"
        f"model: {{backbone: flux, ckpt_type: '2k', preset: tiny, checkpoint: {ckpt}}}\n"
    )
    return spec_file, sorted(state)[0][len(PREFIX) :]


def test_tampered_checkpoint_fails_on_the_driver_in_one_line(tmp_path, capsys, monkeypatch):
    from pid_batch import cli

    monkeypatch.setattr(pipeline, "ensure_ray", lambda *a, **k: pytest.fail("Ray was started"))
    _, first_key = _tampered_job(tmp_path, None)
    spec_file, _ = _tampered_job(tmp_path, first_key)
    assert cli.main(["run", str(spec_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and first_key in err, err
    assert not (tmp_path / "out").exists()  # no run.json, nothing under the output prefix


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_corrected_checkpoint_runs_after_a_refused_one(tmp_path, capsys, monkeypatch):
    from pid_batch import cli

    for k in ("RAY_ADDRESS",):
        monkeypatch.delenv(k, raising=False)
    _, first_key = _tampered_job(tmp_path, None)
    spec_file, _ = _tampered_job(tmp_path, first_key)
    assert cli.main(["run", str(spec_file)]) == 2
    spec_file, _ = _tampered_job(tmp_path, None)
    try:
        assert cli.main(["run", str(spec_file)]) == 0
    finally:
        import ray

        ray.shutdown()
    assert len(list((tmp_path / "out" / "images").iterdir())) == 2
