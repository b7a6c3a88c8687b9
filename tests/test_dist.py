"""Data-parallel training on CPU with gloo: N torchrun workers take the steps one process takes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, assert_one_line_error, start_cli, wait_for_log_lines

pytestmark = pytest.mark.slow  # processes of their own

VAE = ["model=vae", *FAST, "trainer.steps=6", "trainer.device=cpu"]
# The VQ-VAE's EMA codebook and its restarts are updated from the global batch (counts and sums all-reduced),
# and its logged code usage is the global batch's.
VQVAE = ["model=vqvae", *[a for a in FAST if "sample" not in a], "trainer.sample_every=6", "trainer.n_samples=4",
         "model.prior_ch=8", "trainer.steps=6", "trainer.device=cpu"]
# The toy GAN (an MLP without batch norm) with the parts that make GAN steps special: two optimizers,
# two D steps per G step, the R1 input-gradient penalty and an EMA of G.
GAN = ["experiment=toy", "dataset=ring8", "trainer.steps=20", "trainer.log_every=5", "trainer.device=cpu",
       "model.d_steps=2", "model.r1=0.1", "trainer.eval_every=0"]


def weights(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-4, atol=1e-5), k
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in x:
            if "/" in k or "(" in k:  # the logged losses, averaged over ranks
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("family, args", [("vae", VAE), ("gan", GAN), ("vqvae", VQVAE)], ids=["vae", "gan", "vqvae"])
def test_two_processes_take_the_steps_one_process_takes(gentrain, tmp_path, family, args):
    gentrain(*args, f"hydra.run.dir={tmp_path / 'one'}")
    proc = gentrain(*args, "trainer.devices=2", f"hydra.run.dir={tmp_path / 'two'}", process=True)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert proc.stdout.count(f"[INFO] - training {family} ") == 1  # rank 0 speaks for the run
    names = lambda run: sorted("tfevents" if "tfevents" in p.name else p.name for p in run.iterdir())
    assert names(tmp_path / "two") == names(tmp_path / "one")  # rank 0 alone writes (one TensorBoard file)


def test_a_two_process_checkpoint_resumes_in_one_process(gentrain, tmp_path):
    args = [a for a in GAN if not a.startswith("trainer.steps=")]
    gentrain(*args, "trainer.steps=20", f"hydra.run.dir={tmp_path / 'straight'}")
    gentrain(*args, "trainer.steps=10", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'moved'}", process=True)
    gentrain(f"resume={tmp_path / 'moved'}", "trainer.steps=20", "trainer.devices=1")
    assert_same_run(tmp_path / "straight", tmp_path / "moved")


def test_torchrun_itself_writes_one_run_folder(data_root, tmp_path):
    """`torchrun -m gentrain`: the other ranks follow rank 0's run folder and write nothing."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "gentrain", *VAE], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GENTRAIN_DATA": str(data_root), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    (run,) = (tmp_path / "runs" / "vae-mnist").iterdir()
    assert weights(run) and records(run)[-1]["step"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_an_error_in_one_rank_stops_every_rank_with_one_line(gentrain, tmp_path):
    # Only rank 0 evaluates, so only rank 0 finds the missing weights file; rank 1 is waiting for it.
    started = time.time()
    proc = gentrain(*VAE, "trainer.devices=2", "trainer.eval_every=3", "metrics.compute=[fid]",
                    "metrics.features=inception", f"metrics.inception_weights={tmp_path / 'missing.pt'}",
                    check=False, timeout=120, process=True)
    assert_one_line_error(proc, "missing.pt: no such file")
    assert time.time() - started < 60


def test_ctrl_c_stops_every_rank_at_one_step_with_a_checkpoint(data_root, tmp_path, gentrain):
    run = tmp_path / "run"
    args = [*VAE, "trainer.steps=100000", "trainer.log_every=1", "trainer.devices=2", f"hydra.run.dir={run}"]
    proc = start_cli(args, tmp_path, data_root)
    wait_for_log_lines(run / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGINT)  # the launcher passes it on to every worker
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("gentrain: interrupted at step") and sum("gentrain:" in ln for ln in lines) == 1
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert stopped >= 3 and f"step {stopped};" in lines[-1]
    gentrain(f"resume={run}", f"trainer.steps={stopped + 2}")
    assert records(run)[-1]["step"] == stopped + 2


TEARDOWN = """
import os, sys, torch
from gentrain import dist

tasks = lambda: len(os.listdir("/proc/self/task"))  # every thread of this process, gloo's C++ ones included
before = tasks()
dist.init(torch.device("cpu"))
for _ in range(20):
    dist.agree(True), dist.share({"step": 1}), dist.mean(torch.ones(100)), dist.barrier()
dist.shutdown()
assert tasks() == before, f"{tasks() - before} thread(s) of the process group outlive it"
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_no_thread_of_the_process_group_outlives_it_and_workers_exit_cleanly_under_load(tmp_path):
    """Threads that outlive dist.shutdown() are torn down with the interpreter, where a gloo worker freeing its
    last work cannot take the GIL: C++ then aborts (`terminate called without an active exception`), on a
    loaded machine now and then. Two workers, twice, beside a busy core: none may leave a thread behind, and
    each must exit 0 without that line."""
    (tmp_path / "teardown.py").write_text(TEARDOWN)
    burner = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                   "teardown.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr
    finally:
        burner.kill()
        burner.wait()


def worker_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker of this rank, a child of the gentrain process that launched it."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == launcher and \
                    f"RANK={rank}".encode() in (stat.parent / "environ").read_bytes().split(b"\0"):
                return int(stat.parent.name)
        except (OSError, ValueError, IndexError):  # a process that ended meanwhile
            continue
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


def test_a_killed_worker_is_one_line_naming_its_rank_its_status_and_its_log(data_root, tmp_path):
    run = tmp_path / "run"
    args = [*VAE, "trainer.steps=100000", "trainer.log_every=1", "trainer.ckpt_every=2", "trainer.devices=2",
            f"hydra.run.dir={run}"]
    proc = start_cli(args, tmp_path, data_root)
    wait_for_log_lines(run / "metrics.jsonl", 3, proc)
    worker = worker_pid(proc.pid, 1)
    os.kill(worker, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert_one_line_error(subprocess.CompletedProcess(args, proc.returncode, "", stderr),
                          f"worker rank 1 of 2 (pid {worker}) was killed by SIGKILL (exit status -9)",
                          f"rank 0 alone keeps a log file: {run / 'train.log'}", f"gentrain resume={run}")


@pytest.mark.parametrize("args, fragment", [
    (["trainer.devices=3"], "trainer.batch_size=32 must split evenly over 3 processes"),
    (["trainer.devices=2", "trainer.sync_bn=true", "trainer.device=cpu"], "sync_bn=true needs GPUs"),
    (["trainer.devices=0"], "trainer.devices must be an integer from 1 to 1024"),
])
def test_bad_process_settings_are_one_line(gentrain, args, fragment):
    assert_one_line_error(gentrain(*VAE, *args, check=False), fragment)


def test_a_preempted_run_resumes_when_its_job_starts_again(data_root, tmp_path, gentrain):
    """A scheduler's USR2 (SLURM via submitit): checkpoint at a step boundary, and the same command,
    started again in the same folder, continues the run instead of refusing it."""
    args = [*FAST, "model=vae", "trainer.log_every=1", "trainer.ckpt_every=1000", "trainer.sample_every=1000",
            "trainer.steps=300"]
    gentrain(*args, f"hydra.run.dir={tmp_path / 'straight'}")
    run = tmp_path / "job"
    proc = start_cli([*args, f"hydra.run.dir={run}"], tmp_path, data_root)
    wait_for_log_lines(run / "metrics.jsonl", 5, proc)
    proc.send_signal(signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2 and "stopped by SIGUSR2 (preemption)" in stderr, stderr
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["preempted"] and 5 <= ckpt["step"] < 300
    again = gentrain(*args, f"hydra.run.dir={run}")
    assert f"stopped by its scheduler at step {ckpt['step']}: resuming it" in again.stdout
    a, b = weights(tmp_path / "straight"), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A finished run is not picked up again; a run SLURM requeued is, whatever stopped it.
    assert_one_line_error(gentrain(*args, f"hydra.run.dir={run}", check=False), "already holds a run")
    requeued = gentrain(*args, f"hydra.run.dir={run}", env={"SLURM_RESTART_COUNT": "1"})
    assert "stopped by its scheduler at step 300: resuming it" in requeued.stdout


def test_sync_bn_converts_the_networks_that_train_and_leaves_the_ema():
    """trainer.sync_bn: G's and D's batch norms sync over ranks; the EMA's, which calibrates on rank 0
    alone, must not wait for the other ranks."""
    from torch import nn

    from gentrain import dist
    from gentrain.models import build

    model = build({"family": "gan", "z_dim": 8, "ch": 8, "ema": 0.99}, 1, 28)
    keys = model.state_dict().keys()
    dist.sync_batchnorm(model)
    kinds = lambda net: {type(m) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds(model.G) == kinds(model.D) == {nn.SyncBatchNorm}
    assert kinds(model.G_ema) == {nn.BatchNorm2d}
    assert model.state_dict().keys() == keys
