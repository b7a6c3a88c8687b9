"""Checkpoints are written atomically and every way a file can be wrong is one clear error."""

import errno
import io
import os
import shutil
from pathlib import Path

import pytest
import torch

from gentrain import GentrainError, checkpoint


def minimal(step=1):
    return {"family": "gan", "config": {"model": {"family": "gan"}, "dataset": {"name": "mnist"}},
            "data": {"channels": 1, "image_size": 28},
            "step": step, "model": {"w": torch.full((3,), float(step))}}


def test_round_trip_with_weights_only_and_second_name(tmp_path):
    checkpoint.save(minimal(5), tmp_path / "last.pt", also=tmp_path / "step_5.pt")
    for name in ("last.pt", "step_5.pt"):
        ckpt = checkpoint.load(tmp_path / name)
        assert ckpt.step == 5 and ckpt.state["format"] == "gentrain" and torch.equal(ckpt.state["model"]["w"], torch.full((3,), 5.0))
    assert checkpoint.load(tmp_path).step == 5  # a folder resolves to its last.pt
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_failing_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(minimal(1), path)
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(GentrainError, match="no space left on the device: the disk is full.*previous checkpoint there is intact"):
        checkpoint.save(minimal(2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_every_rename_is_followed_by_a_sync_of_its_folder(tmp_path, monkeypatch):
    """The file's fsync keeps its bytes, the folder's its new name: each atomic write syncs the temporary
    file, renames it, then syncs the folder (checkpoints, with a second name, and any other file)."""
    from gentrain import files

    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                       fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append(("rename", str(b))), replace(a, b))[1])
    folder = tmp_path / "checkpoints"
    checkpoint.save(minimal(1), folder / "last.pt", also=folder / "step_1.pt")
    files.write_text(tmp_path / "eval.json", "{}")
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"] * 2
    assert events[1:3] == [("rename", str(folder / "last.pt")), ("fsync", str(folder))]
    assert events[4:6] == [("rename", str(tmp_path / "eval.json")), ("fsync", str(tmp_path))]


def test_a_damaged_pickle_is_called_damaged_and_only_real_objects_are_refused_as_such(tmp_path):
    """A byte flipped in a checkpoint's pickle record is damage (its CRC says so), whatever torch's
    weights_only unpickler makes of it; only an intact file that names a Python callable is refused as
    one holding Python objects."""
    import zipfile

    path = tmp_path / "last.pt"
    checkpoint.save(minimal(), path)
    good = path.read_bytes()
    (tmp_path / "good.pt").write_bytes(good)
    with zipfile.ZipFile(path) as z:
        record = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
        pickled = z.read(record)
    at = good.find(pickled)
    said = set()
    for i in range(2, len(pickled), 3):
        flipped = bytearray(good)
        flipped[at + i] ^= 0x10
        path.write_bytes(bytes(flipped))
        try:
            loaded = checkpoint.load(path)
        except GentrainError as e:
            assert "Python objects" not in str(e) and "damaged" in str(e) and "\n" not in str(e)
            said.add("CRC" in str(e) or "digest" in str(e))
        else:  # a flip torch does not read (a memo number): the same contents
            assert checkpoint.digest(loaded.state) == checkpoint.digest(checkpoint.load(tmp_path / "good.pt").state)
    assert said == {True}  # each one named by its CRC or its digest
    evil = tmp_path / "evil.pt"
    torch.save({**minimal(), "format": "gentrain", "version": 2, "extra": Payload(tmp_path / "pwned")}, evil)
    with pytest.raises(GentrainError, match="holds Python objects"):
        checkpoint.load(evil)


def test_a_header_only_checkpoint_is_incomplete_without_a_note_before(tmp_path, caplog):
    path = tmp_path / "header.pt"
    torch.save({"format": "gentrain", "version": 2}, path)
    with pytest.raises(GentrainError, match="incomplete gentrain checkpoint"):
        checkpoint.load(path)
    assert "digest" not in caplog.text


@pytest.mark.parametrize("code, said", [
    (errno.EACCES, "permission denied"), (errno.EPERM, "permission denied"), (errno.EROFS, "read-only file system"),
    (errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "disk quota exceeded"), (errno.ENOENT, "no such file or folder"),
])
@pytest.mark.parametrize("where", ["open", "write"])
def test_a_failed_write_says_what_its_errno_says(tmp_path, monkeypatch, code, said, where):
    """The cause comes from the errno, also through torch's zip writer (which raises a RuntimeError of its own
    for a write of the file it was given): a permission error is never called a full disk."""
    path = tmp_path / "last.pt"
    checkpoint.save(minimal(1), path)
    before = path.read_bytes()

    class Failing(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raise OSError(code, os.strerror(code))

    def failing_open(file, mode="r", *args, **kwargs):
        if where == "open":
            raise OSError(code, os.strerror(code), str(file))
        return Failing()

    monkeypatch.setattr(checkpoint, "open", failing_open, raising=False)
    with pytest.raises(GentrainError) as e:
        checkpoint.save(minimal(2), path)
    assert f"could not write checkpoint {path} (" in str(e.value) and said in str(e.value)
    assert ("full" in str(e.value)) == (code in (errno.ENOSPC, errno.EDQUOT))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_missing_file_and_empty_run_folder(tmp_path):
    with pytest.raises(GentrainError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "nope.pt")
    with pytest.raises(GentrainError, match="no checkpoint in"):
        checkpoint.load(tmp_path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(minimal(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GentrainError, match="truncated or corrupt"):
        checkpoint.load(path)


def test_corrupt_and_foreign_files(tmp_path):
    (tmp_path / "text.pt").write_text("hello, not a checkpoint")
    with pytest.raises(GentrainError, match="not a gentrain checkpoint"):
        checkpoint.load(tmp_path / "text.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(GentrainError, match="without gentrain's header"):
        checkpoint.load(tmp_path / "other.pt")
    torch.save({"format": "gentrain", "version": 1, "step": 3}, tmp_path / "partial.pt")
    with pytest.raises(GentrainError, match="incomplete gentrain checkpoint"):
        checkpoint.load(tmp_path / "partial.pt")
    torch.save({**minimal(), "format": "gentrain", "version": 99}, tmp_path / "future.pt")
    with pytest.raises(GentrainError, match="newer gentrain"):
        checkpoint.load(tmp_path / "future.pt")


class Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({**minimal(), "format": "gentrain", "version": 1, "extra": Payload(marker)}, path)
    with pytest.raises(GentrainError, match="refusing to load it"):
        checkpoint.load(path)
    assert not marker.exists()
    # and the payload is real: an unrestricted unpickle runs it
    torch.load(path, weights_only=False)
    assert marker.exists()


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["gan_c017a14", "vae_c017a14", "vqvae_c017a14"])
def test_checkpoints_from_before_the_family_contract_load_sample_and_resume(gentrain, tmp_path, data_root, name):
    """Tiny checkpoints written by gentrain at commit c017a14 (the GAN with lazy R1 and an EMA of G), whose
    config points at a data root of another machine: they rebuild, sample, and train on."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURES / f"{name}.pt", run / "checkpoints" / "last.pt")
    old = checkpoint.load(run)
    assert old.step == 2 and old.config.dataset.root == "/work/data"
    if name == "gan_c017a14":  # format 1, lazy R1 with d_norm=auto: D without batch norm, written out
        assert old.model_config["r1"] > 0 and old.model_config["d_norm"] == "none"
    gentrain("sample", f"ckpt={run}", "n=4", f"out={tmp_path / 'grid.png'}")
    assert (tmp_path / "grid.png").is_file()
    gentrain(f"resume={run}", "trainer.steps=4", f"dataset.root={data_root}", "trainer.log_every=1")
    resumed = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["step"] == 4 and resumed["config"]["model"] == old.model_config
    assert all(torch.isfinite(v).all() for v in resumed["model"].values() if v.is_floating_point())
