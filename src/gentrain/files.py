"""Every file gentrain writes goes through here: written to a temporary name beside it, flushed and renamed,
so a failed write (a full disk, a read-only folder) never leaves a partial file under the final name and
the file that was there stays intact; and an OSError becomes one line that names the path and the cause.
Also the run folder's lock, so one run at a time writes into a folder.
"""

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from gentrain.errors import GentrainError

TMP = ".tmp"


CAUSES = {  # what the errno says, in the user's words
    errno.ENOSPC: "no space left on the device: the disk is full",
    errno.EDQUOT: "disk quota exceeded: the disk is full for this user",
    errno.EFBIG: "file too large for this file system or the file-size limit (ulimit -f)",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied (operation not permitted)",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


def cause(e: OSError) -> str:
    """An OSError's cause, chosen by its errno (not guessed from the operation that failed)."""
    if e.errno in CAUSES:
        return CAUSES[e.errno]
    return e.strerror or str(e).splitlines()[0]


def os_error(e: BaseException) -> OSError | None:
    """The OSError behind an exception: itself, or the one a library's own error was raised while handling
    (torch's zip writer turns a failed write of the file object it writes to into a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def make_dir(path: Path, what: str = "folder") -> Path:
    """mkdir -p, one line on failure (a regular file in the way, no permission, a read-only disk)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file" if blocker is not None else cause(e)
        raise GentrainError(f"cannot create the {what} {path} ({reason})") from None
    return path


def check_writable(path: Path, folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: under a regular file, in a folder without
    write permission, or (folder=False) a path that is a folder. Creates nothing."""
    path = Path(path)
    if not folder and path.is_dir():
        raise GentrainError(f"cannot write {path}: it is a folder")
    if folder and path.exists() and not path.is_dir():
        raise GentrainError(f"cannot write into {path}: it is a file, not a folder")
    existing = next(p for p in (path if folder else path.parent, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise GentrainError(f"cannot create {path} ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GentrainError(f"cannot write {path} ({existing}: permission denied)")
    return path


def temp_name(path: Path) -> Path:
    """The temporary name a write of `path` goes to: hidden, beside it, marked with this process."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP}")


@contextlib.contextmanager
def atomic(path: Path, note: str = "", what: str = ""):
    """`with atomic(path) as tmp:` write to `tmp`; on success it is fsynced, renamed to `path` and the folder
    fsynced (sync_folder), on any failure removed, and an OSError (or the RuntimeError torch's zip writer
    turns one into) is one line.
    `note` follows the cause in that line (e.g. "the previous checkpoint there is intact")."""
    path = Path(path)
    if path.is_dir():
        raise GentrainError(f"cannot write {path}: it is a folder")
    make_dir(path.parent)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if os_error(e) is not None:
            reason = cause(os_error(e))
        elif isinstance(e, RuntimeError) and any(m in str(e) for m in ("writ", "inline_container", "StreamWriter")):
            # torch's zip writer writing to a path itself: its RuntimeError carries no errno to go by
            reason = f"the write failed: {str(e).strip().splitlines()[0]}"
        else:
            raise
        raise GentrainError(f"could not write {what + ' ' if what else ''}{path} ({reason}){'; ' + note if note else ''}") from None


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it is on disk: after a power loss or an OS crash the new name is
    there, not the old one or none (the file's own fsync covers its bytes, not its name), as SQLite and
    PostgreSQL do after a rename. A filesystem that cannot sync a folder (EINVAL) orders its renames itself."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_text(path: Path, text: str, note: str = "") -> None:
    with atomic(path, note) as tmp:
        tmp.write_text(text)


def append_line(path: Path, line: str) -> None:
    """Append one line (metrics.jsonl). A line cut short by a full disk is repaired on the next start."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise GentrainError(f"could not write {path} ({cause(e)})") from None


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files that writes killed midway left in `folder` (called by the one process that
    holds the folder's lock, so none of them belongs to a live write)."""
    stale = [p for p in folder.glob(f".*{TMP}") if p.is_file()] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class RunLock:
    """An exclusive lock on a run folder (RUN/.lock, holding the owner's pid and host), held while a run
    trains there, so a second run or resume into the same folder is refused. The kernel releases it when
    the owner dies however it dies (flock), so a lock left by a killed run is simply taken over."""

    def __init__(self, run_dir: Path):
        self.path, self.fd = Path(run_dir) / ".lock", None

    def __enter__(self):
        make_dir(self.path.parent, "run folder")
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise GentrainError(f"cannot create {self.path} ({cause(e)})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise GentrainError(f"{self.path.parent} is in use by another gentrain run ({owner}); wait for it to "
                                f"finish, or give this one another hydra.run.dir") from None
        with contextlib.suppress(OSError):  # who holds it, for the message of a run refused (not on a full disk)
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


STARTUP = {".hydra", "train.log", ".lock", "reals.png", "checkpoints", "samples"}  # what a start writes first


def remove_failed_start(run_dir: Path) -> bool:
    """Remove a run folder that a failed start left with nothing in it but what every start writes first
    (Hydra's record of the config, the log, the lock, empty checkpoints/ and samples/). A folder with a
    checkpoint, a metrics line or anything else is left as it is. Returns whether it was removed."""
    if not run_dir.is_dir():
        return False
    entries = list(run_dir.iterdir())
    if any(p.name not in STARTUP or (p.name in ("checkpoints", "samples") and any(p.iterdir())) for p in entries):
        return False
    for p in entries:
        if p.is_dir():
            for q in sorted(p.rglob("*"), reverse=True):
                q.rmdir() if q.is_dir() else q.unlink()
            p.rmdir()
        else:
            p.unlink()
    run_dir.rmdir()
    return True


@contextlib.contextmanager
def run_folder(run_dir: Path):
    """Hold a run folder's lock while a run starts and trains there; if the start fails in a folder that
    was new or empty, leave nothing behind (remove_failed_start). GENTRAIN_RUN_LOCK tells the verb, and
    torchrun's workers, that the lock is held."""
    run_dir = Path(run_dir).resolve()
    fresh = not run_dir.exists() or not any(run_dir.iterdir())
    made = [p for p in run_dir.parents if not p.exists()]  # runs/gan-mnist/ of a first run: made here, removed too
    with RunLock(run_dir):
        os.environ["GENTRAIN_RUN_LOCK"] = str(run_dir)
        try:
            yield
        except BaseException as e:
            if fresh and not (isinstance(e, SystemExit) and e.code in (0, None)) and remove_failed_start(run_dir):
                for parent in made:  # innermost first; one a concurrent run has filled meanwhile stays
                    with contextlib.suppress(OSError):
                        parent.rmdir()
            raise
        finally:
            os.environ.pop("GENTRAIN_RUN_LOCK", None)


def lock_held(run_dir: Path) -> bool:
    """Is this run folder's lock held by this process or the gentrain that launched it (torchrun)?"""
    return os.environ.get("GENTRAIN_RUN_LOCK") == str(Path(run_dir).resolve())
