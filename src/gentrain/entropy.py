"""Arithmetic coding of code grids under an autoregressive prior: the bitstream of `gentrain encode
out=FILE.gtc`.

An arithmetic coder spends -log2 p(c) bits on a symbol c, plus a few bits per stream (Witten, Neal & Cleary
1987, "Arithmetic coding for data compression"), so a grid costs about its -log2 p(codes) under the prior,
the cross-entropy the prior was trained to lower. The coder is constriction's range coder (Bamler 2022,
"Understanding Entropy Coding With Asymmetric Numeral Systems (ANS): a Statistician's Perspective";
range coding: Martin 1979), a first-in first-out stream of 32-bit words, fed with each cell's categorical
distribution.

The decoder must see the very probabilities the encoder used, bit for bit, or every symbol after the first
difference is wrong. A PixelCNN decodes cell by cell in raster order from the cells decoded so far, so the
encoder computes each cell's distribution in the same way: from the grid with that cell and every later one
still zero, in the same batches, on the same kind of device. One stream holds every image: batch by batch,
cell by cell, image by image.
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from gentrain.errors import GentrainError

Logits = Callable[[torch.Tensor], torch.Tensor]  # (N, H, W) code indices -> (N, K, H, W) logits, causal


def coder():
    """constriction, or one line saying how to get it."""
    try:
        import constriction
    except ImportError:
        raise GentrainError("an entropy-coded .gtc file needs constriction: pip install 'gentrain[codec]'") from None
    return constriction


def cell_probabilities(logits: Logits, grid: torch.Tensor, r: int, c: int) -> np.ndarray:
    """p(c_rc | the cells before it) for each grid, (N, K) float32: the grid's cells from (r, c) on must be 0.
    On CUDA, cuDNN's deterministic algorithms only: the same inputs must give the same bits every time."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        return F.softmax(logits(grid)[:, :, r, c].float(), 1).cpu().numpy()


@torch.no_grad()
def compress(logits: Logits, codes: torch.Tensor, batch_size: int) -> np.ndarray:
    """The code grids (N, H, W) as one range-coded stream of uint32 words."""
    constriction = coder()
    family = constriction.stream.model.Categorical(perfect=False)
    encoder = constriction.stream.queue.RangeEncoder()
    _, rows, cols = codes.shape
    for start in range(0, len(codes), batch_size):
        batch = codes[start:start + batch_size].long()
        grid = torch.zeros_like(batch)  # what the decoder will have seen: the cells before this one
        for r in range(rows):
            for c in range(cols):
                p = cell_probabilities(logits, grid, r, c)
                encoder.encode(batch[:, r, c].cpu().numpy().astype(np.int32), family, p)
                grid[:, r, c] = batch[:, r, c]
    return encoder.get_compressed()


@torch.no_grad()
def decompress(logits: Logits, words: np.ndarray, n: int, shape: list[int], batch_size: int,
               device: torch.device) -> torch.Tensor:
    """The n code grids of `shape` that `compress` wrote into `words`, as int64 on the device."""
    constriction = coder()
    family = constriction.stream.model.Categorical(perfect=False)
    decoder = constriction.stream.queue.RangeDecoder(words)
    rows, cols = shape
    out = []
    for start in range(0, n, batch_size):
        grid = torch.zeros(min(batch_size, n - start), rows, cols, dtype=torch.long, device=device)
        for r in range(rows):
            for c in range(cols):
                p = cell_probabilities(logits, grid, r, c)
                grid[:, r, c] = torch.from_numpy(decoder.decode(family, p).astype(np.int64)).to(device)
        out.append(grid)
    return torch.cat(out)
