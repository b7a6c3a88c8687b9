"""End to end through the CLI: train each family on real data, resume, interrupt, sweep, fail cleanly."""

import json
import signal
import subprocess
import sys
import os

import pytest
import torch

from conftest import FAST, assert_one_line_error, start_cli, wait_for_log_lines


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run):
    return [{k: v for k, v in rec.items() if k not in ("img_per_s", "seconds")} for rec in metrics(run)]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("family, dataset, keys", [
    ("gan", "mnist", {"D/loss", "G/loss", "D(x)", "D(G(z))"}),
    ("vae", "fashion_mnist", {"vae/loss", "vae/recon", "vae/kl", "vae/nelbo"}),
])
def test_train_writes_a_complete_run_folder(gentrain, tmp_path, family, dataset, keys):
    run = tmp_path / "run"
    gentrain(f"model={family}", f"dataset={dataset}", "trainer.steps=4", *FAST, f"hydra.run.dir={run}")
    for f in ("reals.png", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/step_0000002.pt",
              "checkpoints/step_0000004.pt", "samples/step_0000002.png", "samples/step_0000004.png",
              ".hydra/config.yaml", "train.log"):
        assert (run / f).is_file(), f
    records = metrics(run)
    assert [r["step"] for r in records] == [2, 4]
    assert keys | {"step", "img_per_s", "seconds"} == set(records[0])
    assert all(r["img_per_s"] > 0 and r["seconds"] > 0 for r in records)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["family"] == family
    assert ckpt["config"]["dataset"]["name"] == dataset and ckpt["config"]["trainer"]["steps"] == 4
    assert set(ckpt["optim"]) == ({"D", "G"} if family == "gan" else {"vae"})
    assert ckpt["rng"]["torch"].dtype == torch.uint8


def test_training_lowers_the_vae_loss(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=vae", "trainer.steps=60", "trainer.log_every=10", "trainer.batch_size=64", f"hydra.run.dir={run}")
    nelbo = [r["vae/nelbo"] for r in metrics(run)]
    assert nelbo[-1] < 0.6 * nelbo[0], nelbo


def test_resume_matches_an_uninterrupted_run(gentrain, tmp_path):
    args = ["model=gan", *FAST, "trainer.log_every=3", "trainer.ckpt_every=5"]
    gentrain(*args, "trainer.steps=12", f"hydra.run.dir={tmp_path / 'straight'}")
    split = tmp_path / "split run, b=2"  # a folder name Hydra would misread unquoted
    gentrain(*args, "trainer.steps=7", f"hydra.run.dir='{split}'")  # ends off the log grid
    gentrain(f"resume='{split}'", "trainer.steps=12")
    a, b = weights(tmp_path / "straight/checkpoints/last.pt"), weights(split / "checkpoints/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(split)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split run, b=2", "straight"]  # no stray run folders


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_on_cpu(gentrain, tmp_path, precision):
    run = tmp_path / "run"
    gentrain("model=gan", *FAST, "trainer.steps=4", f"trainer.precision={precision}", f"hydra.run.dir={run}")
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert ckpt["scaler"]["G"] != {} if precision == "fp16" else ckpt["scaler"]["G"] == {}


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_resume_finishes_the_same_run(data_root, tmp_path, gentrain):
    args = ["model=vae", *FAST, "trainer.log_every=1", "trainer.ckpt_every=1000", "trainer.sample_every=1000"]
    gentrain(*args, "trainer.steps=400", f"hydra.run.dir={tmp_path / 'straight'}")
    run = tmp_path / "interrupted"
    proc = start_cli([*args, "trainer.steps=400", f"hydra.run.dir={run}"], tmp_path, data_root)
    wait_for_log_lines(run / "metrics.jsonl", 5, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip().startswith("gentrain: interrupted at step") and len(stderr.strip().splitlines()) == 1
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 5 <= stopped < 400
    gentrain(f"resume={run}")
    a, b = weights(tmp_path / "straight/checkpoints/last.pt"), weights(run / "checkpoints/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(run)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=vae", *FAST, "trainer.steps=4", f"hydra.run.dir={run}")
    good = (run / "checkpoints" / "last.pt").read_bytes()
    proc = gentrain(f"resume={run}", "optim.lr=1e10", "trainer.steps=40", check=False)
    assert_one_line_error(proc, "loss became NaN/inf at step", f"last good checkpoint: {run / 'checkpoints' / 'last.pt'}")
    assert (run / "checkpoints" / "last.pt").read_bytes() == good


@pytest.mark.slow
def test_failing_checkpoint_write_keeps_the_previous_one(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=gan", *FAST, "trainer.steps=2", f"hydra.run.dir={run}")
    good = (run / "checkpoints" / "last.pt").read_bytes()
    # A 64 KiB file-size limit: log lines and PNGs fit, a checkpoint does not (EFBIG on write).
    cmd = f"ulimit -f 64; exec {sys.executable} -m gentrain resume={run} trainer.steps=4"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "GENTRAIN_DATA": str(run.parent)})
    assert_one_line_error(proc, "could not write checkpoint", "previous checkpoint there is intact")
    assert (run / "checkpoints" / "last.pt").read_bytes() == good
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_existing_run_folder_is_never_overwritten(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=gan", *FAST, "trainer.steps=2", f"hydra.run.dir={run}")
    proc = gentrain("model=gan", *FAST, "trainer.steps=2", f"hydra.run.dir={run}", check=False)
    assert_one_line_error(proc, "already holds a run", f"resume={run}")


def test_resume_refuses_to_change_config_groups(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=gan", *FAST, "trainer.steps=2", f"hydra.run.dir={run}")
    assert_one_line_error(gentrain(f"resume={run}", "model=vae", check=False), "model=vae cannot change when resuming",
                          "was trained with model=gan")


def test_multirun_sweeps_every_combination_into_its_own_folder(gentrain, tmp_path):
    sweep = tmp_path / "sweep"
    gentrain("-m", "model=gan,vae", "optim.lr=1e-4,2e-4", *FAST, "trainer.steps=2", f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        ckpt = torch.load(job / "checkpoints" / "last.pt", weights_only=True)
        seen.add((ckpt["family"], ckpt["config"]["optim"]["lr"]))
        assert (job / "metrics.jsonl").is_file()
    assert seen == {("gan", 1e-4), ("gan", 2e-4), ("vae", 1e-4), ("vae", 2e-4)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_training_runs(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=gan", *FAST, "trainer.steps=4", "trainer.device=cuda", "trainer.precision=bf16",
             f"hydra.run.dir={run}")
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


def test_max_minutes_ends_the_run_as_its_last_step_would(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=vae", *FAST, "trainer.steps=1000", "trainer.max_minutes=0.0001", f"hydra.run.dir={run}")
    assert "trainer.max_minutes=0.0001 reached at step 1" in (run / "train.log").read_text()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 1
    assert [r["step"] for r in metrics(run)] == [1] and (run / "samples" / "step_0000001.png").is_file()
    gentrain(f"resume={run}", "trainer.max_minutes=null", "trainer.steps=4")
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert_one_line_error(gentrain("trainer.max_minutes=0", check=False), "trainer.max_minutes must be a positive number")


def test_a_run_killed_before_its_first_checkpoint_starts_again_in_its_folder(gentrain, tmp_path):
    """kill -9 during the first checkpoint write: metrics lines but no checkpoint, and the write's temporary
    file. The same command starts the run again there, and the temporary file goes."""
    run = tmp_path / "run"
    args = ["model=vae", *FAST, "trainer.steps=4", f"hydra.run.dir={run}"]
    gentrain(*args)
    (run / "checkpoints" / "last.pt").unlink()
    for p in (run / "checkpoints").glob("step_*.pt"):
        p.unlink()
    (run / "checkpoints" / ".last.pt.4242.tmp").write_bytes(b"half a checkpoint")
    proc = gentrain(*args)
    assert "holds no checkpoint" in proc.stdout + proc.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert [r["step"] for r in metrics(run)] == [2, 4]  # the old lines gave way to the new run's
    assert not list(run.rglob("*.tmp"))


def test_resume_repairs_a_damaged_metrics_file(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=vae", *FAST, "trainer.steps=4", f"hydra.run.dir={run}")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("garbage\n{\"step\": 5, \"vae/lo")  # a line of noise and one cut short by a kill
    proc = gentrain(f"resume={run}", "trainer.steps=6")
    assert "dropped 2 unreadable line(s)" in proc.stdout + proc.stderr
    assert [r["step"] for r in metrics(run)] == [2, 4, 6]


def test_plot_leaves_out_damaged_lines_with_a_note(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=vae", *FAST, "trainer.steps=4", f"hydra.run.dir={run}")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("garbage\n")
    proc = gentrain("plot", run)
    assert "left out 1 line(s)" in proc.stderr and (run / "metrics.png").is_file()
    (run / "metrics.jsonl").write_text("garbage\n")
    assert_one_line_error(gentrain("plot", run, check=False), "has no logged values")
