"""all-MiniLM-L6-v2 in plain torch: a BERT uncased WordPiece tokenizer and a 6-layer BERT
encoder built from the checkpoint's state dict, with sentence-transformers' pooling.

    tok = Tokenizer.from_dir(model_dir)            # vocab.txt, tokenizer_config.json, sentence_bert_config.json
    model = MiniLM.from_state_dict(sd, config)     # sd: the model.safetensors tensors
    emb = embed(model, tok, ["hello", "world"])    # (2, 384) float32, L2-normalised

Only torch and the standard library: the replica image has neither transformers nor
tokenizers. What "the same as Hugging Face" means is pinned by tests/test_replica_minilm.py,
which compares token ids with the `tokenizers` BertNormalizer + BertPreTokenizer + WordPiece
pipeline and embeddings with sentence-transformers.

The tokenizer follows the Rust `tokenizers` rules (what sentence-transformers loads), which
differ from Python's str methods in places: a control character (dropped before
whitespace is looked at) is one of category Cc, Cf, Co or Cs other than tab, newline and
carriage return, so an unassigned character (Cn) is kept; lowercasing maps each character
alone (no final-sigma rule); and its older Unicode tables put some 500 code points in other
categories (`_RUST_CATEGORY_RANGES`). Text is tokenized one
whitespace-separated run at a time and stops once `max_seq_length` is reached, so a
10,000-character input costs what its first few hundred words cost (every normalisation step
is local to such a run).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Unicode White_Space characters outside category C (the C ones are dropped as controls first).
_WHITESPACE = "\t\n\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_RUNS = re.compile(f"[^{_WHITESPACE}]+")
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


# Code points that the Rust `tokenizers` (0.23, older Unicode tables) sees in another category
# than Python 3.11's unicodedata (Unicode 14): mostly assigned since, which Rust takes as
# ordinary characters (kept, not split off, not stripped as accents), plus three whose
# category changed. Found by comparing every code point (tests/test_replica_minilm.py).
_RUST_CATEGORY_RANGES = {
    "Lo": ("61D 7FD 890-891 898-89F 8CA-8E2 9FD-9FE A76 AFA-AFF B55 C04 C3C C77 C84 D00 D3B-D3C "
           "D81 EBA 180F 1885-1886 1ABF-1ACE 1B7D-1B7E 1DF6-1DFB 2E43-2E4F 2E52-2E5D A82C A8C5 "
           "A8FF A9BD 10D24-10D27 10EAB-10EAD 10F46-10F50 10F55-10F59 10F82-10F89 11070 "
           "11073-11074 110C2 110CD 111CF 1123E 1133B 11438-1143F 11442-11444 11446 1144B-1144F "
           "1145A-1145B 1145D-1145E 11660-1166C 116B9 1182F-11837 11839-1183B 1193B-1193C 1193E "
           "11943-11946 119D4-119D7 119DA-119DB 119E0 119E2 11A01-11A0A 11A33-11A38 11A3B-11A47 "
           "11A51-11A56 11A59-11A5B 11A8A-11A96 11A98-11A9C 11A9E-11AA2 11C30-11C36 11C38-11C3D "
           "11C3F 11C41-11C45 11C70-11C71 11C92-11CA7 11CAA-11CB0 11CB2-11CB3 11CB5-11CB6 "
           "11D31-11D36 11D3A 11D3C-11D3D 11D3F-11D45 11D47 11D90-11D91 11D95 11D97 11EF3-11EF4 "
           "11EF7-11EF8 11FFF 12FF1-12FF2 13430-13438 16E97-16E9A 16F4F 16FE2 16FE4 1CF00-1CF2D "
           "1CF30-1CF46 1E000-1E006 1E008-1E018 1E01B-1E021 1E023-1E024 1E026-1E02A 1E130-1E136 "
           "1E2AE 1E2EC-1E2EF 1E944-1E94A 1E95E-1E95F"),
    "Po": "166D 111C9",
    "Mn": "1734",
}
_RUST_CATEGORY = {cp: cat for cat, text in _RUST_CATEGORY_RANGES.items() for item in text.split()
                  for cp in range(int(item.partition("-")[0], 16),
                                  int(item.rpartition("-")[2], 16) + 1)}


def _category(c: str) -> str:
    return _RUST_CATEGORY.get(ord(c)) or unicodedata.category(c)


def _is_control(c: str) -> bool:
    # Rust's "other" is Cc, Cf, Co and Cs: an unassigned (Cn) character is kept.
    return c not in "\t\n\r" and _category(c) in ("Cc", "Cf", "Co", "Cs")


def _is_cjk(c: str) -> bool:
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in _CJK)


def _is_punctuation(c: str) -> bool:
    cp = ord(c)
    return (33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
            or _category(c)[0] == "P")


class Tokenizer:
    """BERT uncased WordPiece: ids with [CLS] first and [SEP] last, truncated to `max_length`."""

    def __init__(self, vocab: Mapping[str, int], *, lowercase: bool = True,
                 strip_accents: bool | None = None, cjk: bool = True, max_length: int = 256,
                 unk: str = "[UNK]", cls: str = "[CLS]", sep: str = "[SEP]", pad: str = "[PAD]",
                 mask: str = "[MASK]", max_word_chars: int = 100) -> None:
        if max_length < 2:
            raise ValueError(f"max_length {max_length} leaves no room for [CLS] and [SEP]")
        self.vocab = dict(vocab)
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.cjk = cjk
        self.max_length = max_length
        self.max_word_chars = max_word_chars
        self.unk_id, self.cls_id, self.sep_id, self.pad_id = (
            self.vocab[t] for t in (unk, cls, sep, pad))
        # Special tokens written in the text are those tokens (matched exactly, before any
        # normalisation), as in Hugging Face's tokenizers.
        self.specials = {t: self.vocab[t] for t in (unk, cls, sep, pad, mask) if t in self.vocab}
        self._special_re = re.compile("|".join(
            re.escape(t) for t in sorted(self.specials, key=len, reverse=True)))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        d = Path(model_dir)
        vocab = {}
        with open(d / "vocab.txt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                vocab.setdefault(line.rstrip("\n"), i)
        conf = json.loads((d / "tokenizer_config.json").read_text())
        max_length = conf.get("model_max_length", 512)
        st_conf = d / "sentence_bert_config.json"
        if st_conf.exists():
            max_length = min(max_length, json.loads(st_conf.read_text())["max_seq_length"])
        return cls(vocab, lowercase=conf.get("do_lower_case", True),
                   strip_accents=conf.get("strip_accents"),
                   cjk=conf.get("tokenize_chinese_chars", True), max_length=max_length,
                   **{k: conf[k + "_token"] for k in ("unk", "cls", "sep", "pad", "mask")
                      if isinstance(conf.get(k + "_token"), str)})

    def encode(self, text: str) -> list[int]:
        ids = [self.cls_id]
        room = self.max_length - 2
        for piece in self._pieces(text):
            if len(ids) > room:
                break
            ids.append(piece)
        return ids + [self.sep_id]

    def batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), int64, padded on the right to the longest."""
        encoded = [self.encode(t) for t in texts]
        width = max((len(e) for e in encoded), default=0)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, :len(e)] = torch.tensor(e, dtype=torch.long)
            mask[row, :len(e)] = 1
        return ids, mask

    def _pieces(self, text: str) -> Iterator[int]:
        start = 0
        for special in self._special_re.finditer(text):
            yield from self._plain_pieces(text[start:special.start()])
            yield self.specials[special.group()]
            start = special.end()
        yield from self._plain_pieces(text[start:])

    def _plain_pieces(self, text: str) -> Iterator[int]:
        for run in _RUNS.finditer(text):
            for word in self._words(self._normalize(run.group())):
                yield from self._wordpiece(word)

    def _normalize(self, run: str) -> str:
        out = []
        for c in run:
            if c == "\0" or c == "\ufffd" or _is_control(c):
                continue
            out.append(f" {c} " if self.cjk and _is_cjk(c) else c)
        s = "".join(out)
        if self.strip_accents:
            s = "".join(c for c in unicodedata.normalize("NFD", s)
                        if _category(c) != "Mn")
        if self.lowercase:
            s = "".join(c.lower() for c in s)
        return s

    @staticmethod
    def _words(s: str) -> Iterator[str]:
        for chunk in s.split():
            start = 0
            for i, c in enumerate(chunk):
                if _is_punctuation(c):
                    if start < i:
                        yield chunk[start:i]
                    yield c
                    start = i + 1
            if start < len(chunk):
                yield chunk[start:]

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_word_chars:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    ids.append(self.vocab[sub])
                    break
                end -= 1
            else:
                return [self.unk_id]
            start = end
        return ids


# --- the encoder -------------------------------------------------------------------------

@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"{self.num_attention_heads} heads")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "BertConfig":
        conf = json.loads((Path(model_dir) / "config.json").read_text())
        if conf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {conf['hidden_act']!r}: only 'gelu' is implemented")
        if conf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are implemented")
        return cls(**{k: conf[k] for k in cls.__dataclass_fields__ if k in conf})


# Layers whose parameters start uninitialised (torch.empty): the checkpoint's tensors replace
# them at once, so nn.Linear's random init (or the meta device, whose first use imports
# sympy and torch's decompositions: over a second) would be wasted start-up time.

def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape), requires_grad=False)


class _Linear(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight, self.bias = _param(n_out, n_in), _param(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _LayerNorm(nn.Module):
    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = _param(n), _param(n), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class _Embedding(nn.Module):
    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.weight = _param(n, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = _Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = _Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = _Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = _LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = (self.word_embeddings(ids) + self.position_embeddings(positions)
             + self.token_type_embeddings.weight[0])  # one segment: token type 0 everywhere
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = _Linear(c.hidden_size, c.hidden_size)
        self.key = _Linear(c.hidden_size, c.hidden_size)
        self.value = _Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, h // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                             split(self.value(x)), attn_mask=keep)
        return out.transpose(1, 2).reshape(b, n, h)


class _Output(nn.Module):
    """dense, then LayerNorm of (that + the residual)."""

    def __init__(self, c: BertConfig, inner: int) -> None:
        super().__init__()
        self.dense = _Linear(inner, c.hidden_size)
        self.LayerNorm = _LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _Output(c, c.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = _Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Output(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


_UNUSED = {"embeddings.position_ids"}  # a buffer some checkpoints carry: always 0..n-1


class MiniLM(nn.Module):
    """BertModel's encoder (no pooler: sentence embeddings mean-pool the token states).
    Parameter names are the checkpoint's, so `from_state_dict` loads it strictly."""

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.config = c
        self.embeddings = _Embeddings(c)
        self.encoder = _Encoder(c)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], config: BertConfig) -> "MiniLM":
        """The module over SD's tensors themselves (no copy: views of a memory map stay
        views). The checkpoint's pooler and position_ids are not used; any other missing or
        unexpected name, or a wrong shape, raises."""
        model = cls(config)
        weights = {k: v for k, v in sd.items() if k not in _UNUSED and not k.startswith("pooler.")}
        model.load_state_dict(weights, strict=True, assign=True)
        return model.eval()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states (batch, seq, hidden) for ids and their attention mask."""
        keep = mask.bool()[:, None, None, :]  # broadcast over heads and query positions
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling over the attention mask, then L2 normalisation."""
    m = mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)


@torch.inference_mode()
def embed(model: MiniLM, tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """(len(texts), hidden) float32 sentence embeddings, unit length."""
    if not texts:
        return torch.empty((0, model.config.hidden_size))
    ids, mask = tokenizer.batch(texts)
    device = model.embeddings.word_embeddings.weight.device
    ids, mask = ids.to(device), mask.to(device)
    return mean_pool(model(ids, mask), mask).float().cpu()

