"""Job specification: YAML → frozen, validated dataclasses. Every check here runs before any work."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pid_batch.assets import bundled
from pid_batch.backbones import (
    BACKBONES,
    LATENT_FORMATS,
    CheckpointSpec,
    canonical_backbone,
    resolve_checkpoint,
)
from pid_batch.config import VARIANTS
from pid_batch.tiles import DEFAULT_MAX_OUTPUT_MEGAPIXELS, TILING_MODES, parse_size

LAYOUTS = ("files", "tar")
INPUT_KINDS = ("latents", "images")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_FORMATS = ("jpeg", "png", "webp")
PRESETS = ("full", "tiny", "demo")
# What a rerun does with a shard whose content changed since it was decoded (a different
# fingerprint: size and modification time/ETag): decode it again, its old rows, marker and tar
# superseded, or refuse to start and name the changed shards.
CHANGED_INPUTS = ("redo", "refuse")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# torch.compile modes: "reduce-overhead" captures CUDA graphs, "max-autotune" also tunes kernels.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class JobConfigError(ValueError):
    """A job spec that cannot run; raised before any sample is touched."""


@dataclass(frozen=True)
class ModelConfig:
    """Which PiD checkpoint decodes the job, and where its weights and text encoder live."""

    backbone: str = "flux"
    ckpt_type: str | None = None
    checkpoint: str | None = None  # local path or s3:// URI of model_ema_bf16.pth / .safetensors
    checkpoint_sha256: str | None = None
    text_encoder: str | None = None  # local dir or s3:// prefix of Gemma-2-2b-it; None: null text
    # Benchmarks only: let preset 'full' run without Gemma (captions become fixed random
    # embeddings, NullTextEncoder), so decoder speed can be measured without the 5 GB download.
    null_text: bool = False
    # "tiny": the same code path at test size (random weights unless given); "demo": the size of
    # the bundled CPU-trained demo decoder (pid_batch/assets/demo, used when checkpoint is unset).
    preset: str = "full"
    compile: bool = False
    compile_mode: str = "default"  # one of COMPILE_MODES; only read when compile is true
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # The backbone's own VAE (diffusers folder, local or s3://): encodes image inputs and
    # gives the native-decode baseline.
    vae: str | None = None
    # Benchmarks only: a stand-in decoder that sleeps this long per image (pid_batch.fake);
    # a mapping gives each accelerator class its own latency (see ResourceConfig.micro_batch),
    # a class it does not name sleeps pid_batch.fake.DEFAULT_LATENCY_MS.
    fake_latency_ms: float | dict[str, float] | None = None

    def __post_init__(self) -> None:
        try:
            canonical_backbone(self.backbone)
        except ValueError as e:
            raise JobConfigError(
                f"model.backbone={self.backbone!r} is not a released PiD backbone ({e})"
            ) from None
        try:
            resolve_checkpoint(self.backbone, self.ckpt_type)
        except ValueError as e:
            raise JobConfigError(f"model: {e}") from None
        if self.preset not in PRESETS:
            raise JobConfigError(f"model.preset={self.preset!r}; valid: {PRESETS}")
        if self.fake_latency_ms is not None:
            _check_per_class("model.fake_latency_ms", self.fake_latency_ms, (int, float), 0)
        if self.preset == "demo" and self.checkpoint is None and self.fake_latency_ms is None:
            try:  # the bundled CPU-trained decoder of pid_batch.train
                object.__setattr__(self, "checkpoint", str(bundled("student")))
            except FileNotFoundError as e:
                raise JobConfigError(f"model.preset 'demo': {e}") from None
        if self.preset == "full" and self.checkpoint is None and self.fake_latency_ms is None:
            raise JobConfigError(
                "model.checkpoint is required with preset 'full': point it at the official "
                "model_ema_bf16.pth of this backbone (local path or s3:// URI); "
                "random weights are only allowed with preset 'tiny'"
            )
        if (
            self.preset == "full"
            and self.text_encoder is None
            and self.fake_latency_ms is None
            and not self.null_text
        ):
            raise JobConfigError(
                "model.text_encoder is required with preset 'full': a local directory or s3:// "
                "prefix holding Gemma-2-2b-it (config, weights and tokenizer)"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise JobConfigError(
                f"model.compile_mode={self.compile_mode!r}; valid: {COMPILE_MODES}"
            )
        if self.dtype not in DTYPES:
            raise JobConfigError(f"model.dtype={self.dtype!r}; valid: {DTYPES}")
        if self.checkpoint_sha256 is not None and (
            len(self.checkpoint_sha256) != 64
            or any(c not in "0123456789abcdef" for c in self.checkpoint_sha256.lower())
        ):
            raise JobConfigError(
                f"model.checkpoint_sha256 must be 64 hex digits; got {self.checkpoint_sha256!r}"
            )

    @property
    def spec(self) -> CheckpointSpec:
        return resolve_checkpoint(self.backbone, self.ckpt_type)

    def fake_latency_on(self, accelerator_class: str | None) -> float | None:
        """The stand-in decoder's latency on a node of this class (None: the fake's default)."""
        return _per_class(self.fake_latency_ms, accelerator_class)

    @property
    def variant_label(self) -> str:
        """Variant name as recorded in outputs ('tiny:' / 'demo:' prefix for the small presets)."""
        v = self.spec.variant
        return v if self.preset == "full" else f"{self.preset}:{v}"


@dataclass(frozen=True)
class SamplingConfig:
    """Job-wide defaults; a shard's per-sample sigma, seed and caption override them."""

    steps: int = 4
    seed: int = 0
    sigma: float = 0.0
    caption: str = ""
    latent_format: str = "pid"
    # Overlapping tiles of the checkpoint's trained sizes (pid_batch/tiles.py). auto: when the
    # output fits no trained size or not the accelerator at micro-batch 1; always: whenever it is
    # larger than one tile; never: decode whole (at most 4096 px per side).
    tiling: str = "auto"
    tile_overlap: int | None = None  # minimum overlap in px; None: 512 (scaled for small presets)
    tile_size: str | None = None  # "WxH": tiles of this size instead of the trained sizes
    # Outputs above this many pixels are error rows, refused before any allocation.
    max_output_megapixels: float = DEFAULT_MAX_OUTPUT_MEGAPIXELS

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 4:
            raise JobConfigError(f"sampling.steps={self.steps!r}; the distilled students run 1-4")
        if not 0.0 <= self.sigma <= 1.0:
            raise JobConfigError(f"sampling.sigma={self.sigma!r} must lie in [0, 1]")
        if self.latent_format not in LATENT_FORMATS:
            raise JobConfigError(
                f"sampling.latent_format={self.latent_format!r}; valid: {LATENT_FORMATS}"
            )
        if not isinstance(self.caption, str):
            raise JobConfigError(f"sampling.caption must be a string; got {self.caption!r}")
        if self.tiling not in TILING_MODES:
            raise JobConfigError(f"sampling.tiling={self.tiling!r}; valid: {TILING_MODES}")
        overlap = self.tile_overlap
        if overlap is not None and (
            not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0
        ):
            raise JobConfigError(f"sampling.tile_overlap={overlap!r} must be an int >= 0 (px)")
        if self.tile_size is not None:
            try:
                parse_size(self.tile_size, "sampling.tile_size")
            except ValueError as e:
                raise JobConfigError(str(e)) from None
        mp = self.max_output_megapixels
        if isinstance(mp, bool) or not isinstance(mp, (int, float)) or not mp > 0:
            raise JobConfigError(f"sampling.max_output_megapixels={mp!r} must be a number > 0")

    @property
    def tile_hw(self) -> tuple[int, int] | None:
        """`tile_size` as (H, W), or None."""
        return None if self.tile_size is None else parse_size(self.tile_size, "sampling.tile_size")


@dataclass(frozen=True)
class OutputConfig:
    """How images are stored: one object per image, or one WebDataset tar per input shard."""

    layout: str = "files"
    image_format: str = "jpeg"  # JPEG q95: ~10-20 ms per 2048² image; PNG level 1: 0.2-0.4 s
    quality: int = 95
    # Also decode each latent with the backbone's own VAE into <out>/baseline/ (needs model.vae).
    baseline: bool = False
    # Image inputs: resize each image before VAE encoding so that PiD's output has exactly this
    # long side (the encode's long side is target / sr_scale; the short side keeps the aspect
    # ratio, floored to the VAE's crop multiple by the centre crop).
    target_long_side: int | None = None
    # Layout "tar": a shard's images are cut into tars of at most this many bytes (a tar holds
    # at least one staged part, so one part larger than this makes a larger tar). 1 GB: the
    # shard size WebDataset's own tools write and its users expect.
    tar_max_bytes: int = 10**9

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise JobConfigError(f"output.layout={self.layout!r}; valid: {LAYOUTS}")
        if self.image_format not in IMAGE_FORMATS:
            raise JobConfigError(
                f"output.image_format={self.image_format!r}; valid: {IMAGE_FORMATS}"
            )
        if not 1 <= self.quality <= 100:
            raise JobConfigError(f"output.quality={self.quality!r} must be in 1..100")
        t = self.target_long_side
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t <= 0):
            raise JobConfigError(f"images.target_long_side={t!r} must be a positive int (px)")
        if not isinstance(self.tar_max_bytes, int) or self.tar_max_bytes < 1:
            raise JobConfigError(
                f"images.tar_max_bytes={self.tar_max_bytes!r} must be a positive integer"
            )


@dataclass(frozen=True)
class ResourceConfig:
    """Actor pool and batching. micro_batch 0 lets each actor size it from its own accelerator."""

    min_actors: int = 1
    max_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int = 16  # rows per actor call; the actor splits them into micro-batches
    # Images per decoder forward. 0: each actor sizes it from its accelerator's free memory. A
    # mapping {accelerator class: micro-batch}, e.g. {rtx: 1, gb200: 8}, lets one job span
    # unlike GPUs (Ray Data has one batch_size per operator): each actor looks up the class of
    # the node it landed on (its node label pid-batch/accelerator, else the ray.io/accelerator-type
    # label Ray sets from the GPU it detects, e.g. GB200; see pipeline.ACCELERATOR_LABELS); a
    # class the mapping does not name sizes from free memory.
    micro_batch: int | dict[str, int] = 0
    # Encode tasks mostly wait on writes (fsync / PUT): two per core; 16 rows per task keeps Ray
    # task and timing-part overheads low (benchmarks/README.md §2) while a 2048² batch stays
    # ~200 MB of raw images.
    encode_cpus: float = 0.5
    encode_batch_size: int = 16
    # Pin decode actors to one accelerator class of cluster.yaml (custom resource accel_<name>).
    accelerator: str | None = None
    # Batches queued on a decode actor behind the one it runs (Ray Data's tasks in flight per
    # actor minus one): 1 hands over the next batch while the current one decodes; 0 leaves
    # every waiting batch to whichever actor is free first (benchmarks/README.md §1).
    prefetch_batches: int = 1

    def __post_init__(self) -> None:
        if self.accelerator is not None and not self.accelerator.replace("_", "").isalnum():
            raise JobConfigError(f"resources.accelerator={self.accelerator!r} must be a plain name")
        if not 1 <= self.min_actors <= self.max_actors:
            raise JobConfigError(
                f"resources: need 1 <= min_actors <= max_actors; got "
                f"min_actors={self.min_actors!r}, max_actors={self.max_actors!r}"
            )
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0 or self.encode_cpus <= 0:
            raise JobConfigError(
                f"resources: gpus_per_actor={self.gpus_per_actor!r}, "
                f"cpus_per_actor={self.cpus_per_actor!r}, encode_cpus={self.encode_cpus!r} "
                "must be non-negative (encode_cpus > 0)"
            )
        if self.prefetch_batches not in (0, 1, 2, 3):
            raise JobConfigError(
                f"resources.prefetch_batches={self.prefetch_batches!r}; valid: 0-3"
            )
        if self.batch_size < 1 or self.encode_batch_size < 1:
            raise JobConfigError(
                f"resources: batch_size={self.batch_size!r} and encode_batch_size="
                f"{self.encode_batch_size!r} must be >= 1"
            )
        _check_per_class("resources.micro_batch", self.micro_batch, (int,), 0)

    def micro_batch_on(self, accelerator_class: str | None) -> int:
        """Micro-batch for an actor on a node of this class (0: size it from free memory)."""
        return _per_class(self.micro_batch, accelerator_class) or 0


def _check_per_class(where: str, value: Any, types: tuple[type, ...], least: float) -> None:
    """A number >= least, or a non-empty mapping of accelerator class names to such numbers."""
    items = value.items() if isinstance(value, dict) else [(None, value)]
    for cls, v in items:
        if cls is not None and (not isinstance(cls, str) or not cls):
            raise JobConfigError(f"{where}: accelerator class {cls!r} must be a non-empty string")
        if not isinstance(v, types) or isinstance(v, bool) or v < least:
            kinds = " or ".join(t.__name__ for t in types)
            at = f"[{cls!r}]" if cls is not None else ""
            raise JobConfigError(
                f"{where}{at}={v!r} must be {kinds} >= {least}, or a mapping "
                "{accelerator class: value} of such"
            )
    if isinstance(value, dict) and not value:
        raise JobConfigError(f"{where}: an empty mapping names no accelerator class")


def _per_class(value: Any, accelerator_class: str | None) -> Any:
    """A per-accelerator setting's value on a node of this class (None: not named there)."""
    if isinstance(value, dict):
        return value.get(accelerator_class) if accelerator_class is not None else None
    return value


@dataclass(frozen=True)
class JobConfig:
    """A whole decode job: where latents come from, where images go, and how."""

    input: str
    output: str
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    images: OutputConfig = field(default_factory=OutputConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    ray_address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray
    # "images": the input holds PNG/JPEG/WebP files, VAE-encoded to latents first.
    input_kind: str = "latents"
    images_per_shard: int = 64  # image inputs are grouped into pseudo-shards of this size
    changed_inputs: str = "redo"  # see CHANGED_INPUTS

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise JobConfigError(f"input_kind={self.input_kind!r}; valid: {INPUT_KINDS}")
        if self.images_per_shard < 1:
            raise JobConfigError(f"images_per_shard={self.images_per_shard!r} must be >= 1")
        needs_vae = [
            w
            for w, on in (
                ("input_kind: images", self.input_kind == "images"),
                ("images.baseline", self.images.baseline),
            )
            if on
        ]
        if needs_vae and self.model.vae is None:
            raise JobConfigError(
                f"{' and '.join(needs_vae)} need model.vae: the {self.model.backbone} VAE as a "
                "diffusers folder (local path or s3:// prefix)"
            )
        if needs_vae and BACKBONES[self.model.spec.backbone].is_rae:
            raise JobConfigError(
                f"{' and '.join(needs_vae)} are not available for the {self.model.spec.backbone} "
                "RAE backbone (no diffusers VAE); store its latents instead"
            )
        for key in ("input", "output"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise JobConfigError(f"{key} must be a non-empty URI or path; got {value!r}")
        if self.changed_inputs not in CHANGED_INPUTS:
            raise JobConfigError(f"changed_inputs={self.changed_inputs!r}; valid: {CHANGED_INPUTS}")
        check_disjoint(self.input, self.output)
        cell = self.model.spec.latent_cell  # output px per latent cell
        target = self.images.target_long_side
        if target is not None and self.input_kind != "images":
            raise JobConfigError(
                "images.target_long_side applies to image inputs (input_kind: images)"
            )
        if target is not None and target % cell:
            raise JobConfigError(
                f"images.target_long_side={target} must be a multiple of {cell} px for "
                f"{self.model.spec.backbone} (VAE {self.model.spec.vae_scale}x × PiD "
                f"{self.model.spec.sr_scale}x), e.g. {max(cell, target // cell * cell)} or "
                f"{(target // cell + 1) * cell}"
            )
        tile = self.sampling.tile_hw
        if tile is not None and (tile[0] % cell or tile[1] % cell):
            raise JobConfigError(
                f"sampling.tile_size={self.sampling.tile_size!r} must have sides that are "
                f"multiples of the latent cell, {cell} px for {self.model.spec.backbone}"
            )

    def manifest(self) -> dict[str, Any]:
        """What an output prefix was produced with; a rerun must match it to resume."""
        return {
            "backbone": self.model.spec.backbone,
            "ckpt_type": self.model.spec.ckpt_type,
            "experiment": self.model.spec.experiment,
            "variant": self.model.variant_label,
            "checkpoint": os.path.basename(self.model.checkpoint or "random-weights"),
            "checkpoint_sha256": self.model.checkpoint_sha256,
            "steps": self.sampling.steps,
            "seed": self.sampling.seed,
            "layout": self.images.layout,
            "image_format": self.images.image_format,
            "quality": self.images.quality,
            "input_kind": self.input_kind,
        }


def _norm(uri: str) -> str:
    """A URI as a comparable path: s3://bucket/key, or an absolute local path (links resolved)."""
    if uri.startswith("s3://"):
        return "s3://" + "/".join(p for p in uri[5:].split("/") if p not in ("", "."))
    path = uri.removeprefix("file://")
    return os.path.realpath(os.path.expanduser(path)) if "://" not in path else path


def check_disjoint(input_uri: str, output_uri: str) -> None:
    """Refuse an output inside the input (its timing Parquet would be read back as shards) or an
    input inside the output (a rerun would list its own outputs), after normalising both."""
    a, b = _norm(input_uri), _norm(output_uri)
    if a == b:
        raise JobConfigError(f"output {output_uri!r} must differ from input {input_uri!r}")
    for inner, outer, what in ((b, a, "output"), (a, b, "input")):
        if inner.startswith(outer.rstrip("/") + "/"):
            other = "input" if what == "output" else "output"
            raise JobConfigError(
                f"{what} {inner!r} lies inside the {other} {outer!r}; input and output "
                "prefixes must not overlap"
            )


_SECTIONS = {
    "model": ModelConfig,
    "sampling": SamplingConfig,
    "images": OutputConfig,
    "resources": ResourceConfig,
}


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise JobConfigError(f"{where} must be a mapping; got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise JobConfigError(f"{where}: unknown key(s) {unknown}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        ftype = str(names[key].type)
        if key in _SECTIONS and cls is JobConfig:
            value = _build(_SECTIONS[key], value or {}, key)
        elif value is not None and ftype in ("int", "float", "bool", "str"):
            expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[ftype]
            if not isinstance(value, expected) or (ftype != "bool" and isinstance(value, bool)):
                raise JobConfigError(
                    f"{where}.{key} must be {ftype}; got {value!r} ({type(value).__name__})"
                )
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise JobConfigError(f"{where}: {e}") from None


def job_from_dict(data: dict[str, Any]) -> JobConfig:
    """Validate a parsed job spec (the YAML's top-level mapping)."""
    return _build(JobConfig, data, "job")


def load_job(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read a YAML job spec; `overrides` maps dotted keys ("model.checkpoint") to values."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise JobConfigError(f"cannot read job spec {str(path)!r}: {e}") from None
    data = data or {}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return job_from_dict(data)


def known_variants() -> list[str]:
    return sorted(VARIANTS)
