"""Self-describing checkpoints: written atomically, read with torch.load(weights_only=True).

A checkpoint is a plain dict of tensors and Python scalars: the resolved config, the dataset facts
the model was sized from, the step, and every state needed to continue (model, optimizers, grad
scalers, RNG, the running log sums). Nothing in it is a class or a callable.
"""

import os
import pickle
import shutil
from pathlib import Path

import torch

from gentrain import GentrainError

FORMAT, VERSION = "gentrain", 1
REQUIRED = ("family", "config", "data", "step", "model")


def run_dir_of(path: Path) -> Path:
    """The run folder a checkpoint belongs to: RUN/checkpoints/last.pt -> RUN."""
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def resolve(path) -> Path:
    """A checkpoint file, or the last checkpoint of a run folder."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise GentrainError(f"no checkpoint in {path} (looked for checkpoints/last.pt)")
    if not path.is_file():
        raise GentrainError(f"checkpoint not found: {path}")
    return path


def save(ckpt: dict, path: Path, also: Path | None = None) -> None:
    """Write `ckpt` to `path` (and the same bytes to `also`) without ever leaving a partial file there:
    write a temporary file, flush and fsync it, then rename it over the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **ckpt}, f)
            f.flush()
            os.fsync(f.fileno())
        if also is not None:
            also.unlink(missing_ok=True)
            try:
                os.link(tmp, also)  # a second name for the same fsynced bytes: no second write
            except OSError:  # a filesystem without hard links
                shutil.copyfile(tmp, also)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"is the disk full? {str(e).splitlines()[0]}"
        raise GentrainError(f"could not write checkpoint {path} ({reason}); "
                            f"the previous checkpoint there is intact") from None


def read(path: Path, what: str = "gentrain checkpoint"):
    """torch.load(weights_only=True) of a file that should be a `what`: a file that is not a PyTorch file,
    is truncated or corrupt, or carries a pickle payload (which is never run) is one GentrainError."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise GentrainError(f"{path} is not a {what} (not a PyTorch file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad CRC, EOF, a pickle payload, ...
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise GentrainError(f"{path} holds Python objects that a {what} never contains; "
                                f"refusing to load it (nothing in it was run)") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GentrainError(f"cannot read {what} {path}: it is truncated or corrupt ({first})") from None


def load(path) -> dict:
    """Read and check a gentrain checkpoint; every way it can be wrong ends in one GentrainError."""
    path = resolve(path)
    ckpt = read(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise GentrainError(f"{path} is not a gentrain checkpoint (a PyTorch file without gentrain's header)")
    if ckpt.get("version", 0) > VERSION:
        raise GentrainError(f"{path} was written by a newer gentrain (format {ckpt['version']}); upgrade gentrain")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise GentrainError(f"{path} is an incomplete gentrain checkpoint (missing {', '.join(missing)})")
    return ckpt
