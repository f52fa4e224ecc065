"""The row protocol of the stages: every column a row carries from read to write, declared once.

Ray Data hands each stage a numpy batch, one array per column with one cell per row. A column
is added by one stage (`Column.added_by`), may be rewritten by a later one (status, error, the
latent the VAE stage encodes) and is dropped by the stage that consumes it (`dropped_by`: raw
latents and pixels do not travel past the stage that needs them). `default` is the cell of a
row the adding stage did not fill: every row gets it first, and error rows keep it.

A stage that may not run (`SKIPPABLE`: the VAE stage runs only for image inputs or baselines)
leaves its columns absent; readers get their defaults through `column`. Any other missing
column is an error, never silently filled. As `timing.TIMING_SCHEMA` is for the timing table,
this table is the one place a row column is named, typed and defaulted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pid_batch.stages.layout import objects

Batch = dict[str, np.ndarray]

STAGES = ("read", "vae", "decode")  # in the order rows pass them; then encode_write
SKIPPABLE = frozenset({"vae"})  # pipeline.build_dataset adds the VAE stage only when needed

_NO_DEFAULT = object()  # `default` of a column its stage always sets (add_row refuses to omit it)


@dataclass(frozen=True)
class Column:
    """One row column: its numpy type in a batch, the stage that adds it, its default cell."""

    name: str
    dtype: str  # numpy dtype; "object": str, bytes or None cells
    added_by: str  # one of STAGES
    default: Any  # cell of a row the stage did not fill (_NO_DEFAULT: the stage always sets it)
    doc: str
    width: int = 0  # > 0: the column is [n, width] (shapes), each cell a list of width ints
    dropped_by: str | None = None  # the stage that consumes it and does not pass it on


def _c(name, dtype, added_by, default, doc, **kw) -> Column:
    return Column(name, dtype, added_by, default, doc, **kw)


ROW_SCHEMA: tuple[Column, ...] = (
    # -- read stage (stages.reader): one row per sample still to do ----------------------------
    _c("id", "object", "read", _NO_DEFAULT, "sample id (the shard's, or derived from its key)"),
    _c("shard", "object", "read", _NO_DEFAULT, "the shard's output key"),
    _c("index", "int64", "read", _NO_DEFAULT, "position in the shard; -1: the whole shard"),
    _c("shard_pending", "int64", "read", 0, "rows the read stage sent for this shard"),
    _c("status", "object", "read", _NO_DEFAULT, "encode | pending | ok | error"),
    _c("error", "object", "read", None, "why the row failed (None while it has not)"),
    _c("backbone", "object", "read", _NO_DEFAULT, "the job's backbone"),
    _c("caption", "object", "read", "", "caption the text encoder gets"),
    _c("sigma", "float64", "read", np.nan, "degrade sigma; NaN: not known (error rows)"),
    _c("seed", "int64", "read", -1, "the sample's noise seed; -1: none (error rows)"),
    _c("height", "int64", "read", 0, "output height in pixels; 0: not known"),
    _c("width", "int64", "read", 0, "output width in pixels; 0: not known"),
    _c("read_ms", "float64", "read", 0.0, "this row's share of reading its shard"),
    _c("read_done_at", "float64", "read", _NO_DEFAULT, "epoch s the row was read"),
    _c("fingerprint", "object", "read", _NO_DEFAULT, "the shard's input fingerprint"),
    _c("source_id", "object", "read", "", "the sample's id at its source; '': none"),
    _c("latent", "object", "read", b"", "raw float32 PiD-form latent", dropped_by="decode"),
    _c("shape", "int64", "read", [0, 0, 0], "the latent's [C, h, w]", width=3, dropped_by="decode"),
    _c("pixels", "object", "read", b"", "raw uint8 HWC image input", dropped_by="vae"),
    _c(
        "pshape",
        "int64",
        "read",
        [0, 0, 0],
        "the image input's [H, W, 3]",
        width=3,
        dropped_by="vae",
    ),
    # -- VAE stage (stages.decode.VaeStage): image inputs → latents; baseline decodes ----------
    _c("crop", "object", "vae", None, "'x0,y0,x1,y1' of the image the VAE encoded; None: none"),
    _c("resize", "object", "vae", "", "'WxH' the image was resized to first; '': not resized"),
    _c("vae_encode_ms", "float32", "vae", 0.0, "VAE encode time"),
    _c("baseline", "object", "vae", b"", "the VAE's own decode (layout.pack_image); b'': none"),
    _c("baseline_ms", "float32", "vae", 0.0, "VAE decode time of the baseline"),
    # -- decode stage (stages.decode.DecodeStage): latents → raw images ------------------------
    _c("image", "object", "decode", b"", "raw uint8 HWC image, height x width x 3"),
    _c("decode_ms", "float32", "decode", 0.0, "this row's share of its decode call"),
    _c("text_ms", "float32", "decode", 0.0, "this row's share of caption encoding"),
    _c("micro_batch", "int32", "decode", 0, "samples per network call; 0: not decoded"),
    _c("tile_height", "int32", "decode", 0, "tile height; 0: decoded whole"),
    _c("tile_width", "int32", "decode", 0, "tile width; 0: decoded whole"),
    _c("tile_overlap", "int32", "decode", 0, "tile overlap in pixels"),
    _c("tiles", "int32", "decode", 0, "tiles per image; 0: decoded whole"),
    _c("queue_ms", "float32", "decode", 0.0, "read done → decode call start"),
    _c("decode_started_at", "float64", "decode", np.nan, "epoch s of the decode call's start"),
    _c("node", "object", "decode", "", "host name of the decode actor"),
    _c("node_id", "object", "decode", "", "Ray node id; '': not known"),
    _c("accelerator", "object", "decode", "", "accelerator name, e.g. 'cpu'"),
    _c("accelerator_class", "object", "decode", "", "the node's accelerator class; '': none"),
    _c("actor", "object", "decode", "", "'host:pid' of the decode actor"),
)

COLUMNS: dict[str, Column] = {c.name: c for c in ROW_SCHEMA}

# What encode_write hands back to the driver (pipeline._decode counts and finishes shards).
DRIVER_COLUMNS = (
    "id",
    "shard",
    "shard_pending",
    "status",
    "error",
    "decode_ms",
    "decode_started_at",
)


def added_by(stage: str) -> tuple[str, ...]:
    """Names of the columns `stage` adds."""
    return tuple(c.name for c in ROW_SCHEMA if c.added_by == stage)


def array(name: str, cells) -> np.ndarray:
    """`cells` (one per row) as the column's declared numpy array."""
    col = COLUMNS[name]
    if col.dtype == "object":
        return objects(list(cells))
    if col.width:
        return np.asarray(cells, dtype=col.dtype).reshape(len(cells), col.width)
    return np.asarray(cells, dtype=col.dtype)


def defaults(stage: str, n: int) -> dict[str, list]:
    """For each column `stage` adds, n default cells (what a stage starts from)."""
    return {name: [_default(COLUMNS[name])] * n for name in added_by(stage)}


def _default(col: Column) -> Any:
    if col.default is _NO_DEFAULT:
        raise KeyError(f"row column {col.name!r} has no default: the {col.added_by} stage sets it")
    return list(col.default) if isinstance(col.default, list) else col.default


def new_rows() -> dict[str, list]:
    """Empty cell lists for the read stage's columns (add_row appends, to_batch converts)."""
    return {name: [] for name in added_by("read")}


def add_row(rows: dict[str, list], **cells: Any) -> None:
    """Append one row of read-stage columns: the given cells, the rest their defaults.

    An undeclared name, or a column without a default left out, raises."""
    unknown = set(cells) - set(rows)
    if unknown:
        raise KeyError(f"not read-stage row columns: {sorted(unknown)}")
    for name, cells_of in rows.items():
        cells_of.append(cells[name] if name in cells else _default(COLUMNS[name]))


def to_batch(rows: dict[str, list]) -> Batch:
    """Cell lists → the numpy batch Ray Data carries, each column as declared."""
    return {name: array(name, cells) for name, cells in rows.items()}


def column(batch: Batch, name: str) -> np.ndarray:
    """A column of the batch; the declared defaults when a skipped stage did not add it.

    A missing column that a stage always adds is a KeyError naming that stage."""
    if name in batch:
        return batch[name]
    col = COLUMNS[name]
    if col.added_by not in SKIPPABLE:
        raise KeyError(f"row column {name!r} is missing: the {col.added_by} stage adds it")
    return array(name, [_default(col)] * len(batch["id"]))


def reaching_write(batch: Batch) -> Batch:
    """Every column that reaches encode_write (none a stage dropped), a skipped stage's as its
    defaults; KeyError for any other missing column."""
    return {c.name: column(batch, c.name) for c in ROW_SCHEMA if c.dropped_by is None}


def stage_output(batch: Batch, stage: str, **cells) -> Batch:
    """A stage's result: the batch without the columns `stage` consumes, with `cells` (lists or
    arrays, one cell per row) set as declared. Every column the stage adds must be given."""
    unknown = set(cells) - set(COLUMNS)
    if unknown:
        raise KeyError(f"undeclared row columns from the {stage} stage: {sorted(unknown)}")
    missing = set(added_by(stage)) - set(cells)
    if missing:
        raise KeyError(f"the {stage} stage did not set its columns {sorted(missing)}")
    out = {k: v for k, v in batch.items() if k not in COLUMNS or COLUMNS[k].dropped_by != stage}
    out.update({name: array(name, v) for name, v in cells.items()})
    return out
