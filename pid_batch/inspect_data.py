"""Inspect a latent dataset before decoding: shards, samples, shapes, dtypes, sigma, problems."""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pid_batch import codecs, storage, timing
from pid_batch.redaction import redact

MAX_EXAMPLES = 3  # example ids kept per problem


def _stored_dtypes(data: bytes, name: str, n: int) -> Counter:
    """{stored latent dtype: samples} of a shard (read_shard hands out float32 whatever was stored)."""
    try:
        if name.lower().endswith(".safetensors"):
            return Counter({codecs.stored_dtype(data, name): n})
        col = pq.read_table(pa.BufferReader(data), columns=["dtype"]).column("dtype")
        return Counter(str(v) for v in col.to_pylist())
    except Exception:  # read_shard already accepted the file; this is only a detail
        return Counter({"unknown": n})


def _read(uri: str) -> tuple[str, list[codecs.LatentSample] | str, Counter]:
    """(uri, samples or why the shard is unreadable, stored dtypes)."""
    try:
        data = storage.read_bytes(uri)
        samples = codecs.read_shard(data, uri)  # the name the pipeline uses (ids derive from it)
    except codecs.ShardError as e:
        return uri, e.reason, Counter()
    except Exception as e:
        return uri, f"{type(e).__name__}: {redact(str(e))}", Counter()
    return uri, samples, _stored_dtypes(data, uri, len(samples))


def _rel(shard: str, root: str) -> str:
    """A shard URI relative to the inspected prefix (its file name when root is the shard)."""
    rest = shard[len(root.rstrip("/")) + 1 :] if shard.startswith(root.rstrip("/") + "/") else ""
    return rest or shard.rsplit("/", 1)[-1]


def inspect_dataset(uri: str, limit: int | None = None) -> dict[str, Any]:
    """Statistics and problems of a shard file or a prefix of shards (the first `limit` shards)."""
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    shards = storage.list_files(uri, suffixes=codecs.SHARD_SUFFIXES)
    if not shards:
        raise FileNotFoundError(f"no {' / '.join(codecs.SHARD_SUFFIXES)} shards at {uri}")
    todo = shards[:limit] if limit else shards
    shapes, dtypes, backbones, formats = Counter(), Counter(), Counter(), Counter()
    problems: dict[str, dict[str, Any]] = {}
    unreadable: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    dups: list[str] = []
    captions = seeds = sigmas_missing = total = ok = 0
    sig_lo, sig_hi = math.inf, -math.inf
    v_n, v_sum, v_sq, v_lo, v_hi = 0, 0.0, 0.0, math.inf, -math.inf
    with ThreadPoolExecutor(max_workers=4) as pool:
        for shard, samples, stored in pool.map(_read, todo):
            if isinstance(samples, str):
                unreadable.append({"shard": shard, "reason": samples})
                continue
            dtypes.update(stored)
            for s in samples:
                total += 1
                backbones[s.backbone or "unset"] += 1
                formats[s.latent_format or "unset"] += 1
                captions += s.caption is not None
                if s.id in seen and seen[s.id] != shard:
                    dups.append(s.id)
                seen.setdefault(s.id, shard)
                if s.error is not None:
                    for part in s.error.split("; "):
                        # grouped by the number-free reason; the first message is shown as it was
                        p = problems.setdefault(
                            timing.error_reason(part), {"count": 0, "message": part, "examples": []}
                        )
                        p["count"] += 1
                        if len(p["examples"]) < MAX_EXAMPLES:
                            p["examples"].append(f"{s.id} ({_rel(shard, uri)}[{s.index}])")
                    continue
                ok += 1
                seeds += s.seed is not None
                shapes["x".join(map(str, s.latent.shape))] += 1
                if s.sigma is None:
                    sigmas_missing += 1
                else:
                    sig_lo, sig_hi = min(sig_lo, s.sigma), max(sig_hi, s.sigma)
                lat = s.latent.astype(np.float64, copy=False)
                v_n, v_sum, v_sq = v_n + lat.size, v_sum + lat.sum(), v_sq + np.square(lat).sum()
                v_lo, v_hi = min(v_lo, float(lat.min())), max(v_hi, float(lat.max()))
    if dups:
        problems["id repeated across shards (outputs would overwrite each other)"] = {
            "count": len(dups),
            "message": f"id {dups[0]!r} is in more than one shard",
            "examples": dups[:MAX_EXAMPLES],
        }
    mean = v_sum / v_n if v_n else None
    return {
        "uri": uri,
        "shards_found": len(shards),
        "shards_read": len(todo),
        "shards_unreadable": unreadable,
        "samples": total,
        "ok": ok,
        "error": total - ok,
        "shapes": dict(shapes.most_common()),
        "dtypes": dict(dtypes.most_common()),
        "backbones": dict(backbones.most_common()),
        "latent_formats": dict(formats.most_common()),
        "sigma": {"min": sig_lo, "max": sig_hi} if ok > sigmas_missing else None,
        "sigma_missing": sigmas_missing,
        "captions": {"present": captions, "missing": total - captions},
        "seeds": {"present": seeds, "missing": ok - seeds},
        "latent_values": None
        if mean is None
        else {
            "mean": round(mean, 4),
            "std": round(math.sqrt(max(0.0, v_sq / v_n - mean**2)), 4),
            "min": round(v_lo, 4),
            "max": round(v_hi, 4),
        },
        "problems": dict(sorted(problems.items(), key=lambda kv: -kv[1]["count"])),
    }


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in c.items()) or "-"


def has_problems(d: dict[str, Any]) -> bool:
    """True when the inspection found problem samples or unreadable shards."""
    return bool(d["problems"] or d["shards_unreadable"])


def format_inspect(d: dict[str, Any]) -> str:
    """The inspection as text, problems last."""
    read = d["shards_read"]
    lines = [
        f"{d['uri']}: {d['shards_found']} shards"
        + (f" ({read} inspected)" if read != d["shards_found"] else ""),
        f"  samples      {d['samples']}  ok {d['ok']}  error {d['error']}",
        f"  shapes       {_counts(d['shapes'])}",
        f"  dtypes       {_counts(d['dtypes'])}",
        f"  backbones    {_counts(d['backbones'])}",
        f"  formats      {_counts(d['latent_formats'])}",
        "  sigma        "
        + (f"{d['sigma']['min']:.4g} .. {d['sigma']['max']:.4g}" if d["sigma"] else "-")
        + (f"  ({d['sigma_missing']} without: job default)" if d["sigma_missing"] else ""),
        f"  captions     {d['captions']['present']} present, {d['captions']['missing']} missing",
        f"  seeds        {d['seeds']['present']} present, {d['seeds']['missing']} missing",
    ]
    if v := d["latent_values"]:
        lines.append(
            f"  values       mean {v['mean']:.4g}  std {v['std']:.4g}  "
            f"range {v['min']:.4g} .. {v['max']:.4g}"
        )
    if d["shards_unreadable"]:
        lines.append(f"unreadable shards ({len(d['shards_unreadable'])}):")
        lines += [f"  {u['shard']}: {u['reason']}" for u in d["shards_unreadable"]]
    if d["problems"]:
        lines.append("problems:")
        for p in d["problems"].values():
            lines.append(f"  x{p['count']} {p['message']}  e.g. {', '.join(p['examples'])}")
    if not d["shards_unreadable"] and not d["problems"]:
        lines.append("no problems found")
    return "\n".join(lines)
