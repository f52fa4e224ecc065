"""Strict loading (and writing) of PiD checkpoints: `.pth` (model_ema_bf16) and `.safetensors`.

Key fix-ups applied on read — this is the complete list:
  1. a leading `net.` prefix is stripped (the released files store `net.<PidNet key>`);
     un-prefixed keys pass through unchanged (as in the official loader).
Keys starting with `net_ema.`, `fake_score.` or `discriminator.` (training-state dumps) are NOT
silently dropped as the official loader does: they are reported as unexpected, because a file
holding only those would otherwise load nothing. Tensors are cast to the requested dtype after
loading (files are bf16; the official code runs fp32 weights under bf16 autocast).
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from pid_batch.config import NetConfig
from pid_batch.model.pid_net import PidNet

PREFIX = "net."
TRAINING_PREFIXES = ("net_ema.", "fake_score.", "discriminator.")
_SHOW = 5  # keys listed per category in error messages


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _load_pth(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to unpickle {path}: it holds objects other than tensors and plain "
            f"containers (torch.load weights_only=True rejected it: {str(err).splitlines()[0]})"
        ) from err
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise ValueError(
            f"{path}: expected a plain dict of str -> Tensor, got {type(obj).__name__}"
        )
    return obj


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # memory-mapped reads


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a `.pth`/`.pt` or `.safetensors` checkpoint into a `PidNet` state dict (prefix stripped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        raw = _load_safetensors(path)
    elif path.suffix in (".pth", ".pt"):
        raw = _load_pth(path)
    else:
        raise ValueError(
            f"{path}: unknown checkpoint suffix {path.suffix!r} (.pth, .pt, .safetensors)"
        )
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if name in out:
            raise ValueError(f"{path}: key {name!r} occurs both with and without the 'net.' prefix")
        out[name] = value
    return out


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > _SHOW else ''})"


def check_state_dict(state: dict[str, Tensor], expected: dict[str, torch.Size]) -> None:
    """Raise ValueError naming missing, unexpected and shape-mismatched keys (a few of each + counts)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: file {list(state[k].shape)} vs net {list(expected[k])}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k])
    )
    if not (missing or unexpected or mismatched):
        return
    lines = ["checkpoint does not match the network:"]
    if missing:
        lines.append(f"  missing keys: {_listing(missing)}")
    if unexpected:
        note = ""
        if any(k.startswith(TRAINING_PREFIXES) for k in unexpected):
            note = " [training-state prefixes net_ema./fake_score./discriminator. are not loaded]"
        lines.append(f"  unexpected keys: {_listing(unexpected)}{note}")
    if mismatched:
        lines.append(f"  shape mismatches: {_listing(mismatched)}")
    raise ValueError("\n".join(lines))


def load_net(
    path: str | Path,
    cfg: NetConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    sha256: str | None = None,
) -> PidNet:
    """Build `PidNet(cfg)` on meta, strictly assign the file's tensors (mmap'd), cast to dtype/device."""
    if sha256 is not None:
        actual = sha256_file(path)
        if actual.lower() != sha256.lower():
            raise ValueError(f"{path}: sha256 {actual} does not match expected {sha256}")
    state = read_state_dict(path)
    with torch.device("meta"):
        net = PidNet(cfg)
    check_state_dict(state, {k: v.shape for k, v in net.state_dict().items()})
    net.load_state_dict(state, strict=True, assign=True)
    del state
    return net.to(device=device, dtype=dtype).eval()


def save_checkpoint(
    net: torch.nn.Module, path: str | Path, dtype: torch.dtype = torch.bfloat16
) -> None:
    """Write the official layout: dict of `net.<key>` tensors in `dtype` (torch.save or safetensors)."""
    path = Path(path)
    state = {
        PREFIX + k: v.detach().to(device="cpu", dtype=dtype).contiguous()
        for k, v in net.state_dict().items()
    }
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif path.suffix in (".pth", ".pt"):
        torch.save(state, path)
    else:
        raise ValueError(
            f"{path}: unknown checkpoint suffix {path.suffix!r} (.pth, .pt, .safetensors)"
        )


def _shapes_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt", device="cpu") as f:  # header only
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def file_shapes(path: str | Path) -> dict[str, torch.Size]:
    """Key → shape of a checkpoint without reading its tensors (safetensors header / mmap'd .pth)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        raw = _shapes_safetensors(path)
        return {(k[len(PREFIX) :] if k.startswith(PREFIX) else k): v for k, v in raw.items()}
    return {k: v.shape for k, v in read_state_dict(path).items()}  # mmap: no tensor data read


def preflight(job) -> None:
    """On the driver, before Ray or any output: the job's weights exist, are pinned and fit the net.

    Raises ValueError / FileNotFoundError with one line naming what is wrong.
    """
    from pid_batch import storage
    from pid_batch.sample_checks import net_config_for

    m = job.model
    for what, uri in (("model.text_encoder", m.text_encoder), ("model.vae", m.vae)):
        if uri is not None and not storage.list_files(uri):
            raise FileNotFoundError(f"{what}: no files at {uri}")
    if m.checkpoint is None or m.fake_latency_ms is not None:
        return
    if not storage.is_local(m.checkpoint):
        if not storage.exists(m.checkpoint):
            raise FileNotFoundError(f"model.checkpoint: not found: {m.checkpoint}")
        return  # remote: the node cache checks the pin and the keys when it downloads
    path = storage.fetch_to_cache(m.checkpoint, sha256=m.checkpoint_sha256)
    with torch.device("meta"):
        net = PidNet(net_config_for(m.spec, m.preset))
    shapes = file_shapes(path)
    try:
        check_state_dict(
            {k: torch.empty(s, device="meta") for k, s in shapes.items()},
            {k: v.shape for k, v in net.state_dict().items()},
        )
    except ValueError as e:
        raise ValueError(f"model.checkpoint {m.checkpoint}: " + " ".join(str(e).split())) from None
