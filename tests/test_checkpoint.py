"""Checkpoints are written atomically and every way a file can be wrong is one clear error."""

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
        Path(f).write_bytes(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(GentrainError, match="No space left on device.*previous checkpoint there is intact"):
        checkpoint.save(minimal(2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


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
