"""The .gtc file: code grids entropy-coded under a model's prior (gentrain.entropy), with a header that
says what decodes them.

    b"GTC1"  uint32 n (little endian)  the header as JSON  the stream's 32-bit words (little endian)

The header names the checkpoint, a fingerprint of the model's weights (any other weights would decode
garbage), the grids' shape and count, the batch size and device type the probabilities were computed with,
and the SHA-256 of the words. Everything else in the file is the stream itself, so its size is the rate.
"""

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch

from gentrain import files
from gentrain.errors import GentrainError

MAGIC, VERSION = b"GTC1", 1
HEADER = ("ckpt", "weights", "n", "code_shape", "num_codes", "batch_size", "device", "sha256")


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's weights and buffers, in state-dict order (16 hex digits)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def write(path: Path, header: dict, words: np.ndarray) -> int:
    """Write the header and the stream to `path` atomically; returns the file's size in bytes."""
    payload = words.astype("<u4").tobytes()
    head = json.dumps({"version": VERSION, **header, "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    with files.atomic(path, what="codes file") as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(head)) + head + payload)
    return path.stat().st_size


def is_stream(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read(path: Path) -> tuple[dict, np.ndarray]:
    """The header and the words of a .gtc file; a damaged or foreign file is one GentrainError."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GentrainError(f"cannot read {path} ({files.cause(e)})") from None
    damaged = GentrainError(f"{path} is a damaged .gtc file (truncated or changed since gentrain encode wrote it); "
                            f"encode the images again")
    if data[:4] != MAGIC or len(data) < 8:
        raise GentrainError(f"{path} is not a .gtc file") if data[:4] != MAGIC else damaged
    (size,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8:8 + size])
    except ValueError:
        raise damaged from None
    payload = data[8 + size:]
    if not isinstance(header, dict) or any(k not in header for k in HEADER):
        raise damaged
    if header.get("version", 0) > VERSION:
        raise GentrainError(f"{path} was written by a newer gentrain (.gtc version {header['version']}); upgrade gentrain")
    if len(payload) % 4 or hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise damaged
    return header, np.frombuffer(payload, dtype="<u4").astype(np.uint32)
