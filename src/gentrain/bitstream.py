"""The .gtc file: code grids entropy-coded under a model's prior (gentrain.entropy), with a header that
says what decodes them.

    b"GTC1"  uint32 n (little endian)  the header as JSON (n bytes)  the stream's 32-bit words (little endian)

The header names the checkpoint, a fingerprint of the model's weights (any other weights would decode
garbage), the grids' shape and count, the batch size, the device and versions the probabilities were
computed with (entropy.machine), the SHA-256 of the decoded grids (a decoder whose probabilities differ by
one ulp decodes other grids, and this says so), and its own SHA-256. Everything else in the file is the
stream itself, so its size is the rate.

Version 2 writes the header as canonical JSON (sorted keys, no spaces), and its `sha256` covers that header
without the `sha256` key followed by the words: a changed byte anywhere is refused, and so is a header that
is not the canonical form of what it parses to. Version 1's `sha256` covered the words only, and it had no
digest of the grids; it still decodes, with a note that nothing checks the result.
"""

import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

from gentrain import entropy, files
from gentrain.errors import GentrainError

MAGIC, VERSION = b"GTC1", 2
HEADER = ("ckpt", "weights", "n", "code_shape", "num_codes", "batch_size", "device", "sha256")  # every version
HEADER_2 = ("machine", "codes_sha256")


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's weights and buffers, in state-dict order (16 hex digits)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def signature(header: dict, payload: bytes) -> str:
    """SHA-256 of the header (but its own `sha256`) and the words."""
    return hashlib.sha256(canonical({k: v for k, v in header.items() if k != "sha256"}) + payload).hexdigest()


def write(path: Path, header: dict, words: np.ndarray) -> int:
    """Write the header and the stream to `path` atomically; returns the file's size in bytes."""
    payload = words.astype("<u4").tobytes()
    header = {**header, "version": VERSION}
    head = canonical({**header, "sha256": signature(header, payload)})
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
    """The header and the words of a .gtc file, its fields checked against each other; a damaged or foreign
    file is one GentrainError."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GentrainError(f"cannot read {path} ({files.cause(e)})") from None
    damaged = GentrainError(f"{path} is a damaged .gtc file (truncated or changed since gentrain encode wrote it); "
                            f"encode the images again")
    if data[:4] != MAGIC or len(data) < 8:
        raise GentrainError(f"{path} is not a .gtc file") if data[:4] != MAGIC else damaged
    (size,) = struct.unpack("<I", data[4:8])
    head, payload = data[8:8 + size], data[8 + size:]
    try:
        header = json.loads(head)
    except ValueError:
        raise damaged from None
    if not isinstance(header, dict) or any(k not in header for k in HEADER):
        raise damaged
    version = header.get("version", 1)
    if type(version) is not int or version < 1:
        raise damaged
    if version > VERSION:
        raise GentrainError(f"{path} was written by a newer gentrain (.gtc version {version}); upgrade gentrain")
    if len(payload) % 4:
        raise damaged
    if version == 1:
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:
            raise damaged
    elif head != canonical(header) or any(k not in header for k in HEADER_2) or \
            header["sha256"] != signature(header, payload):
        raise damaged
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    check_fields(path, header, words)
    return header, words


def check_fields(path: Path, header: dict, words: np.ndarray) -> None:
    """The header's fields as one another and the stream allow; a field that is not is named in one line."""
    def count(value, least: int) -> bool:
        return type(value) is int and value >= least

    def bad(what: str) -> GentrainError:
        return GentrainError(f"{path} is a damaged .gtc file: its header's {what}; encode the images again")

    shape, n, k = header["code_shape"], header["n"], header["num_codes"]
    for key, least in (("n", 1), ("batch_size", 1), ("num_codes", 2)):
        if not count(header[key], least):
            raise bad(f"{key}={header[key]!r} is not an integer of at least {least}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(count(s, 1) for s in shape)):
        raise bad(f"code_shape={shape!r} is not two positive integers")
    for key in ("ckpt", "weights", "device", *(("codes_sha256",) if "codes_sha256" in header else ())):
        if not isinstance(header[key], str):
            raise bad(f"{key}={header[key]!r} is not a string")
    if not isinstance(header.get("machine", {}), dict) or not isinstance(header.get("machine", {}).get("flags", {}), dict):
        raise bad(f"machine={header['machine']!r} does not say where it was made")
    # Every symbol costs at least entropy.min_bits; a range coder's stream is at most a few words shorter than
    # the information it holds, so a count beyond this is a header that lies (and would decode for hours).
    if n * math.prod(shape) * entropy.min_bits(k) > 32 * (len(words) + 2):
        raise bad(f"n={n} is more {shape[0]}x{shape[1]} code grids than its {len(words)}-word stream can hold")


def where(header: dict) -> str:
    """The device and versions a header says its probabilities were computed with, in words."""
    m = header.get("machine") or {}
    text = f"{m.get('device_name', 'an unrecorded device')} ({header['device']}), torch {header.get('torch', '?')}"
    if m.get("cuda"):
        text += f", CUDA {m['cuda']}, cuDNN {m.get('cudnn')}"
    flags = m.get("flags") or {}
    if flags.get("deterministic_algorithms"):
        text += ", deterministic algorithms"
    if header["device"] == "cuda" and "cudnn_allow_tf32" in flags:
        text += f", cuDNN TF32 {'on' if flags['cudnn_allow_tf32'] else 'off'}"
    return text
