"""Job specification: YAML → frozen, validated dataclasses. Every check here runs before any work."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pid_batch.assets import bundled
from pid_batch.config import ALIASES, BACKBONES, VARIANTS, CheckpointSpec, resolve_checkpoint

LAYOUTS = ("files", "tar")
INPUT_KINDS = ("latents", "images")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_FORMATS = ("jpeg", "png", "webp")
LATENT_FORMATS = ("pid", "diffusers")
PRESETS = ("full", "tiny", "demo")
# What a rerun does with a shard whose content changed since it was decoded (a different
# fingerprint: size and modification time/ETag): decode it again, its old rows, marker and tar
# superseded, or refuse to start and name the changed shards.
CHANGED_INPUTS = ("redo", "refuse")
DTYPES = ("auto", "float32", "bfloat16", "float16")


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
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # The backbone's own VAE (diffusers folder, local or s3://): encodes image inputs and
    # gives the native-decode baseline.
    vae: str | None = None
    # Benchmarks only: a stand-in decoder that sleeps this long per image (pid_batch.fake).
    fake_latency_ms: float | None = None

    def __post_init__(self) -> None:
        name = ALIASES.get(self.backbone.lower(), self.backbone.lower())
        if name not in BACKBONES:
            raise JobConfigError(
                f"model.backbone={self.backbone!r} is not a released PiD backbone; "
                f"valid: {sorted(BACKBONES) + sorted(ALIASES)}"
            )
        try:
            resolve_checkpoint(self.backbone, self.ckpt_type)
        except ValueError as e:
            raise JobConfigError(f"model: {e}") from None
        if self.preset not in PRESETS:
            raise JobConfigError(f"model.preset={self.preset!r}; valid: {PRESETS}")
        if self.fake_latency_ms is not None and self.fake_latency_ms < 0:
            raise JobConfigError(f"model.fake_latency_ms={self.fake_latency_ms!r} must be >= 0")
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


@dataclass(frozen=True)
class OutputConfig:
    """How images are stored: one object per image, or one WebDataset tar per input shard."""

    layout: str = "files"
    image_format: str = "jpeg"  # JPEG q95: ~10-20 ms per 2048² image; PNG level 1: 0.2-0.4 s
    quality: int = 95
    # Also decode each latent with the backbone's own VAE into <out>/baseline/ (needs model.vae).
    baseline: bool = False
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
    micro_batch: int = 0
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
        if self.batch_size < 1 or self.micro_batch < 0 or self.encode_batch_size < 1:
            raise JobConfigError(
                f"resources: batch_size={self.batch_size!r} and encode_batch_size="
                f"{self.encode_batch_size!r} must be >= 1, micro_batch={self.micro_batch!r} >= 0"
            )


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
        if needs_vae and self.model.spec.backbone in ("dinov2", "siglip"):
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
