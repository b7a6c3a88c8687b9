"""Shared fixtures: the real test data from ../shared/data, and a runner for the `gentrain` CLI."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GENTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """MNIST and Fashion-MNIST unpacked once per session into torchvision's layout."""
    if not (SHARED / "unpack.sh").is_file():
        pytest.skip(f"needs the shared test data at {SHARED} (set GENTRAIN_SHARED_DATA to its folder)")
    dest = tmp_path_factory.mktemp("data")
    subprocess.run(["bash", str(SHARED / "unpack.sh"), str(dest)], check=True)
    return dest


@pytest.fixture(scope="session")
def emoji_dir() -> Path:
    folder = SHARED / "noto-emoji" / "png128"
    if not folder.is_dir():
        pytest.skip(f"needs the shared emoji folder at {folder}")
    return folder


def run_cli(args, cwd, data_root, check=True, timeout=300, env=None):
    """`python -m gentrain ARGS` in cwd with the test data as the default dataset root."""
    full_env = {**os.environ, "GENTRAIN_DATA": str(data_root), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "gentrain", *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"gentrain {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def start_cli(args, cwd, data_root) -> subprocess.Popen:
    """`python -m gentrain ARGS` started in the background with stderr captured, for tests that signal it."""
    return subprocess.Popen([sys.executable, "-m", "gentrain", *map(str, args)], cwd=cwd, text=True,
                            env={**os.environ, "GENTRAIN_DATA": str(data_root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_log_lines(metrics: Path, lines: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until a background run has written `lines` lines of metrics.jsonl, while it is still running."""
    deadline = time.time() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= lines):
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.05)


@pytest.fixture
def gentrain(tmp_path, data_root):
    """Run `python -m gentrain ARGS` in a fresh folder with the test data as the default root."""

    def run(*args, cwd=None, check=True, timeout=300, env=None):
        return run_cli(args, cwd or tmp_path, data_root, check, timeout, env)

    return run


@pytest.fixture(scope="session")
def metrics_cache(tmp_path_factory, data_root):
    """One metrics cache for the session; a dataset's classifier is trained the first time it is asked for."""
    cache = tmp_path_factory.mktemp("metrics-cache")
    trained = {}

    def classifier(dataset):
        if dataset not in trained:
            proc = run_cli(["classifier", f"dataset={dataset}", "device=cpu", f"metrics.cache_dir={cache}"],
                           cache, data_root, timeout=900)
            trained[dataset] = float(re.search(r"test accuracy ([\d.]+)%", proc.stdout).group(1)) / 100
        return trained[dataset]

    return cache, classifier


@pytest.fixture(scope="session")
def vqvae_run(tmp_path_factory, data_root) -> Path:
    """One short VQ-VAE run on MNIST for the VQ-VAE and codec tests: 150 steps of 32 images, about 30 s of
    training on one CPU thread (one thread: its small tensors gain little from a second, and on a busy
    machine the second only waits)."""
    run = tmp_path_factory.mktemp("vqvae") / "run"
    run_cli(["model=vqvae", "model.ch=32", "model.prior_ch=32", "trainer.steps=150", "trainer.batch_size=32",
             "trainer.log_every=50", "trainer.sample_every=150", "trainer.ckpt_every=150", "trainer.n_samples=16",
             "trainer.device=cpu", f"hydra.run.dir={run}"], run.parent, data_root, timeout=900,
            env={"OMP_NUM_THREADS": "1"})
    return run


def assert_one_line_error(proc, *fragments):
    """A user error: non-zero exit, exactly one line on stderr that names the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gentrain: error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# Small, fast settings for CLI runs: a few steps with every kind of output written.
FAST = ["trainer.batch_size=32", "trainer.log_every=2", "trainer.sample_every=2", "trainer.ckpt_every=2",
        "trainer.n_samples=16", "model.ch=16"]
