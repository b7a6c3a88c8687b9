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
cell by cell, image by image. What else those bits depend on (the device model, torch, CUDA and cuDNN, the
flags that pick kernels) is `machine()`, which the file records; its decoder checks the decoded grids' digest.
"""

import hashlib
import platform
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from gentrain.errors import GentrainError

Logits = Callable[[torch.Tensor], torch.Tensor]  # (N, H, W) code indices -> (N, K, H, W) logits, causal


class LeftOver(GentrainError):
    """Words left in the stream after the grids its header counts: a wrong count, or a decoder gone astray."""


def coder():
    """constriction, or one line saying how to get it."""
    try:
        import constriction
    except ImportError:
        raise GentrainError("an entropy-coded .gtc file needs constriction: pip install 'gentrain[codec]'") from None
    return constriction


CUDNN = {"enabled": True, "benchmark": False, "deterministic": True}  # the cuDNN flags the coder runs under


def cell_probabilities(logits: Logits, grid: torch.Tensor, r: int, c: int) -> np.ndarray:
    """p(c_rc | the cells before it) for each grid, (N, K) float32: the grid's cells from (r, c) on must be 0.
    On CUDA, cuDNN's deterministic algorithms only: the same inputs must give the same bits every time."""
    with torch.backends.cudnn.flags(**CUDNN):
        return F.softmax(logits(grid)[:, :, r, c].float(), 1).cpu().numpy()


def machine(device: torch.device) -> dict:
    """What the prior's probabilities depend on besides the weights and the grids, bit for bit: the device's
    model (kernels differ from one CPU instruction set or GPU generation to the next), torch, CUDA and cuDNN
    versions, and the flags that choose among kernels."""
    cuda = device.type == "cuda"
    flags = {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
             "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if cuda:  # cuDNN's: the coder's own (CUDNN), and whether its convolutions may round through TF32
        flags |= {**{f"cudnn_{k}": v for k, v in CUDNN.items()}, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    return {"device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(), "arch": platform.machine(),
            "cuda": torch.version.cuda if cuda else None, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "flags": flags}


def cpu_name() -> str:
    try:  # Linux names the model; elsewhere platform.processor() does, or at least the architecture
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def digest(codes: torch.Tensor) -> str:
    """SHA-256 of code grids (N, H, W): their shape and their values as little-endian int64."""
    h = hashlib.sha256(str(list(codes.shape)).encode())
    h.update(codes.detach().cpu().long().numpy().astype("<i8").tobytes())
    return h.hexdigest()


def min_bits(num_codes: int) -> float:
    """The fewest bits a range coder can spend on one symbol: constriction's leaky categorical gives every one
    of the K symbols at least 1 of its 2^24 units of probability, so none has more than 2^24 - (K - 1)."""
    return -np.log2(1 - (num_codes - 1) / 2 ** 24)


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
               device: torch.device, name: str = "the stream") -> torch.Tensor:
    """The n code grids of `shape` that `compress` wrote into `words`, as int64 on the device. A stream with
    words left over after them held more than n grids: a GentrainError that calls `name` damaged."""
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
    if not decoder.maybe_exhausted():
        raise LeftOver(f"{name} holds more than the {n} code grids its header counts; it is damaged: "
                            f"encode the images again")
    return torch.cat(out)
