"""Parameter layouts (lists of tensor shapes) that mirror real models, for
optimizer-step benchmarks. Written from the architectures, no torchvision or
transformers needed.

- resnet50: torchvision's ResNet-50 v1.5 -- 161 tensors, 25,557,032 params
  (conv weights, BatchNorm weight+bias, fc weight+bias).
- bert_base: BERT-base uncased encoder + pooler -- 199 tensors,
  109,482,240 params (embeddings, 12 layers of attention/FFN/LayerNorm).
- small_tensors: 10,000 tensors of 1,000 elements (many-small-tensor stress).

Each takes a divisor that shrinks widths for quick smoke runs; divisor 1 is
the real model.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

Shape = Tuple[int, ...]


def resnet50(div: int = 1) -> List[Shape]:
    def c(n: int) -> int:
        return max(1, n // div)

    shapes: List[Shape] = [(c(64), 3, 7, 7), (c(64),), (c(64),)]  # stem conv + bn
    in_ch = c(64)
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        w, out = c(width), c(width * 4)
        for b in range(blocks):
            shapes += [(w, in_ch, 1, 1), (w,), (w,),  # 1x1 reduce + bn
                       (w, w, 3, 3), (w,), (w,),  # 3x3 + bn
                       (out, w, 1, 1), (out,), (out,)]  # 1x1 expand + bn
            if b == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]  # downsample conv + bn
            in_ch = out
    shapes += [(c(1000), in_ch), (c(1000),)]  # fc
    return shapes


def bert_base(div: int = 1) -> List[Shape]:
    hidden, ffn, vocab, positions = 768 // div, 3072 // div, 30522 // div, 512 // div
    shapes: List[Shape] = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(12):
        for _qkvo in range(4):
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # attention output LayerNorm
        shapes += [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


def small_tensors(div: int = 1) -> List[Shape]:
    return [(1000,)] * (10000 // div)


LAYOUTS: Dict[str, Callable[[int], List[Shape]]] = {
    "resnet50": resnet50,
    "bert_base": bert_base,
    "small10k": small_tensors,
}

# Divisors for --quick smoke runs: a few thousand to a few hundred thousand elements.
QUICK_DIV = {"resnet50": 16, "bert_base": 24, "small10k": 100}


def numel(shapes: List[Shape]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total
