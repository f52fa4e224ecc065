"""The checks a row's sample passes before it is decoded: the job's backbone, its output size.

Torch-free: the read stage runs them in CPU workers, the VAE stage on latents it just encoded.
A failure is a SampleError, which the stage turns into the row's error.
"""

from __future__ import annotations

from collections.abc import Sequence

from pid_batch.backbones import CheckpointSpec, canonical_backbone
from pid_batch.config import NetConfig
from pid_batch.job import JobConfig
from pid_batch.sample_checks import SampleError, validate_latent_shape


def check_backbone(spec: CheckpointSpec, backbone: str | None, sample_id: str | None = None) -> str:
    """The job's backbone, if a sample's own `backbone` is absent or names it (alias, any case).

    A job decodes one backbone with one checkpoint: a sample naming another (known or not) is a
    SampleError naming both, never a lookup of some other backbone's release.
    """
    if backbone is None:
        return spec.backbone
    try:
        same = canonical_backbone(backbone) == spec.backbone
    except ValueError:  # not a backbone at all
        same = False
    if not same:
        raise SampleError(
            sample_id,
            f"backbone {backbone!r} is not this job's backbone {spec.backbone!r} "
            f"(checkpoint {spec.experiment}); decode other backbones in a job of their own",
        )
    return spec.backbone


def output_size(
    job: JobConfig, cfg: NetConfig, shape: Sequence[int], sample_id: str
) -> tuple[int, int]:
    """The output (H, W) of a PiD-form latent under this job's checkpoint, preset, tiling and
    output ceiling; SampleError when the job cannot decode it."""
    return validate_latent_shape(
        job.model.spec,
        cfg,
        shape,
        sample_id,
        job.model.preset,
        tiling=job.sampling.tiling,
        max_output_megapixels=job.sampling.max_output_megapixels,
    )
