"""A wheel built from the checkout installs into a fresh virtual environment and runs from elsewhere."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # processes of their own


def test_wheel_in_fresh_venv_finds_its_configs_and_trains(tmp_path, data_root, metrics_cache):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(REPO)], check=True, capture_output=True)
    wheel = next(wheels.glob("gentrain-*.whl"))
    # torch & co. come from the environment running these tests (a venv's own packages too, which a venv made
    # with --system-site-packages would not see: it sees the base interpreter's): a .pth file appends its
    # site-packages after the fresh venv's, so gentrain in it is the wheel's
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    running = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    Path(site, "running-environment.pth").write_text("".join(f"{p}\n" for p in running))
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "GENTRAIN_DATA": str(data_root), "PYTHONPATH": ""}

    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import gentrain.config as c; print(c.__file__); print(c.config_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # not the checkout's files

    gentrain = str(venv / "bin" / "gentrain")
    help_text = subprocess.run([gentrain, "--help"], cwd=elsewhere, env=env, capture_output=True, text=True,
                               check=True).stdout
    assert "model: gan, vae" in help_text
    subprocess.run([gentrain, "model=vae", "trainer.steps=2", "trainer.batch_size=16", "model.ch=8",
                    "hydra.run.dir=run"], cwd=elsewhere, env=env, capture_output=True, check=True)
    assert (elsewhere / "run" / "checkpoints" / "last.pt").is_file()
    out = subprocess.run([gentrain, "sample", "ckpt=run", "n=4", "out=grid.png"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "grid.png" in out and (elsewhere / "grid.png").is_file()
    cache, classifier = metrics_cache
    classifier("mnist")
    out = subprocess.run([gentrain, "eval", "ckpt=run", "n=32", "metrics=[fid,pr]", f"metrics.cache_dir={cache}"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert "fid@classifier" in out and (elsewhere / "run" / "checkpoints" / "eval.json").is_file()
