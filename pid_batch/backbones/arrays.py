"""Latents → PiD form in numpy: what read workers run (no torch).

The conventions: docs/model.md#latent-conventions and #resolution. `pid_batch.latents.to_pid` is
the torch-tensor face of `to_pid_array`.
"""

from __future__ import annotations

import math
import numbers
import sys

import numpy as np

from pid_batch.backbones import (
    FLUX2_BN_EPS,
    LATENT_FORMATS,
    RAE_SHIFT,
    TRAINED_SIGMA_MAX,
    Backbone,
)
from pid_batch.backbones import backbone as backbone_row


def _where(backbone: str, sample_id: str | None) -> str:
    return f"sample {sample_id!r}: {backbone}" if sample_id is not None else backbone


def _forms(conv: Backbone, latent_format: str) -> str:
    """Human-readable accepted shapes, for error messages."""
    c = conv.channels
    if conv.tokens is not None:
        h, w = conv.fixed_hw
        return f"[{c}, {h}, {w}] (or tokens [{conv.tokens}, {c}])"
    if latent_format == "pid":
        return f"[{c}, h, w]"
    extra = []
    if conv.name == "qwenimage":
        extra.append(f"[{c}, 1, h, w]")
    if conv.packed_channels is not None:
        extra.append(f"packed [seq, {conv.packed_channels}]")
    if conv.name == "flux2":
        extra.append("raw [32, 2h, 2w] with flux2_bn")
    return f"[{c}, h, w]" + (f" (or {', '.join(extra)})" if extra else "")


def _shape_error(conv: Backbone, latent_format: str, shape, where: str) -> ValueError:
    return ValueError(
        f"{where} latent must have {conv.channels} channels {_forms(conv, latent_format)}; "
        f"got shape {tuple(shape)}"
    )


def flux2_bn_missing(where: str) -> ValueError:
    """The error for raw Flux2 latents given without the VAE's BatchNorm statistics."""
    return ValueError(
        f"{where}: raw 32-channel Flux2 latents need the Flux2 VAE's BatchNorm running stats; "
        "pass flux2_bn=(vae.bn.running_mean, vae.bn.running_var) "
        "(AutoencoderKLFlux2 `bn` buffers, 128 values each)"
    )


_NUMPY_FLOATS = ("torch.float16", "torch.float32", "torch.float64")


def _tensor_type():
    """torch.Tensor if torch is already imported (a tensor cannot exist otherwise), else None."""
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else None


def _as_float_array(latent, where: str) -> np.ndarray:
    """A floating-point numpy view of an array or CPU-copied tensor; ValueError for other dtypes."""
    if isinstance(latent, np.ndarray):
        if latent.dtype.kind != "f":
            raise ValueError(
                f"{where} latent must be a floating-point array; got dtype {latent.dtype}"
            )
        return latent
    tensor = _tensor_type()
    if tensor is None or not isinstance(latent, tensor):
        raise ValueError(
            f"{where} latent must be a torch.Tensor or numpy array; got {type(latent)}"
        )
    if not latent.is_floating_point():
        raise ValueError(
            f"{where} latent must be a floating-point tensor; got dtype {latent.dtype}"
        )
    t = latent.detach().cpu()
    return (t if str(t.dtype) in _NUMPY_FLOATS else t.float()).numpy()  # bf16: no numpy twin


def _sigma_value(sigma, where: str) -> float:
    """float(sigma) for numbers and 1-element tensors/arrays; ValueError for anything else."""
    if sigma is None:
        return 0.0
    tensor = _tensor_type()
    if isinstance(sigma, np.ndarray) or (tensor is not None and isinstance(sigma, tensor)):
        if int(np.prod(tuple(sigma.shape))) != 1 or str(sigma.dtype) in ("bool", "torch.bool"):
            raise ValueError(f"{where} sigma must be a real scalar; got {sigma!r}")
    elif isinstance(sigma, (bool, np.bool_)) or not isinstance(sigma, (numbers.Real, np.generic)):
        raise ValueError(f"{where} sigma must be a number; got {sigma!r}")
    value = float(sigma)
    if not math.isfinite(value):
        raise ValueError(f"{where} sigma must be finite; got {value}")
    return value


def validate_sigma(sigma, backbone: str = "", sample_id: str | None = None) -> float:
    """degrade_sigma as a float in [0, 1] (flow/VP frame); ValueError otherwise."""
    where = _where(backbone or "latent", sample_id)
    value = _sigma_value(sigma, where)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} degrade_sigma must be in [0, 1]; got {value}")
    return value


def sigma_out_of_distribution(sigma: float) -> bool:
    """True when sigma exceeds the training range U[0, 0.8] (allowed, but quality is not promised)."""
    return float(sigma) > TRAINED_SIGMA_MAX


def euler_norm(sigma_eu: float) -> float:
    """sqrt(σ²+1) of an EulerDiscrete sigma: VP state = x/norm, VP σ = σ/norm.

    See docs/model.md#sdxl-euler-and-vp-frames.
    """
    sigma_eu = float(sigma_eu)
    if not (math.isfinite(sigma_eu) and sigma_eu >= 0.0):
        raise ValueError(f"Euler sigma must be finite and >= 0; got {sigma_eu}")
    return math.sqrt(sigma_eu * sigma_eu + 1.0)


def rae_time_shift(u: float, shift: float = RAE_SHIFT) -> float:
    """Shifted flow time s·u / (1 + (s − 1)·u) (RAE sampler, docs/model.md#rae-time-shift)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def dinov2_sigma(step: int, num_steps: int) -> float:
    """degrade_sigma of a DINOv2-RAE state captured after `step` of `num_steps` Euler steps.

    σ = s·u/(1+(s−1)·u), u = 1 − linspace(0, 1 − 1/1000, N+1)[K]; the final x0 (K = N) is σ = 0.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
    if (
        isinstance(step, bool)
        or not isinstance(step, numbers.Integral)
        or not 0 <= step <= num_steps
    ):
        raise ValueError(f"step must be an integer in [0, {num_steps}]; got {step!r}")
    if step == num_steps:
        return 0.0
    u = 1.0 - step * (1.0 - 1.0 / 1000.0) / num_steps
    return rae_time_shift(u)


def _packed_grid(seq: int, cell: int, height, width, where: str) -> tuple[int, int]:
    """Token grid (rows, cols) of a packed sequence: from the LDM image size, else assume square."""
    if height is None:
        side = math.isqrt(seq)
        if side * side != seq:
            raise ValueError(
                f"{where}: packed latent has {seq} tokens, not a square grid; "
                "pass height and width (LDM image size in pixels)"
            )
        return side, side
    rows, cols = int(height) // cell, int(width) // cell
    if rows * cols != seq:
        raise ValueError(
            f"{where}: packed latent has {seq} tokens but height={height}, width={width} give a "
            f"{rows}×{cols} = {rows * cols} token grid ({cell} px per token)"
        )
    return rows, cols


def flux2_stats(flux2_bn, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) fp32 [128, 1, 1] from the FLUX.2 VAE's BatchNorm running stats.

    std = sqrt(running_var + FLUX2_BN_EPS) (docs/model.md#flux2-packing-and-batchnorm).
    """
    if flux2_bn is None:
        raise flux2_bn_missing(where)
    tensor = _tensor_type()
    mean, var = (
        _as_float_array(s, where) if tensor is not None and isinstance(s, tensor) else np.asarray(s)
        for s in flux2_bn
    )
    for name, s in (("running_mean", mean), ("running_var", var)):
        if tuple(s.shape) != (128,) or s.dtype.kind not in "fiu" or not np.isfinite(s).all():
            raise ValueError(
                f"{where}: flux2_bn {name} must be 128 finite values; got shape {tuple(s.shape)}"
            )
    if (var < 0).any():
        raise ValueError(f"{where}: flux2_bn running_var must be >= 0")
    mean, var = mean.astype(np.float32), var.astype(np.float32)
    return mean.reshape(128, 1, 1), np.sqrt(var + np.float32(FLUX2_BN_EPS)).reshape(128, 1, 1)


def flux2_patchify(z: np.ndarray) -> np.ndarray:
    """[32, H, W] -> [128, H/2, W/2], channel c·4 + a·2 + b (a row, b column offset)."""
    c, h, w = z.shape
    z = z.reshape(c, h // 2, 2, w // 2, 2)  # [c, i, a, j, b]
    return z.transpose(0, 2, 4, 1, 3).reshape(c * 4, h // 2, w // 2)  # [c, a, b, i, j]


def _from_diffusers(x: np.ndarray, conv: Backbone, height, width, flux2_bn, where: str):
    """Diffusers pipeline latent (packed/unpacked/raw) -> PiD form [C, h, w]."""
    c = conv.channels
    if x.ndim == 2 and conv.packed_channels is not None:
        seq, cp = x.shape
        if cp != conv.packed_channels:
            raise _shape_error(conv, "diffusers", x.shape, where)
        p = conv.packed_patch
        rows, cols = _packed_grid(seq, conv.vae_scale * p, height, width, where)
        x = x.reshape(rows, cols, c, p, p)  # [rows, cols, c, a, b]
        return x.transpose(2, 0, 3, 1, 4).reshape(c, rows * p, cols * p)  # [c, rows·a, cols·b]
    if conv.name == "qwenimage" and x.ndim == 4 and x.shape[0] == c and x.shape[1] == 1:
        return x[:, 0]  # [C, 1, h, w] frame axis of the Wan-style VAE
    if conv.name == "flux2" and x.ndim == 3 and x.shape[0] == conv.raw_channels:
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(
                f"{where} raw 32-channel latent needs even H, W; got shape {tuple(x.shape)}"
            )
        mean, std = flux2_stats(flux2_bn, "flux2")
        return (flux2_patchify(x.astype(np.float32)) - mean) / std
    if x.ndim == 3 and x.shape[0] == c:
        return x
    raise _shape_error(conv, "diffusers", x.shape, where)


def _from_pid(x: np.ndarray, conv: Backbone, where: str) -> np.ndarray:
    """PiD-form latent [C, h, w] (RAEs: or row-major tokens [h·w, C]) -> [C, h, w]."""
    if conv.tokens is not None and x.ndim == 2 and tuple(x.shape) == (conv.tokens, conv.channels):
        h, w = conv.fixed_hw
        return x.reshape(h, w, conv.channels).transpose(2, 0, 1)  # token i·w + j -> (i, j)
    if x.ndim == 3 and x.shape[0] == conv.channels:
        return x
    raise _shape_error(conv, "pid", x.shape, where)


def _expected_hw(conv: Backbone, height: int, width: int) -> tuple[int, int]:
    """PiD-form (h, w) diffusers produces for an LDM image of height×width pixels."""
    cell, p = conv.vae_scale * conv.packed_patch, conv.packed_patch
    return (int(height) // cell) * p, (int(width) // cell) * p


def to_pid_array(
    latent,
    backbone: str,
    latent_format: str = "pid",
    sigma: float | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    sigma_frame: str | None = None,
    flux2_bn=None,
    sample_id: str | None = None,
) -> tuple[np.ndarray, float]:
    """One sample's latent -> (lq_latent [C, h, w] fp32 numpy copy, degrade_sigma).

    The conventions: docs/model.md#latent-conventions, #degrade-sigma, #diffusers-outputs.

    `latent`: a numpy array or torch tensor. latent_format "pid": already [C, h, w] in the LDM's
    normalised space (dinov2/siglip also accept row-major tokens [1024, 768] / [256, 1152]).
    "diffusers": one batch item of what `output_type="latent"` or `callback_on_step_end` gives —
    flux/zimage/qwenimage packed [seq, 64] (unpacked with `height`, `width` = LDM image pixels;
    without them the token grid is assumed square) or [16, h, w] (qwenimage also [16, 1, h, w]);
    flux2 packed [seq, 128] (BN-normalised, row-major tokens), [128, h, w], or klein's final raw
    [32, 2h, 2w] (needs `flux2_bn`, and torch); sd3/sdxl [C, h, w] (already scaled by the
    pipeline). `sigma`: the scheduler sigma at capture (flow: `scheduler.sigmas[K]`; None = clean).
    SDXL: `sigma_frame="euler"` converts an EulerDiscrete state x0+σε and σ to the VP frame; "vp"
    means already VP; SDXL "diffusers" latents with sigma > 0 need an explicit sigma_frame.
    """
    conv = backbone_row(backbone)
    name = conv.name
    where = _where(name, sample_id)
    if latent_format not in LATENT_FORMATS:
        raise ValueError(
            f"{where}: latent_format must be one of {LATENT_FORMATS}; got {latent_format!r}"
        )
    if (height is None) != (width is None):
        raise ValueError(f"{where}: pass both height and width (LDM image pixels) or neither")
    x = _as_float_array(latent, where)
    if x.size == 0 or min(x.shape, default=0) < 1:
        raise _shape_error(conv, latent_format, x.shape, where)
    if not np.isfinite(x).all():
        raise ValueError(f"{where} latent contains NaN or inf (shape {tuple(x.shape)})")

    if latent_format == "diffusers":
        if conv.tokens is not None:
            raise ValueError(
                f"{where}: latent_format 'diffusers' does not apply to RAE backbones; pass RAE "
                f"features with latent_format='pid' as {_forms(conv, 'pid')}"
            )
        x = _from_diffusers(x, conv, height, width, flux2_bn, where)
    else:
        x = _from_pid(x, conv, where)

    h, w = x.shape[-2:]
    if conv.fixed_hw is not None:
        if (h, w) != conv.fixed_hw:
            raise _shape_error(conv, latent_format, x.shape, where)
        if height is not None or width is not None:
            raise ValueError(
                f"{where}: height/width do not apply (RAE backbones decode 2048² only)"
            )
    elif height is not None and width is not None:
        exp_h, exp_w = _expected_hw(conv, height, width)
        if (h, w) != (exp_h, exp_w):
            raise ValueError(
                f"{where}: latent is {h}×{w} but height={height}, width={width} imply {exp_h}×{exp_w}"
            )

    frame = sigma_frame if sigma_frame is None else str(sigma_frame).lower()
    allowed = ("vp", "euler") if conv.noise_frame == "vp" else ("flow",)
    if frame is not None and frame not in allowed:
        raise ValueError(
            f"{where}: sigma_frame must be one of {allowed} or None; got {sigma_frame!r}"
        )
    sigma_value = _sigma_value(sigma, where)
    if frame == "euler":
        if sigma_value < 0:
            raise ValueError(f"{where}: Euler sigma must be >= 0; got {sigma_value}")
        norm = euler_norm(sigma_value)
        x, sigma_value = x.astype(np.float32) / np.float32(norm), sigma_value / norm
    elif frame is None and name == "sdxl" and latent_format == "diffusers" and sigma_value > 0:
        raise ValueError(
            f"{where}: intermediate SDXL latents need sigma_frame: 'euler' for EulerDiscreteScheduler "
            "states x0 + σ·ε with σ = scheduler.sigmas[K], or 'vp' if already sqrt(1−σ²)·x0 + σ·ε"
        )
    sigma_value = validate_sigma(sigma_value, name, sample_id)
    return np.array(x, dtype=np.float32, order="C", copy=True), sigma_value  # never the caller's


def output_hw(lq_latent_shape, backbone: str, sr_scale: int | None = None) -> tuple[int, int]:
    """PiD output (H, W) = latent (h, w) · s_vae · sr (sr defaults to the backbone's checkpoints)."""
    conv = backbone_row(backbone)
    sr = conv.sr_scale if sr_scale is None else sr_scale
    if isinstance(sr, bool) or not isinstance(sr, numbers.Integral) or sr < 1:
        raise ValueError(f"sr_scale must be a positive integer; got {sr_scale!r}")
    shape = tuple(lq_latent_shape)
    if len(shape) < 2 or shape[-1] < 1 or shape[-2] < 1:
        raise ValueError(f"{conv.name}: latent shape must end in (h, w) >= 1; got {shape}")
    return int(shape[-2]) * conv.vae_scale * sr, int(shape[-1]) * conv.vae_scale * sr
