"""A character-level language model on text that ships with Python: a small decoder-only
transformer (its own causal self-attention with separate ``nn.Linear`` Q, K, V and output
projections, pre-LayerNorm blocks, a GELU MLP, learned positions, and a head tied to the
token embedding) trained to predict the next character of Python's standard-library
source.

Data (:func:`text_windows`): the source files of :data:`SOURCES` (standard-library
modules found through ``importlib``), concatenated in that order; characters are ASCII
codes (anything else becomes code 0), so the vocabulary has 128 symbols. The last 10 %
of the text is held out for validation. Both parts are cut into non-overlapping windows
of ``context + 1`` characters: the input is a window's first ``context``, the target its
last ``context`` (the next character at every position). The text differs a little
between Python releases (so do the losses).

Which layers a Kronecker-factored optimizer preconditions
(:meth:`hpcqn.torch.MKOR.describe`): every Q, K, V, output and MLP projection; the
embeddings, the LayerNorms and the tied head are the first-order optimizer's.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Standard-library modules whose source is the corpus (present from Python 3.10 on)
SOURCES = ("argparse", "dataclasses", "difflib", "functools", "inspect", "textwrap",
           "string", "heapq", "fractions", "statistics", "shlex", "calendar", "configparser",
           "csv", "enum", "typing", "tokenize", "pprint", "gettext", "locale")
VOCAB = 128
HELD_OUT = 0.1


def corpus(max_chars: int | None = None) -> np.ndarray:
    """The source text of :data:`SOURCES` as ASCII codes (``uint8``; non-ASCII
    characters become 0), its first ``max_chars`` when given."""
    parts = []
    for name in SOURCES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue  # a module that is not pure Python on this interpreter
        parts.append(Path(spec.origin).read_bytes())
    codes = np.frombuffer(b"\n".join(parts), dtype=np.uint8).copy()
    codes[codes >= VOCAB] = 0
    if not codes.size:
        raise RuntimeError("no standard-library source found for the character corpus")
    return codes[:max_chars] if max_chars is not None else codes


def text_windows(context: int = 64, max_chars: int | None = None
                 ) -> dict[str, torch.Tensor]:
    """``train_x``, ``train_y``, ``test_x``, ``test_y``: windows of ``context`` character
    codes (int64) and their next characters, the test windows from the held-out last
    10 % of the text (see the module docs)."""
    if context < 1:
        raise ValueError(f"context must be at least 1, got {context}")
    codes = torch.as_tensor(corpus(max_chars).astype(np.int64))
    split = int(codes.numel() * (1 - HELD_OUT))
    out = {}
    for part, text in (("train", codes[:split]), ("test", codes[split:])):
        n = (text.numel() - 1) // context
        if n < 1:
            raise ValueError(f"the {part} text ({text.numel()} characters) is shorter than "
                             f"one window of {context + 1}")
        windows = text[: n * context + 1]
        out[f"{part}_x"] = windows[:-1].reshape(n, context)
        out[f"{part}_y"] = windows[1:].reshape(n, context)
    return out


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with its own Q, K, V and output projections (each
    an ``nn.Linear``, so each is preconditioned)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape

        def split(h: torch.Tensor) -> torch.Tensor:  # (B, T, W) -> (B, heads, T, W/heads)
            return h.view(b, t, self.heads, w // self.heads).transpose(1, 2)

        y = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)),
                                                       split(self.v(x)), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention, then a GELU MLP four times as wide."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Decoder-only transformer over :data:`VOCAB` characters: token and position
    embeddings, ``layers`` blocks, a final LayerNorm, and a head whose weight is the token
    embedding's (tied). ``forward(idx)`` maps ``(B, T)`` codes to ``(B, T, VOCAB)``
    logits."""

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.tokens.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            if name.endswith("out.weight") or name.endswith("mlp.2.weight"):
                # residual projections: GPT-2's scaling by the depth
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} characters is longer than the context "
                             f"{self.context}")
        x = self.tokens(idx) + self.positions(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every predicted character (in nats)."""
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
