"""A character-level GPT-style language model on the Python standard library's own source.

Every Python installation carries this text, so the workload needs no download.

Corpus
------
- Files: the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``
  (no subdirectories), sorted by name. The set depends on the Python version
  (CPython 3.11: 168 files, 4.7 MB); ``info`` records the version, the file
  count and a digest of the file list, so a study names the text it used.
- Split by file: a file is held out for validation when
  ``zlib.crc32(name) % 10 == 0`` (about a tenth of the files; a file added
  in another Python version does not move the others between splits).
  Each split is the concatenation of its files in sorted order.
- Vocabulary (98 tokens): id 0 is tab, 1 is newline, 2..96 are the printable
  ASCII characters ``' '`` (32) to ``'~'`` (126), and 97 (``UNK``) stands for
  every other character (non-ASCII letters in comments and strings, form
  feeds, carriage returns). Files are read as UTF-8.

Training batches are windows of ``context + 1`` characters starting at
positions drawn uniformly (with replacement) by the trial's generator; inputs
are the first ``context`` characters, targets the next character at each
position. Validation: ``eval_windows`` windows at evenly spaced, fixed
positions of the validation text. Metrics: ``val_loss`` (nats per character,
mean over all positions) and ``val_bpc`` (bits per character, the goal metric).
``info['train_size']`` counts non-overlapping training windows (what one
"epoch" of the step budget means here).

Model
-----
Decoder-only transformer (GPT-2 layout, pre-norm): token and position
embeddings, ``layers`` blocks of causal self-attention and a 4x GELU MLP, each
behind a LayerNorm with a residual connection, a final LayerNorm and a linear
head. Attention is written out with Linear layers, matmuls, a causal mask and
softmax (no fused attention kernel), so that engines that stack trials by
layer type see only standard layers.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import sys
import sysconfig
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsgd.study.workloads.data import DataWorkload, _evaluate

VOCAB = "\t\n" + "".join(chr(c) for c in range(32, 127))
UNK = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1
VAL_MODULUS = 10  # one file in about ten goes to validation


def stdlib_files(stdlib_dir: str | None = None) -> list[str]:
    """The corpus files: sorted top-level ``*.py`` paths of the standard library."""
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py") and os.path.isfile(os.path.join(root, n)))
    if not names:
        raise FileNotFoundError(f"no *.py files in the standard library directory {root!r}")
    return [os.path.join(root, n) for n in names]


def is_validation_file(path: str) -> bool:
    return zlib.crc32(os.path.basename(path).encode()) % VAL_MODULUS == 0


def encode(text: str) -> Tensor:
    """Token ids (uint8) of ``text``: vocabulary characters to their index, anything else to UNK."""
    codes = torch.from_numpy(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64))
    table = torch.full((128,), UNK, dtype=torch.uint8)  # ASCII code -> id
    table[torch.tensor([ord(c) for c in VOCAB])] = torch.arange(len(VOCAB), dtype=torch.uint8)
    return torch.where(codes < 128, table[codes.clamp(max=127)], torch.tensor(UNK, dtype=torch.uint8))


def decode(ids: Tensor) -> str:
    return "".join(VOCAB[i] if i < UNK else "\ufffd" for i in ids.tolist())


@functools.lru_cache(maxsize=2)
def stdlib_corpus(stdlib_dir: str | None = None) -> tuple[Tensor, Tensor, dict[str, object]]:
    """(train ids, validation ids, description) of the standard-library corpus."""
    files = stdlib_files(stdlib_dir)
    parts = {"train": [], "val": []}
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            parts["val" if is_validation_file(path) else "train"].append(f.read())
    train, val = (encode("".join(parts[k])) for k in ("train", "val"))
    names = [os.path.basename(p) for p in files]
    info = {"corpus": "python-stdlib", "python": sys.version.split()[0], "files": len(files),
            "val_files": [n for n, p in zip(names, files) if is_validation_file(p)],
            "file_list_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16],
            "train_chars": len(train), "val_chars": len(val), "vocab_size": VOCAB_SIZE}
    return train, val, info


def fixed_windows(ids: Tensor, count: int, length: int) -> Tensor:
    """``count`` windows of ``length`` ids at evenly spaced positions (deterministic)."""
    if len(ids) < length + 1:
        raise ValueError(f"text of {len(ids)} characters is shorter than one window of {length}")
    starts = torch.linspace(0, len(ids) - length, count).long()
    return ids[starts[:, None] + torch.arange(length)]


# ---------------------------------------------------------------- model

class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by the number of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:  # x: (..., T, width); negative dims, so a leading trial dim works
        t, width = x.shape[-2], x.shape[-1]
        q, k, v = (h.unflatten(-1, (self.heads, width // self.heads)).transpose(-3, -2)
                   for h in self.qkv(x).split(width, dim=-1))  # (..., heads, T, head width)
        scores = (q @ k.transpose(-2, -1)) * (width // self.heads) ** -0.5
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(future, float("-inf")).softmax(-1)
        return self.proj((attn @ v).transpose(-3, -2).flatten(-2))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """Token ids (..., T) -> next-character logits (..., T, vocab)."""

    def __init__(self, vocab: int = VOCAB_SIZE, context: int = 64, width: int = 64, layers: int = 2,
                 heads: int = 4):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        for m in self.modules():  # GPT-2 initialisation: small normal weights, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[-1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context {self.context}")
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        return self.head(self.ln(self.blocks(h)))


# ---------------------------------------------------------------- workload

def sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-character cross-entropy (nats) over every position of every sequence."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def lm_metrics(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    loss = sequence_loss(logits, targets)
    return {"loss": loss, "bpc": loss / math.log(2)}


SIZES = {
    # 2 cores: a study of 6+ batch sizes in minutes
    "small": {"context": 32, "width": 32, "layers": 2, "heads": 2, "eval_windows": 64},
    # one GPU
    "large": {"context": 256, "width": 256, "layers": 4, "heads": 8, "eval_windows": 512},
}
GOALS = {"small": 3.3, "large": 2.0}  # val_bpc


def stdlib_charlm(size: str = "small", goal: float | None = None, stdlib_dir: str | None = None) -> DataWorkload:
    """The character-level language model workload (``size`` "small": CPU, "large": GPU);
    goal: val_bpc < ``goal`` (default per size)."""
    if size not in SIZES:
        raise ValueError(f"Invalid size: {size!r}; choose one of {', '.join(SIZES)}")
    cfg = dict(SIZES[size])
    context, eval_windows = cfg.pop("context"), cfg.pop("eval_windows")
    train, val, corpus_info = stdlib_corpus(stdlib_dir)
    n = len(train) - context

    def sample_batch(batch_size: int, generator: torch.Generator, device: torch.device):
        starts = torch.randint(n, (batch_size,), generator=generator)
        w = train[starts[:, None] + torch.arange(context + 1)].long()
        return w[:, :-1].to(device), w[:, 1:].to(device)

    def held_out(ids: Tensor) -> tuple[Tensor, Tensor]:
        w = fixed_windows(ids, eval_windows, context + 1).long()
        return w[:, :-1], w[:, 1:]

    eval_data = {"val": held_out(val), "train": held_out(train)}
    name = "stdlib-charlm" if size == "small" else f"stdlib-charlm-{size}"
    return DataWorkload(
        name=name, make_model=lambda: CharGPT(VOCAB_SIZE, context, **cfg), sample_batch=sample_batch,
        loss=sequence_loss, evaluate=functools.partial(_evaluate, eval_data, lm_metrics),
        goal_metric="val_bpc", goal=GOALS[size] if goal is None else goal, eval_data=eval_data, metrics=lm_metrics,
        info=dict(corpus_info, dataset="stdlib", model=f"charlm-{size}", context=context, **cfg,
                  eval_windows=eval_windows, train_size=len(train) // context))
