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
    ("gan", "mnist", {"D/loss", "G/loss", "D/real", "D/fake", "D/r1"}),  # hinge: raw scores; lazy R1
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


def test_a_learning_rate_schedule_decays_and_resumes_as_one_run(gentrain, tmp_path):
    """optim/scheduler=linear: the learning rate falls from optim.lr to 0 over the horizon, and a run
    resumed halfway (off the log grid) trains as the uninterrupted one, its schedule included."""
    args = ["model=gan", *FAST, "trainer.log_every=3", "trainer.ckpt_every=5", "optim/scheduler=linear",
            "optim.scheduler.total_iters=12"]
    gentrain(*args, "trainer.steps=12", f"hydra.run.dir={tmp_path / 'straight'}")
    gentrain(*args, "trainer.steps=7", f"hydra.run.dir={tmp_path / 'split'}")
    halfway = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)
    assert halfway["optim"]["G"]["param_groups"][0]["lr"] == pytest.approx(8e-4 * (12 - 7) / 12)
    gentrain(f"resume={tmp_path / 'split'}", "trainer.steps=12")
    a, b = (torch.load(tmp_path / run / "checkpoints/last.pt", weights_only=True) for run in ("straight", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    assert [g["lr"] for o in ("D", "G") for g in b["optim"][o]["param_groups"]] == [0.0, 0.0]
    assert b["scheduler"]["G"]["last_epoch"] == 12

    proc = gentrain(f"resume={tmp_path / 'split'}", "optim/scheduler=linear", "optim.scheduler.total_iters=24",
                    check=False)
    assert_one_line_error(proc, "optim.scheduler.total_iters cannot change when resuming")
    proc = gentrain(f"resume={tmp_path / 'split'}", "optim.lr=1e-4", check=False)
    assert_one_line_error(proc, "optim.lr cannot change when resuming a run with a learning-rate schedule")
    proc = gentrain(f"resume={tmp_path / 'split'}", "trainer.steps=14")
    assert "the learning-rate schedule ends at step 12" in proc.stderr + proc.stdout


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


def test_sigterm_writes_a_checkpoint_says_so_in_one_line_and_exits_143(data_root, tmp_path):
    """What SLURM and Kubernetes send before they stop a job: a checkpoint at a step boundary, one line,
    and 128 + 15, the status a shell gives a process that SIGTERM ended (Ctrl-C's is 130)."""
    run = tmp_path / "run"
    proc = start_cli(["model=vae", *FAST, "model.ch=8", "trainer.steps=100000", "trainer.log_every=1",
                      "trainer.ckpt_every=100000", "trainer.sample_every=100000", f"hydra.run.dir={run}"],
                     tmp_path, data_root)
    wait_for_log_lines(run / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert len(lines) == 1 and lines[0].startswith(f"gentrain: stopped by SIGTERM at step {stopped};"), stderr
    assert f"continue with: gentrain resume={run}" in lines[0]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=vae", *FAST, "trainer.steps=4", f"hydra.run.dir={run}")
    good = (run / "checkpoints" / "last.pt").read_bytes()
    proc = gentrain(f"resume={run}", "optim.lr=1e10", "trainer.steps=40", check=False)
    assert_one_line_error(proc, "loss became NaN/inf at step", f"last good checkpoint: {run / 'checkpoints' / 'last.pt'}")
    assert (run / "checkpoints" / "last.pt").read_bytes() == good


def test_weights_that_diverge_after_a_finite_loss_are_never_saved(gentrain, tmp_path, monkeypatch):
    """An update can leave NaN weights after a step whose loss was finite: the loop checks the weights where
    it saves, so last.pt stays the last finite one."""
    from gentrain.models.vae import VAE

    run = tmp_path / "run"
    gentrain("model=vae", *FAST, "model.ch=8", "trainer.steps=2", f"hydra.run.dir={run}")
    good = (run / "checkpoints" / "last.pt").read_bytes()
    after_step = VAE.after_step

    def diverge(self, phase, step):  # the update of step 4 (index 3) overflows a decoder weight after its finite loss
        after_step(self, phase, step)
        if int(step) == 3:
            next(self.decoder.parameters()).data.view(-1)[0] = float("inf")

    monkeypatch.setattr(VAE, "after_step", diverge)
    proc = gentrain(f"resume={run}", "trainer.steps=4", check=False)
    assert_one_line_error(proc, "the weights of decoder became NaN/inf by step 4; stopped without saving",
                          f"last good checkpoint: {run / 'checkpoints' / 'last.pt'}")
    assert (run / "checkpoints" / "last.pt").read_bytes() == good


def test_a_full_disk_under_the_tensorboard_writer_thread_is_one_line(gentrain, tmp_path, monkeypatch):
    """TensorBoard writes its event file from a thread of its own: a full disk there stops the run with one
    line at the next log step, no thread traceback, and the last checkpoint as it was."""
    import errno
    import threading

    from tensorboard.summary.writer.record_writer import RecordWriter

    run = tmp_path / "run"
    gentrain("model=vae", *FAST, "model.ch=8", "trainer.steps=2", f"hydra.run.dir={run}")
    good = (run / "checkpoints" / "last.pt").read_bytes()
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)  # what would print a thread's traceback

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RecordWriter, "write", disk_full)
    proc = gentrain(f"resume={run}", "trainer.steps=4", check=False)
    assert_one_line_error(proc, f"could not write the TensorBoard log in {run} (no space left on the device: "
                                f"the disk is full)")
    assert escaped == [] and "Exception in thread" not in proc.stderr
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
    # the sweep's summary: a row per job with its overrides, steps, time and final losses
    rows = json.loads((sweep / "summary.json").read_text())
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"] and all(r["step"] == 2 for r in rows)
    assert "model=gan" in rows[0]["overrides"] and "D/loss" in rows[0]["final"] and "vae/loss" in rows[3]["final"]
    table = (sweep / "summary.md").read_text().splitlines()
    assert len(table) == 2 + 4 and "| job | overrides | step | minutes |" in table[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_training_runs(gentrain, tmp_path):
    """The default GAN in bf16 on a GPU, captured (trainer.cuda_graphs=auto) past its graph's warm-up and check."""
    run = tmp_path / "run"
    gentrain("model=gan", *FAST, "trainer.steps=8", "trainer.device=cuda", "trainer.precision=bf16",
             f"hydra.run.dir={run}")
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 8
    log = (run / "train.log").read_text()
    assert "captured the (D, G) step at step 5" in log and "CUDA graphs off" not in log


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


def test_the_command_a_run_started_with_plus_resume_continues_it(gentrain, tmp_path):
    run = tmp_path / "run"
    command = ["model=gan", "dataset=mnist", "experiment=smoke", *FAST, "trainer.steps=2", f"hydra.run.dir={run}"]
    gentrain(*command)
    gentrain(*[a for a in command if not a.startswith("trainer.steps")], f"resume={run}", "trainer.steps=4")
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert_one_line_error(gentrain(*command, "experiment=vae_mnist", f"resume={run}", check=False),
                          "experiment=vae_mnist cannot change when resuming", "was trained with experiment=smoke")
    assert_one_line_error(gentrain(*command, "baseline=dcgan_mnist", f"resume={run}", check=False),
                          "baseline=dcgan_mnist cannot change when resuming", "was trained with baseline=None")


def test_an_earlier_checkpoint_resumes_into_a_new_folder_unless_rolled_back(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=vae", *FAST, "trainer.steps=6", f"hydra.run.dir={run}")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    branch = tmp_path / "branch"
    proc = gentrain(f"resume={run / 'checkpoints' / 'step_0000002.pt'}", "trainer.steps=4", f"hydra.run.dir={branch}")
    assert "continuing in a new run folder" in proc.stdout + proc.stderr
    assert {p: p.read_bytes() for p in before} == before  # the run's later work is kept, untouched
    ckpt = torch.load(branch / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["branched_from"]["step"] == 2 and ckpt["branched_from"]["run"] == str(run)
    assert [r["step"] for r in metrics(branch)] == [2, 4]  # the history up to the branch point, then its own
    # rollback=true continues in the run's own folder from step 2: its later checkpoints and grids go
    proc = gentrain(f"resume={run / 'checkpoints' / 'step_0000002.pt'}", "rollback=true", "trainer.steps=3")
    assert "rolled" in proc.stdout + proc.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    assert not (run / "checkpoints" / "step_0000006.pt").exists() and not (run / "samples" / "step_0000006.png").exists()
    assert [r["step"] for r in metrics(run)] == [2, 3]


def test_a_run_tells_its_story(gentrain, tmp_path):
    """A grid before the first step, a summary at the end, TensorBoard events with the same numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    proc = gentrain("model=gan", *FAST, "trainer.steps=4", f"hydra.run.dir={run}")
    assert (run / "samples" / "step_0000000.png").is_file()
    done = next(line for line in (proc.stdout + proc.stderr).splitlines() if "done: 4 steps" in line)
    assert "of training" in done and "img/s on average" in done and "step_0000004.png" in done and "last.pt" in done
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"D/loss", "G/loss", "img_per_s", "lr/D", "lr/G"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("D/loss")] == [2, 4]
    assert [e.value for e in events.Scalars("D/loss")] == pytest.approx([r["D/loss"] for r in metrics(run)], rel=1e-6)
    assert [e.step for e in events.Images("samples")] == [0, 2, 4]
    assert events.PluginTagToContent("hparams")  # the run's hyperparameters with its final numbers


def test_wandb_logs_offline_and_a_resume_continues_its_run(gentrain, tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = ["model=vae", *FAST, "trainer.loggers=[jsonl,wandb]", f"hydra.run.dir={run}"]
    gentrain(*args, "trainer.steps=2", env=env)
    gentrain(f"resume={run}", "trainer.steps=4", env=env)
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and len({p.name.rsplit("-", 1)[1] for p in offline}) == 1  # one W&B run, resumed
    history = b"".join(p.read_bytes() for d in offline for p in d.glob("*.wandb"))
    assert b"vae/loss" in history and b"samples" in history


def test_bare_paths_and_folders_without_an_extension(gentrain, tmp_path, data_root):
    run = tmp_path / "run"
    gentrain("model=gan", *FAST, "trainer.steps=2", f"hydra.run.dir={run}")
    gentrain("sample", run, "n=4", f"out={tmp_path / 'fakes2'}")  # a bare run folder; out= without an extension
    assert sorted(p.name for p in (tmp_path / "fakes2").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert_one_line_error(gentrain("sample", run, "n=4", f"out={tmp_path / 'x.txt'}", check=False), "not an image type")
    out = gentrain("eval", run, "n=20", "metrics=[fid]", f"metrics.cache_dir={tmp_path / 'cache'}").stdout  # eval RUN_DIR too
    assert (run / "checkpoints" / "eval.json").is_file() and "replacing" not in out
    # dataset.root= as training spells it (data_root= is the same key); a second eval says it replaces the first
    out = gentrain("eval", run, "n=20", "metrics=[fid]", f"metrics.cache_dir={tmp_path / 'cache'}",
                   f"dataset.root={data_root}").stdout
    assert "(replacing the earlier one, step 2, n=20; out=FILE.json keeps both)" in out
    offline = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    proc = gentrain("eval", run, f"dataset.root={tmp_path / 'elsewhere'}", "n=20", env=offline, check=False)
    last = proc.stderr.strip().splitlines()[-1]  # the key is read: a root without the data is named
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and last.startswith("gentrain: error: mnist not found in")
    assert str(tmp_path / "elsewhere") in last


def test_a_failed_download_leaves_no_folders(gentrain, tmp_path):
    typo = tmp_path / "tpyo" / "data"
    proc = gentrain("dataset=fashion_mnist", f"dataset.root={typo}", f"hydra.run.dir={tmp_path / 'run'}",
                    env={"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}, check=False)
    assert_one_line_error(proc, "not found in")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no dataset folders, no run folder
    # A first run in Hydra's default folder, runs/gan-fashion_mnist/<date>_<time>/: none of runs/ is left either.
    proc = gentrain("dataset=fashion_mnist", f"dataset.root={typo}",
                    env={"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}, check=False)
    assert_one_line_error(proc, "not found in")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
