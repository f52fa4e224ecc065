"""codecs: latent shard round trips and per-sample errors, ids, images, tars."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import safetensors.numpy
from PIL import Image

from pid_batch import codecs
from pid_batch.codecs import ShardError, read_shard
from pid_batch.codecs.safetensors_file import safetensors_bytes

RNG = np.random.default_rng(0)


def _latents(n=3, shape=(4, 6, 5)) -> np.ndarray:
    return RNG.standard_normal((n, *shape)).astype(np.float32)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    return codecs.bf16_to_float32(codecs.float32_to_bf16(x))


def _errors(samples) -> dict[int, str]:
    return {s.index: s.error for s in samples if s.error}


# --- bfloat16 ---------------------------------------------------------------------------------


def test_bf16_conversion_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.concatenate(
        [RNG.standard_normal(1000).astype(np.float32) * 100, [0.0, -0.0, np.inf, -np.inf, 1e-40]]
    )
    ours = codecs.float32_to_bf16(x.astype(np.float32))
    ref = (
        torch.from_numpy(x.astype(np.float32))
        .to(torch.bfloat16)
        .view(torch.int16)
        .numpy()
        .view(np.uint16)
    )
    np.testing.assert_array_equal(ours, ref)
    back = codecs.bf16_to_float32(ours)
    np.testing.assert_array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.isnan(codecs.bf16_to_float32(codecs.float32_to_bf16(np.array([np.nan], np.float32))))[
        0
    ]


# --- safetensors shards -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16"])
def test_safetensors_round_trip(dtype):
    lat = _latents()
    data = codecs.write_safetensors_shard(
        lat, ["a", "b", "c"], captions=["cat", None, "dog"], sigmas=[0.0, 0.5, 1.0],
        seeds=[1, 2, 2**40], backbone="flux2", latent_format="diffusers", dtype=dtype,
    )  # fmt: skip
    samples = read_shard(data, "s3://b/lat/shard-01.safetensors")
    want = {
        None: lat,
        "float16": lat.astype(np.float16).astype(np.float32),
        "bfloat16": _bf16_round(lat),
    }[dtype]
    assert [s.id for s in samples] == ["a", "b", "c"] and [s.index for s in samples] == [0, 1, 2]
    for s, w in zip(samples, want, strict=True):
        assert s.error is None and s.latent.dtype == np.float32 and s.latent.flags.writeable
        np.testing.assert_array_equal(s.latent, w)
    assert [s.caption for s in samples] == ["cat", None, "dog"]
    assert [s.sigma for s in samples] == [0.0, 0.5, 1.0] and [s.seed for s in samples] == [
        1,
        2,
        2**40,
    ]
    assert {(s.backbone, s.latent_format, s.shard) for s in samples} == {
        ("flux2", "diffusers", "s3://b/lat/shard-01.safetensors")
    }


def test_safetensors_writer_is_readable_by_safetensors_library():
    lat = _latents().astype(np.float16)
    data = codecs.write_safetensors_shard(lat, ["a", "b", "c"], sigmas=[0.1, 0.2, 0.3])
    loaded = safetensors.numpy.load(data)
    np.testing.assert_array_equal(loaded["latents"], lat)
    np.testing.assert_allclose(loaded["sigmas"], [0.1, 0.2, 0.3])


def test_reads_bf16_written_by_safetensors_torch():
    torch = pytest.importorskip("torch")
    from safetensors.torch import save

    lat = torch.randn(2, 16, 4, 4).to(torch.bfloat16)
    data = save({"latents": lat, "seeds": torch.tensor([5, 6])}, metadata={"backbone": "sd3"})
    samples = read_shard(data, "x.safetensors")
    np.testing.assert_array_equal(samples[1].latent, lat[1].float().numpy())
    assert [s.id for s in samples] == ["x-000000", "x-000001"]  # default ids from the stem
    assert [s.seed for s in samples] == [5, 6] and samples[0].latent_format is None


def test_packed_rank2_latents_accepted():
    lat = _latents(2, (16, 64))
    samples = read_shard(codecs.write_safetensors_shard(lat, ["p", "q"]), "s.safetensors")
    assert all(s.error is None for s in samples) and samples[0].latent.shape == (16, 64)


def test_safetensors_seeds_from_metadata():
    lat = _latents(2)
    data = safetensors_bytes({"latents": ("F32", lat)}, {"seeds": json.dumps([7, None])})
    assert [s.seed for s in read_shard(data, "s.safetensors")] == [7, None]


def test_safetensors_per_sample_errors():
    lat = _latents(5)
    lat[1, 0, 0, 0] = np.nan
    lat[2, 1, 2, 3] = np.inf
    captions = ["ok", "ok", "ok", 17, "x" * 30_000]
    data = codecs.write_safetensors_shard(
        lat, ["a", "b", "c", "d", "a"], captions=captions, sigmas=[0, 0, 0, 0, 0.5]
    )
    samples = read_shard(data, "sh.safetensors")
    err = _errors(samples)
    assert set(err) == {1, 2, 3, 4}
    assert "sh.safetensors[1] id='b'" in err[1] and "NaN/Inf" in err[1]
    assert "id='c'" in err[2] and "NaN/Inf" in err[2]
    assert "id='d'" in err[3] and "caption must be a string" in err[3]
    assert "duplicate id 'a'" in err[4] and "first at index 0" in err[4]
    assert all(samples[i].latent is None for i in err) and samples[0].latent is not None
    assert samples[4].caption == "x" * 20_000  # long captions are truncated without an error


@pytest.mark.parametrize(
    "shape, reason",
    [
        ((3, 2, 2, 2, 2), "[C, h, w] or packed"),
        ((3, 5), "[C, h, w] or packed"),
        ((3, 0, 4, 4), "empty"),
        ((2, 5000, 2, 2), "exceeds limits"),
        ((1, 2, 3000, 3000), "exceeds limits"),
    ],
)
def test_safetensors_bad_latent_shapes_error_every_sample(shape, reason):
    lat = np.zeros(shape, np.float16)
    samples = read_shard(
        codecs.write_safetensors_shard(lat, [f"i{k}" for k in range(shape[0])]), "s.safetensors"
    )
    assert len(samples) == shape[0]
    assert all(
        s.error and reason in s.error and f"id='i{s.index}'" in s.error and s.latent is None
        for s in samples
    )


def test_limits_configurable():
    lat = np.zeros((1, 4, 8, 8), np.float32)
    data = codecs.write_safetensors_shard(lat, ["a"])
    assert read_shard(data, "s.safetensors")[0].error is None
    (s,) = read_shard(data, "s.safetensors", codecs.ShardLimits(max_elements=100))
    assert "exceeds limits" in s.error


def test_sigma_and_seed_validation():
    lat = _latents(3)
    data = safetensors_bytes(
        {"latents": ("F32", lat), "sigmas": ("F32", np.array([0.2, 1.5, np.nan], np.float32))},
        {"seeds": json.dumps([1, "x", 2**70])},
    )
    samples = read_shard(data, "s.safetensors")
    err = _errors(samples)
    assert set(err) == {1, 2} and samples[0].seed == 1 and samples[0].sigma == pytest.approx(0.2)
    assert "sigma must be" in err[1] and "seed must be" in err[1]
    assert "sigma must be" in err[2] and "seed must be" in err[2]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint64])
def test_seeds_tensor_must_be_integers(dtype):
    """A float (or uint64, which may not fit int64) seeds tensor: the shard is unreadable, and
    the one error row says why (a float32 cannot even hold every int64 seed)."""
    lat = _latents(2)
    st = {"float32": "F32", "float64": "F64", "uint64": "U64"}[np.dtype(dtype).name]
    seeds = np.array([1, 2], dtype)
    data = safetensors_bytes({"latents": ("F32", lat), "seeds": (st, seeds)}, {})
    with pytest.raises(ShardError, match=rf"seeds must be integers: .*got {st} \[2\]"):
        read_shard(data, "s.safetensors")


def test_parquet_seed_must_be_an_integer_per_row():
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = _latents(1)[0].tobytes()
    table = pa.table(
        {
            "latent": [raw, raw],
            "shape": [[4, 6, 5]] * 2,
            "dtype": ["float32"] * 2,
            "seed": pa.array([3.0, None], pa.float64()),  # a float column: that row is an error
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    samples = read_shard(sink.getvalue().to_pybytes(), "p.parquet")
    assert "seed must be an integer in int64 range, got 3.0" in samples[0].error
    assert samples[1].error is None and samples[1].seed is None


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "truncated"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "does not fit"),
        (b"\x04\x00\x00\x00\x00\x00\x00\x00nope", "unreadable safetensors header"),
        (b"garbage that is not a tensor file at all", "does not fit"),
    ],
)
def test_garbage_safetensors_is_shard_error(data, reason):
    with pytest.raises(ShardError, match=reason) as info:
        read_shard(data, "bad.safetensors")
    assert info.value.shard == "bad.safetensors"


def test_truncated_and_inconsistent_safetensors_are_shard_errors():
    good = codecs.write_safetensors_shard(_latents(2), ["a", "b"])
    for cut in (len(good) - 1, len(good) // 2, 20):
        with pytest.raises(ShardError):
            read_shard(good[:cut], "t.safetensors")
    lat = _latents(2)
    for tensors, meta, reason in [
        ({"x": ("F32", lat)}, {}, "needs a float tensor 'latents'"),
        ({"latents": ("I64", lat.astype(np.int64))}, {}, "needs a float tensor"),
        ({"latents": ("F32", lat[:0])}, {}, "no samples"),
        ({"latents": ("F32", lat)}, {"ids": '["only-one"]'}, "JSON list of 2"),
        ({"latents": ("F32", lat)}, {"captions": "{"}, "not JSON"),
        ({"latents": ("F32", lat)}, {"latent_format": "vae"}, "latent_format"),
        (
            {"latents": ("F32", lat), "sigmas": ("F32", np.zeros(3, np.float32))},
            {},
            "'sigmas' must be",
        ),
    ]:
        with pytest.raises(ShardError, match=reason):
            read_shard(safetensors_bytes(tensors, meta), "t.safetensors")


def test_unknown_suffix_is_shard_error():
    with pytest.raises(ShardError, match="unknown shard type"):
        read_shard(b"x", "shard.npz")


# --- Parquet shards ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_parquet_round_trip(dtype):
    lat = _latents(3)
    rows = [
        {
            "id": f"s{i}",
            "latent": lat[i],
            "dtype": dtype,
            "caption": c,
            "sigma": sg,
            "seed": sd,
            "backbone": "flux1",
            "latent_format": "pid",
        }
        for i, (c, sg, sd) in enumerate([("a", 0.25, 3), (None, None, None), ("c", 1.0, -4)])
    ]
    samples = read_shard(codecs.write_parquet_shard(rows), "p/shard.parquet")
    want = {
        "float32": lat,
        "float16": lat.astype(np.float16).astype(np.float32),
        "bfloat16": _bf16_round(lat),
    }[dtype]
    for s, w in zip(samples, want, strict=True):
        assert s.error is None
        np.testing.assert_array_equal(s.latent, w)
    assert [(s.id, s.caption, s.sigma, s.seed) for s in samples] == [
        ("s0", "a", 0.25, 3),
        ("s1", None, None, None),
        ("s2", "c", 1.0, -4),
    ]
    assert {(s.backbone, s.latent_format) for s in samples} == {("flux1", "pid")}


def test_parquet_per_sample_errors():
    lat = _latents(1)[0]
    good = {"latent": lat, "shape": list(lat.shape)}
    table = pa.table(
        {
            "id": ["ok", None, "bad-dtype", "short", "nan", "fmt", "../../etc/passwd"],
            "latent": [lat.tobytes(), lat.tobytes(), lat.tobytes(), lat.tobytes()[:-4],
                       np.full_like(lat, np.nan).tobytes(), lat.tobytes(), lat.tobytes()],
            "shape": [good["shape"]] * 7,
            "dtype": ["float32", "float32", "int8", "float32", "float32", "float32", "float32"],
            "latent_format": [None, None, None, None, None, "vae", None],
        }
    )  # fmt: skip
    sink = pa.BufferOutputStream()
    pa.parquet.write_table(table, sink)
    samples = read_shard(sink.getvalue().to_pybytes(), "q.parquet")
    err = _errors(samples)
    assert set(err) == {2, 3, 4, 5}
    assert samples[1].id == "q-000001"  # null id → default
    assert "dtype must be one of" in err[2] and "id='bad-dtype'" in err[2]
    assert "bytes" in err[3] and "id='short'" in err[3]
    assert "NaN/Inf" in err[4] and "latent_format" in err[5]
    assert "/" not in samples[6].id and ".." not in samples[6].id and samples[6].error is None


def test_parquet_shard_errors():
    with pytest.raises(ShardError, match="unreadable Parquet"):
        read_shard(b"PAR1 not really", "x.parquet")
    good = codecs.write_parquet_shard([{"id": "a", "latent": _latents(1)[0]}])
    with pytest.raises(ShardError):
        read_shard(good[: len(good) // 2], "x.parquet")
    sink = pa.BufferOutputStream()
    pa.parquet.write_table(pa.table({"id": ["a"], "latent": [b"1234"]}), sink)
    with pytest.raises(ShardError, match=r"missing columns \['shape', 'dtype'\]"):
        read_shard(sink.getvalue().to_pybytes(), "x.parquet")


def test_shard_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(ShardError("s.parquet", "boom")))
    assert (e.shard, e.reason, str(e)) == ("s.parquet", "boom", "shard s.parquet: boom")


# --- ids --------------------------------------------------------------------------------------


def test_sanitize_id():
    raw = ["../../etc/passwd", "a/b", "a_b", "a?b", "a\\b", "", ".", "..", ".hidden", "x" * 500, "x" * 501,
           "日本語", "日本", "a--b", "a\x00b", "a\nb", "ok-id_1.png", "-", "a..b"]  # fmt: skip
    out = [codecs.sanitize_id(r) for r in raw]
    for r, o in zip(raw, out, strict=True):
        assert (
            o
            and "/" not in o
            and ".." not in o
            and not o.startswith(".")
            and len(o) <= codecs.MAX_ID_CHARS
        ), (r, o)
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in o), (r, o)
        assert codecs.sanitize_id(r) == o  # deterministic
    assert len(set(out)) == len(raw)  # distinct inputs stay distinct
    assert codecs.sanitize_id("ok-id_1.png") == "ok-id_1.png" and codecs.sanitize_id("a_b") == "a_b"
    with pytest.raises(ValueError):
        codecs.sanitize_id(3)


def test_non_string_and_duplicate_sanitized_ids():
    lat = _latents(3)
    data = safetensors_bytes({"latents": ("F32", lat)}, {"ids": json.dumps([5, "a/b", "a/b"])})
    s = read_shard(data, "z.safetensors")
    assert s[0].id == "z-000000" and "id must be a string" in s[0].error
    assert s[1].error is None and s[1].id == codecs.sanitize_id("a/b")
    assert "duplicate id" in s[2].error


# --- images -----------------------------------------------------------------------------------


def _image(h=48, w=40) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return np.stack([x * 5 % 256, y * 5 % 256, (x + y) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize(
    "fmt, kw",
    [
        ("png", {}),
        ("png", {"png_compress_level": 9}),
        ("jpeg", {}),
        ("jpg", {"quality": 70}),
        ("webp", {}),
        ("webp", {"lossless": True}),
    ],
)
def test_encode_image_round_trip(fmt, kw):
    img = _image()
    data = codecs.encode_image(img, fmt, **kw)
    back = Image.open(io.BytesIO(data))
    assert back.format == {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}[fmt]
    assert back.size == (40, 48)
    arr = np.asarray(back.convert("RGB"))
    if fmt == "png" or kw.get("lossless"):
        np.testing.assert_array_equal(arr, img)
    else:
        assert np.abs(arr.astype(int) - img).mean() < 12


def test_encode_image_validation():
    img = _image()
    with pytest.raises(ValueError, match=r"\['jpeg', 'png', 'webp'\]"):
        codecs.encode_image(img, "gif")
    for bad in [img.astype(np.float32), img[..., :2], img[0], np.zeros((0, 4, 3), np.uint8)]:
        with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
            codecs.encode_image(bad, "png")
    for fmt, kw in [
        ("webp", {"quality": 101}),
        ("jpeg", {"quality": 0}),
        ("jpeg", {"lossless": True}),
        ("png", {"png_compress_level": 10}),
    ]:
        with pytest.raises(ValueError):
            codecs.encode_image(img, fmt, **kw)
    png = codecs.encode_image(img, "png", 95)  # quality is ignored for lossless formats
    assert png == codecs.encode_image(img, "png")
    assert codecs.IMAGE_FORMATS["jpeg"] == "jpg" and codecs.image_format("JPG") == "jpeg"


# --- tars -------------------------------------------------------------------------------------


def test_tar_round_trip_and_determinism():
    members = []
    for sid in ["b", "a", "x" * 128]:
        members += codecs.sample_members(sid, "png", sid.encode() * 3, {"id": sid, "seed": 1})
    t1, t2 = codecs.build_tar(members), codecs.build_tar(members)
    assert t1 == t2
    got = codecs.read_tar(t1)
    assert list(got) == [m[0] for m in members]  # given order kept
    assert got["a.png"] == b"aaa" and json.loads(got["b.json"]) == {"id": "b", "seed": 1}
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(t1)) as tf:
        assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in tf} == {(0, 0, 0, 0o644, "")}


def test_tar_rejects_bad_names_and_garbage():
    for bad in [
        [("a/b.png", b"")],
        [("../x", b"")],
        [(".x", b"")],
        [("", b"")],
        [("a.png", b""), ("a.png", b"")],
    ]:
        with pytest.raises(ValueError):
            codecs.build_tar(bad)
    with pytest.raises(ValueError, match="unreadable tar"):
        codecs.read_tar(b"\x01" * 1024)
