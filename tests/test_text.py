"""Caption conditioning: CHI prompt, token selection, soft-capping, cache, stand-ins.

What is being checked: docs/model.md#text-conditioning.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import transformers

from pid_batch.model.text import (
    CHI_PROMPT,
    NullTextEncoder,
    TextEncoder,
    make_tiny_gemma,
    select_caption_tokens,
    validate_caption_embs,
)

L = 8  # tokens kept per caption in these tests (300 for the real checkpoints)
CAPS = ["A cat sleeping", "", "a red bicycle leaning against a brick wall at sunset", "zebra ☃ ü"]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return make_tiny_gemma(tmp_path_factory.mktemp("gemma"))


@pytest.fixture(scope="module")
def capped_dir(tmp_path_factory):
    # An extreme soft-cap so that applying it or not is plainly visible in the outputs.
    return make_tiny_gemma(
        tmp_path_factory.mktemp("gemma_cap"), hidden_size=16, head_dim=8, attn_logit_softcapping=0.5
    )


@pytest.fixture(scope="module")
def enc(gemma_dir):
    return TextEncoder.from_pretrained(gemma_dir, max_length=L)


def _reference_decoder(path, softcap: bool):
    """The decoder loaded plainly through transformers with eager attention."""
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if not softcap:
        config.attn_logit_softcapping = None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, config=config, attn_implementation="eager", dtype=torch.float32, local_files_only=True
    )
    return model.get_decoder().eval()


def _manual(path, captions, max_length, softcap=False):
    """docs/model.md#token-selection written out: pad CHI+caption to n_chi+L-2, run with mask,
    keep [0] + last L-1."""
    decoder = _reference_decoder(path, softcap)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "right"
    n_chi = len(tokenizer(CHI_PROMPT)["input_ids"])
    batch = tokenizer(
        [CHI_PROMPT + c for c in captions],
        max_length=n_chi + max_length - 2,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = decoder(**batch, use_cache=False).last_hidden_state
    keep = [0, *range(hidden.shape[1] - (max_length - 1), hidden.shape[1])]
    return hidden[:, keep]


def test_chi_prompt_is_the_spec_constant():
    lines = CHI_PROMPT.split("\n")
    assert len(lines) == 8
    assert lines[0].startswith('Given a user prompt, generate an "Enhanced prompt" that provides')
    assert lines[3] == "Here are examples of how to transform or refine prompts:"
    assert "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat" in lines[4]
    assert lines[5].endswith("a double-decker bus passing by towering glass skyscrapers.")
    assert lines[7] == "User Prompt: " and CHI_PROMPT.endswith("User Prompt: ")
    assert len(CHI_PROMPT) == 1057 and CHI_PROMPT.isascii()
    # sha256 of the official prefix (nv-tlabs/PiD @ 2c8814c: 8 lines joined with "\n", trailing
    # space, no final newline), computed from a transcription made apart from this module, so an
    # edit to CHI_PROMPT fails here.
    digest = hashlib.sha256(CHI_PROMPT.encode()).hexdigest()
    assert digest == "62b9ab89eebb0ac5ee4d264bf96bf19d2b81f504bc3852500efeaf5a34d638b1"


def test_select_caption_tokens_keeps_bos_and_tail():
    hidden = torch.arange(2 * 10 * 3).reshape(2, 10, 3)
    out = select_caption_tokens(hidden, 4)
    assert out.shape == (2, 4, 3)
    assert torch.equal(out, hidden[:, [0, 7, 8, 9]])
    with pytest.raises(ValueError, match="max_length"):
        select_caption_tokens(hidden, 11)


def test_tokens_are_bos_then_caption_then_pads(enc, gemma_dir):
    saved = json.loads((gemma_dir / "tokenizer_config.json").read_text())
    assert saved.get("padding_side", "left") == "left"  # like the real repo; encoder flips it
    assert enc.tokenizer.padding_side == "right"
    tok = enc.tokenizer
    ids, mask = enc.tokenize(["A cat sleeping", ""])
    assert ids.shape == mask.shape == (2, enc.n_chi + L - 2)
    assert (ids[:, 0] == tok.bos_token_id).all() and (ids != tok.eos_token_id).all()
    # The CHI's trailing "▁" merges into the first caption word, so the kept tail starts at n_chi-1.
    cap = tok(" A cat sleeping", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(cap)[0] == "▁A"
    tail = ids[0, enc.n_chi - 1 :].tolist()
    assert tail == cap + [tok.pad_token_id] * (L - 1 - len(cap))
    assert mask[0, enc.n_chi - 1 :].tolist() == [1] * len(cap) + [0] * (L - 1 - len(cap))
    # Empty caption: only the lone "▁" piece, then pads.
    assert tok.convert_ids_to_tokens(ids[1, enc.n_chi - 1 :].tolist()) == ["▁"] + ["<pad>"] * (
        L - 2
    )


def test_encode_matches_manual_spec_computation(enc, gemma_dir):
    ref = _manual(gemma_dir, CAPS, L)
    out = enc.encode(CAPS)
    assert out.shape == (len(CAPS), L, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    enc300 = TextEncoder.from_pretrained(gemma_dir)  # the released length, 300
    assert enc300.encode(["A cat sleeping"]).shape == (1, 300, 24)


def test_attention_mask_changes_pad_outputs_only(enc):
    ids, mask = enc.tokenize(["A cat sleeping"])
    with torch.no_grad():
        masked = enc.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        unmasked = enc.model(input_ids=ids, use_cache=False).last_hidden_state
    real = mask[0].bool()
    torch.testing.assert_close(masked[0, real], unmasked[0, real])  # causal: pads come later
    assert (masked[0, ~real] - unmasked[0, ~real]).abs().max() > 1e-2
    sel = enc.encode(["A cat sleeping"])[0]
    torch.testing.assert_close(sel, select_caption_tokens(masked, L)[0])


def test_softcapping_is_off_and_sdpa_runs(capped_dir, monkeypatch):
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    sdpa = TextEncoder.from_pretrained(capped_dir, max_length=L, cache_size=0)
    out = sdpa.encode(CAPS)
    assert len(calls) == sdpa.model.config.num_hidden_layers and out.shape[-1] == 16
    assert sdpa.model.config.attn_logit_softcapping is None
    eager = TextEncoder.from_pretrained(capped_dir, max_length=L, attn_implementation="eager")
    calls.clear()
    torch.testing.assert_close(eager.encode(CAPS), out, rtol=1e-5, atol=1e-5)
    assert not calls
    no_cap = _manual(capped_dir, CAPS, L)
    capped = _manual(capped_dir, CAPS, L, softcap=True)
    torch.testing.assert_close(out, no_cap, rtol=1e-5, atol=1e-5)
    assert (out - capped).abs().max() > 1e-2


def test_constructor_refuses_softcapped_model(capped_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(capped_dir, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(capped_dir, local_files_only=True)
    with pytest.raises(ValueError, match="attn_logit_softcapping=0.5"):
        TextEncoder(model, tok, max_length=L)


def test_from_pretrained_checks_directory(tmp_path, gemma_dir):
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="'flash'"):
        TextEncoder.from_pretrained(gemma_dir, attn_implementation="flash")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama'"):
        TextEncoder.from_pretrained(tmp_path)


def test_cache_encodes_each_caption_once_in_order(gemma_dir):
    enc = TextEncoder.from_pretrained(gemma_dir, max_length=L, cache_size=16)
    seen = []
    inner = enc._encode_uncached
    enc._encode_uncached = lambda caps: seen.append(list(caps)) or inner(caps)
    batch = ["b", "a", "b", None, "", "a"]
    out = enc.encode(batch)
    assert seen == [["b", "a", ""]]  # deduplicated within the batch, None is ""
    assert enc.cache_info() == {"hits": 3, "misses": 3, "size": 3, "max_size": 16}
    again = enc.encode(["a", "c", "b"])
    assert seen[-1] == ["c"] and enc.hits == 5 and enc.misses == 4
    fresh = TextEncoder.from_pretrained(gemma_dir, max_length=L, cache_size=0)
    torch.testing.assert_close(out, fresh.encode(["b", "a", "b", "", "", "a"]))
    torch.testing.assert_close(again, fresh.encode(["a", "c", "b"]))
    assert torch.equal(out[0], out[2]) and torch.equal(out[3], out[4])
    assert not torch.equal(out[0], out[1])
    assert fresh.cache_info()["size"] == 0


def test_cache_is_lru_bounded(gemma_dir):
    enc = TextEncoder.from_pretrained(gemma_dir, max_length=L, cache_size=2)
    enc.encode(["x", "y"])
    enc.encode(["x"])  # x is now most recent
    enc.encode(["z"])  # evicts y
    assert list(enc._cache) == ["x", "z"]
    misses = enc.misses
    enc.encode(["y"])
    assert enc.misses == misses + 1


def test_batch_size_does_not_change_results(gemma_dir):
    small = TextEncoder.from_pretrained(gemma_dir, max_length=L, batch_size=2, cache_size=0)
    big = TextEncoder.from_pretrained(gemma_dir, max_length=L, batch_size=32, cache_size=0)
    torch.testing.assert_close(small.encode(CAPS + ["one more"]), big.encode(CAPS + ["one more"]))


def test_caption_type_errors(enc):
    with pytest.raises(ValueError, match="int"):
        enc.encode(["ok", 3])
    with pytest.raises(ValueError, match="bytes"):
        enc.encode([b"bytes"])
    with pytest.raises(ValueError, match="single str"):
        enc.encode("not a list")
    assert enc.encode([]).shape == (0, L, 24)
    torch.testing.assert_close(enc.encode([None]), enc.encode([""]))


def test_huge_caption_is_truncated_to_fixed_shape(enc, gemma_dir):
    huge = "a small robot reading a book in a library " * 20_000  # 860k characters
    assert len(huge) > enc.max_caption_chars
    out = enc.encode([huge, "A cat"])
    assert out.shape == (2, L, 24) and torch.isfinite(out).all()
    # Cutting characters before tokenising must not change the kept tokens, even when every
    # token is the longest word piece of the vocabulary (the fewest tokens per character).
    enc300 = TextEncoder.from_pretrained(gemma_dir)
    words = [p for p in enc300.tokenizer.get_vocab() if p.startswith("▁") and p[1:].isalpha()]
    longest = max(words, key=len).replace("▁", " ")
    for caption in (huge, longest * 10_000):
        ids, mask = enc300.tokenize([caption])
        full = enc300.tokenizer(
            [CHI_PROMPT + caption],
            max_length=enc300.token_length,
            truncation=True,
            return_tensors="pt",
        )
        assert torch.equal(ids, full["input_ids"]) and mask.all()


def test_null_encoder_is_deterministic_per_caption():
    a = NullTextEncoder(dim=24, max_length=L)
    b = NullTextEncoder(dim=24, max_length=L, cache_size=0)
    out = a.encode(["cat", "dog", "cat", None])
    assert out.shape == (4, L, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out, b.encode(["cat", "dog", "cat", ""]), rtol=0, atol=0)
    assert not torch.equal(out[0], out[1])
    assert a.cache_info()["misses"] == 3 and a.hits == 1
    assert 0.8 < float(out.std()) < 1.2
    assert NullTextEncoder(dim=7).encode(["x"]).shape == (1, 300, 7)
    with pytest.raises(ValueError, match="int"):
        a.encode([1])
    with pytest.raises(ValueError, match="dim"):
        NullTextEncoder(dim=0)


def test_validate_caption_embs():
    full = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float16)
    out = validate_caption_embs(full, txt_len=6, dim=4)
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(full).float())
    short = validate_caption_embs(torch.ones(2, 4, dtype=torch.bfloat16), txt_len=6, dim=4)
    assert short.shape == (6, 4) and short[:2].eq(1).all() and short[2:].eq(0).all()
    bad = {
        "must be \\[L <= 6, 4\\], got \\[6, 5\\]": np.zeros((6, 5), np.float32),
        "got \\[7, 4\\]": np.zeros((7, 4), np.float32),
        "got \\[1, 6, 4\\]": np.zeros((1, 6, 4), np.float32),
        "got \\[0, 4\\]": np.zeros((0, 4), np.float32),
        "floating point": np.zeros((6, 4), np.int64),
        "non-finite": np.full((6, 4), np.nan, np.float32),
        "not a numeric array": "text",
    }
    for message, embs in bad.items():
        with pytest.raises(ValueError, match=f"of sample 'img-7'.*{message}"):
            validate_caption_embs(embs, txt_len=6, dim=4, sample_id="img-7")
