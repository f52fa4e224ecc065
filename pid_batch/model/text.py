"""Caption conditioning for PiD: Gemma-2 last hidden states of CHI prompt + caption.

The math: docs/model.md#text-conditioning.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pid_batch.config import TXT_MAX_LENGTH

# The fixed instruction prefix ("complex human instruction") of the official code, inherited from
# Sana/PixelDiT: data of the released model, reproduced verbatim (docs/model.md#instruction-prefix).
_CHI_LINES = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:',
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
)
CHI_PROMPT: str = "\n".join(_CHI_LINES)

DEFAULT_CACHE_SIZE = 256  # full size: 300 x 2304 bf16 = 1.4 MB per entry, ~350 MB in all
# Registered attention key: torch SDPA without Gemma-2's logit soft-capping. It must not contain
# "sdpa": transformers 5.x routes any such name through Gemma2's `_supports_sdpa = False` check.
_NOCAP_ATTN = "pid_sdp_nocap"


def _check_captions(captions: Sequence[str | None]) -> list[str]:
    """Captions as plain strings; None is the null caption "" (docs/model.md#null-caption)."""
    if isinstance(captions, (str, bytes)):
        raise ValueError(
            f"captions must be a sequence of str, got a single {type(captions).__name__}"
        )
    out = []
    for i, c in enumerate(captions):
        if c is None:
            c = ""
        if not isinstance(c, str):
            raise ValueError(f"caption {i} must be str or None, got {type(c).__name__}: {c!r:.80}")
        out.append(str(c))
    return out


class _CachedCaptionEncoder:
    """Shared `encode` with an LRU cache keyed by caption string and in-batch deduplication."""

    def __init__(self, max_length: int, dim: int, device: str | torch.device, cache_size: int):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (BOS + caption tokens), got {max_length}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.max_length, self.dim, self.device = max_length, dim, torch.device(device)
        self.cache_size = cache_size
        self.hits = 0  # captions served without running the encoder (cached or repeated in batch)
        self.misses = 0  # distinct captions run through the encoder
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def _encode_uncached(self, captions: list[str]) -> torch.Tensor:
        """[n, max_length, dim] on self.device, any float dtype."""
        raise NotImplementedError

    def encode(self, captions: Sequence[str | None]) -> torch.Tensor:
        """Embeddings [B, max_length, dim] float32 on self.device, in caption order."""
        caps = _check_captions(captions)
        found: dict[str, torch.Tensor] = {}
        with self._lock:
            for c in caps:
                if c not in found and c in self._cache:
                    self._cache.move_to_end(c)
                    found[c] = self._cache[c]
        todo = [c for c in dict.fromkeys(caps) if c not in found]
        if todo:
            with torch.no_grad():
                embs = self._encode_uncached(todo)
            # Clone cached rows so an entry does not pin the whole batch tensor's storage.
            keep = self.cache_size > 0
            new = {c: embs[i].clone() if keep else embs[i] for i, c in enumerate(todo)}
            found.update(new)
        with self._lock:
            if todo and self.cache_size > 0:
                self._cache.update(new)
                for c in new:
                    self._cache.move_to_end(c)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            self.misses += len(todo)
            self.hits += len(caps) - len(todo)
        if not caps:
            return torch.zeros(0, self.max_length, self.dim, device=self.device)
        return torch.stack([found[c] for c in caps]).float()

    def cache_info(self) -> dict[str, int]:
        """Counters for tests and timing: hits, misses, current and maximum cache entries."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "size": len(self._cache),
            "max_size": self.cache_size,
        }

    def clear_cache(self) -> None:
        """Drop cached embeddings (counters are kept)."""
        with self._lock:
            self._cache.clear()


def select_caption_tokens(hidden: torch.Tensor, max_length: int) -> torch.Tensor:
    """Keep BOS + the last (max_length - 1) positions: [B, S, D] -> [B, max_length, D].

    See docs/model.md#token-selection.
    """
    seq = hidden.shape[1]
    if not 2 <= max_length <= seq:
        raise ValueError(
            f"max_length must be in [2, {seq}] for a {seq}-token sequence, got {max_length}"
        )
    return torch.cat([hidden[:, :1], hidden[:, seq - (max_length - 1) :]], dim=1)


def _register_nocap_attention() -> None:
    """Register torch SDPA (and its mask builder) under a key that bypasses Gemma2's SDPA gate."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    # sdpa_attention_forward raises if a soft-cap reaches it, so soft-capping can't slip back in.
    AttentionInterface.register(_NOCAP_ATTN, sdpa_attention_forward)
    AttentionMaskInterface.register(_NOCAP_ATTN, sdpa_mask)


class TextEncoder(_CachedCaptionEncoder):
    """Gemma-2 decoder stack + tokenizer: captions -> [B, max_length, hidden].

    The model must have attention logit soft-capping disabled (`config.attn_logit_softcapping =
    None`): the official code (transformers 4.57.1) ran Gemma-2 through torch SDPA, which
    skipped it (docs/model.md#encoder). `from_pretrained` sets this up. The tokenizer is
    switched to right padding in place. A caption longer than the token budget is truncated to
    it (fixed shape as for any other); an enormous one is first cut to `max_caption_chars`
    characters, which still hold more tokens than the budget (no token spans more characters
    than the longest vocabulary piece), so the kept tokens are the same and tokenising it stays
    cheap.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = TXT_MAX_LENGTH,
        cache_size: int = DEFAULT_CACHE_SIZE,
        batch_size: int = 32,
    ):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        softcap = getattr(decoder.config, "attn_logit_softcapping", None)
        if softcap is not None:
            raise ValueError(
                f"attn_logit_softcapping={softcap}: the PiD reference ran Gemma-2 without attention"
                " soft-capping (SDPA); set config.attn_logit_softcapping=None before building the"
                " model, or use TextEncoder.from_pretrained"
            )
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(max_length, int(decoder.config.hidden_size), device, cache_size)
        self.dtype, self.batch_size = dtype, batch_size
        self.model = decoder.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        tokenizer.padding_side = "right"  # the Gemma tokenizer class defaults to left
        self.tokenizer = tokenizer
        chi_ids = tokenizer(CHI_PROMPT)["input_ids"]
        if chi_ids[0] != tokenizer.bos_token_id or tokenizer.pad_token_id is None:
            raise ValueError(
                f"tokenizer must add BOS (id {tokenizer.bos_token_id}) and have a pad token"
                f" (id {tokenizer.pad_token_id}); CHI prompt starts with id {chi_ids[0]}"
            )
        self.n_chi = len(chi_ids)  # CHI tokens including BOS
        self.token_length = self.n_chi + max_length - 2  # docs/model.md#token-selection
        longest_piece = max(len(piece) for piece in tokenizer.get_vocab())
        self.max_caption_chars = (self.token_length + 16) * longest_piece

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = TXT_MAX_LENGTH,
        *,
        attn_implementation: str = "sdpa",
        cache_size: int = DEFAULT_CACHE_SIZE,
        batch_size: int = 32,
    ) -> TextEncoder:
        """Load a Gemma-2 causal LM + tokenizer from a local directory, without soft-capping.

        `attn_implementation`: "sdpa" (torch SDPA, as the reference) or "eager" (same math).
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        root = Path(path)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in text encoder directory {str(path)!r}")
        if attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}"
            )
        config = AutoConfig.from_pretrained(root, local_files_only=True)
        if config.model_type != "gemma2":
            raise ValueError(
                f"PiD conditions on Gemma-2 embeddings; {str(path)!r} holds {config.model_type!r}"
            )
        # transformers >= 5 has Gemma2 `_supports_sdpa = False` and falls back to eager attention
        # *with* the 50.0 soft-cap; 4.57.1 (the reference) used SDPA, which ignored it.
        config.attn_logit_softcapping = None
        impl = "eager"
        if attn_implementation == "sdpa":
            _register_nocap_attention()
            impl = _NOCAP_ATTN
        model = AutoModelForCausalLM.from_pretrained(
            root, config=config, dtype=dtype, attn_implementation=impl, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        return cls(model, tokenizer, device, dtype, max_length, cache_size, batch_size)

    def tokenize(self, captions: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """CHI + caption, right-padded/truncated to token_length: input_ids, attention_mask [B, S]."""
        texts = [CHI_PROMPT + c[: self.max_caption_chars] for c in _check_captions(captions)]
        enc = self.tokenizer(
            texts,
            max_length=self.token_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    def _encode_uncached(self, captions: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(captions), self.batch_size):
            ids, mask = self.tokenize(captions[i : i + self.batch_size])
            hidden = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
            ).last_hidden_state  # [b, token_length, D], after the final RMSNorm
            out.append(select_caption_tokens(hidden, self.max_length))  # [b, max_length, D]
        return torch.cat(out)


class NullTextEncoder(_CachedCaptionEncoder):
    """Stand-in with no language model, for tiny random-weight presets: N(0, 1) seeded by sha256.

    Each caption maps to a fixed [max_length, dim] Gaussian draw (same on every machine), so
    different captions condition a net differently; the values carry no meaning.
    """

    def __init__(
        self,
        dim: int,
        max_length: int = TXT_MAX_LENGTH,
        device: str | torch.device = "cpu",
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        super().__init__(max_length, dim, device, cache_size)

    def _encode_uncached(self, captions: list[str]) -> torch.Tensor:
        rows = []
        for c in captions:
            digest = hashlib.sha256(c.encode("utf-8", errors="surrogatepass")).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            rows.append(torch.randn(self.max_length, self.dim, generator=gen))
        return torch.stack(rows).to(self.device)  # [n, max_length, dim]


def validate_caption_embs(
    embs: Any, txt_len: int, dim: int, sample_id: str | None = None
) -> torch.Tensor:
    """Precomputed embeddings [L <= txt_len, dim] -> float32 CPU [txt_len, dim], zero rows appended.

    The reference fills unused positions with Gemma's pad-token embeddings, not zeros: store all
    txt_len rows (as `TextEncoder.encode` returns them) for parity.
    """
    where = "" if sample_id is None else f" of sample {sample_id!r}"
    try:
        t = embs.detach().cpu() if isinstance(embs, torch.Tensor) else torch.tensor(embs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"caption_embs{where} is not a numeric array: {e}") from e
    if not t.is_floating_point():
        raise ValueError(f"caption_embs{where} must be floating point, got {t.dtype}")
    if t.ndim != 2 or t.shape[1] != dim or not 1 <= t.shape[0] <= txt_len:
        raise ValueError(
            f"caption_embs{where} must be [L <= {txt_len}, {dim}], got {list(t.shape)}"
        )
    t = t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"caption_embs{where} has non-finite values")
    if t.shape[0] < txt_len:
        t = torch.cat([t, t.new_zeros(txt_len - t.shape[0], dim)])
    return t


# Test support: a tiny random Gemma-2 + BPE tokenizer on disk (no hub access needed).
_TINY_CORPUS = (
    *_CHI_LINES,
    "A cat sleeping on a warm sunny windowsill",
    "a red bicycle leaning against a brick wall at sunset",
    "portrait of an old man with a grey beard, studio lighting",
    "a bowl of fresh fruit on a wooden kitchen table",
    "snowy mountains above a quiet blue lake, wide angle photo",
    "a small robot reading a book in a library",
)


def make_tiny_gemma(
    directory: str | Path,
    hidden_size: int = 24,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 12,
    vocab_size: int = 512,
    attn_logit_softcapping: float | None = 50.0,
    seed: int = 0,
) -> Path:
    """Write a random-weight Gemma2ForCausalLM + Gemma BPE tokenizer that `from_pretrained` loads.

    The tokenizer mimics Gemma's: spaces become "▁" attached to the following word, byte
    fallback, BOS added, no EOS, pad "<pad>" (id 0), padding side left as in the real repo.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Gemma2Config, Gemma2ForCausalLM, GemmaTokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)],
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS, trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = GemmaTokenizer(
        vocab=trained["vocab"],
        merges=[tuple(m) for m in trained["merges"]],
        add_bos_token=True,
        add_eos_token=False,
    )
    tokenizer.save_pretrained(out)

    config = Gemma2Config(
        vocab_size=len(trained["vocab"]),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=1,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        max_position_embeddings=2048,
        attn_logit_softcapping=attn_logit_softcapping,
        initializer_range=0.2,  # large enough that attention and masking visibly move outputs
        pad_token_id=specials.index("<pad>"),
        eos_token_id=specials.index("<eos>"),
        bos_token_id=specials.index("<bos>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma2ForCausalLM(config)
    model.save_pretrained(out)
    return out
