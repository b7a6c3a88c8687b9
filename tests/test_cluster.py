"""Hydra's launcher and sweeper plugins: submitit (local and SLURM) and Optuna."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FAST, assert_one_line_error, start_cli, wait_for_log_lines

TINY = [*FAST, "trainer.steps=2", "trainer.device=cpu"]


def last_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_multirun(gentrain, tmp_path):
    gentrain("-m", "hydra/launcher=submitit_local", "model=gan,vae", *TINY, f"hydra.sweep.dir={tmp_path}", process=True)
    families = {yaml.safe_load((tmp_path / job / ".hydra" / "overrides.yaml").read_text())[0] for job in "01"}
    assert families == {"model=gan", "model=vae"}
    assert last_step(tmp_path / "0") == last_step(tmp_path / "1") == 2


@pytest.mark.slow
def test_a_submitit_job_checkpoints_on_its_timeout_signal_is_requeued_and_resumes(data_root, tmp_path):
    """USR2 is what SLURM (and submitit's local executor) sends before a job's time limit: the job
    checkpoints, submitit requeues it, and the restarted job resumes the run to its last step."""
    args = ["model=vae", *FAST, "trainer.steps=600", "trainer.log_every=20", "trainer.ckpt_every=1000",
            "trainer.device=cpu"]
    proc = start_cli(["-m", "hydra/launcher=submitit_local", *args, f"hydra.sweep.dir={tmp_path}"], tmp_path, data_root)
    metrics = tmp_path / "0" / "metrics.jsonl"
    wait_for_log_lines(metrics, 2, proc)
    # submitit's local job id is its controller's pid; the controller runs the job as its child
    (job_id,) = [p.name for p in (tmp_path / ".submitit").iterdir() if p.name.isdigit()]
    (task,) = Path(f"/proc/{job_id}/task/{job_id}/children").read_text().split()
    os.kill(int(task), signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    log = (tmp_path / "0" / "train.log").read_text()
    assert "Caught signal SIGUSR2" in log and "Requeued job" in log
    assert "was stopped by its scheduler at step" in log and "resuming it" in log
    assert last_step(tmp_path / "0") == 600
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(20, 601, 20))  # every log line once: nothing lost, nothing repeated


def fake_slurm(tmp_path: Path) -> dict:
    """sbatch and srun stand-ins: sbatch keeps the job script it is given and refuses to queue it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/job.sh\n'
                                    'echo "sbatch: error: no SLURM controller here" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.slow
def test_the_slurm_launcher_submits_one_array_with_the_run_settings(gentrain, tmp_path):
    proc = gentrain("-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90",
                    "trainer.devices=2", "model=gan,vae", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                    check=False, env=fake_slurm(tmp_path), process=True)
    assert proc.returncode != 0
    script = (tmp_path / "job.sh").read_text().splitlines()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --gpus-per-node=2", "#SBATCH --partition=gpu",
                 "#SBATCH --time=90", "#SBATCH --signal=USR2@120", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --job-name=gentrain"):
        assert line in script, line


def test_the_slurm_launcher_off_a_cluster_is_one_line(gentrain, tmp_path):
    env = {"PATH": os.path.dirname(sys.executable)}  # python, but no sbatch
    assert_one_line_error(gentrain("-m", "hydra/launcher=slurm", "model=gan,vae", check=False, env=env),
                          "sbatch", "login node")


def test_optuna_preset_runs_trials_and_writes_the_best(gentrain, tmp_path):
    gentrain("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "model=vae",
             *[a for a in TINY if not a.startswith("model.ch=")],  # model.ch is in the search space
             "trainer.eval_metric=nll", "metrics.compute=[nll]", "metrics.k=4", "trainer.eval_n=64",
             f"hydra.sweep.dir={tmp_path}")
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    scores, params = [], []
    for job in sorted(p for p in tmp_path.iterdir() if p.name.isdigit()):
        lines = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        scores.append(next(r["eval/nll"] for r in lines if "eval/nll" in r))
        params.append(yaml.safe_load((job / ".hydra" / "config.yaml").read_text()))
    assert len(scores) == 3
    assert result["best_value"] == pytest.approx(min(scores))  # the objective is the run's eval/nll
    best = params[scores.index(min(scores))]
    assert result["best_params"]["optim.lr"] == pytest.approx(best["optim"]["lr"])
    assert result["best_params"]["model.z_dim"] == best["model"]["z_dim"]
    assert all(3e-5 <= p["optim"]["lr"] <= 2e-3 and p["model"]["ch"] in (32, 64) for p in params)
