"""Shared fixtures: the real test data (from ../shared/data, or downloaded once), a runner for the `gentrain` CLI, and the
artefacts several tests read (a metrics cache, a trained VQ-VAE), made once per session.

Under pytest-xdist (`pytest -n 2`, the default in pyproject.toml) each worker trains on one thread, so two
workers fill two cores without oversubscribing them, and the session's artefacts are made by the first
worker that needs them, behind a file lock, and shared.
"""

import contextlib
import io
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GENTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
# Where the shared data is absent, MNIST and Fashion-MNIST are downloaded here once (data_root).
CACHE = Path(os.environ.get("GENTRAIN_TEST_DATA", Path.home() / ".cache" / "gentrain" / "test-data"))

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker, for this process and the ones it starts
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The slow tests first: with two workers, the long ones then run beside the many short ones instead of
    after them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def once(tmp_path_factory, name: str, make) -> Path:
    """A folder `name` made by `make(folder)` once per session, shared by every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the workers' common parent
    folder = base / f"shared-{name}"
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".done").exists():
            folder.mkdir(exist_ok=True)
            make(folder)
            (folder / ".done").touch()
    return folder


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """MNIST and Fashion-MNIST in torchvision's layout: the shared test data unpacked once per session, or,
    where there is none, downloaded once into a cache that later sessions reuse."""
    return find_data(tmp_path_factory, SHARED, CACHE)


def find_data(tmp_path_factory, shared: Path, cache: Path) -> Path:
    if (shared / "unpack.sh").is_file():
        return once(tmp_path_factory, "data", lambda dest: subprocess.run(["bash", str(shared / "unpack.sh"), str(dest)],
                                                                          check=True))
    return download_data(cache)


def download_data(cache: Path) -> Path:
    """MNIST and Fashion-MNIST downloaded by torchvision into `cache` (once: torchvision keeps files it finds);
    the tests that need them skip, saying why, where they cannot be downloaded."""
    import torchvision

    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".lock")):
        for name in ("MNIST", "FashionMNIST"):
            try:
                for train in (True, False):
                    getattr(torchvision.datasets, name)(str(cache), train=train, download=True)
            except (OSError, RuntimeError) as e:  # offline: URLError (an OSError), or torchvision's RuntimeError
                pytest.skip(f"needs MNIST and Fashion-MNIST: no shared test data at {SHARED} (GENTRAIN_SHARED_DATA), "
                            f"and {name} could not be downloaded into {cache} ({e})")
    return cache


@pytest.fixture(scope="session")
def emoji_dir() -> Path:
    folder = SHARED / "noto-emoji" / "png128"
    if not folder.is_dir():
        pytest.skip(f"needs the shared emoji folder at {folder}")
    return folder


def run_cli(args, cwd, data_root, check=True, timeout=300, env=None, process=False):
    """`gentrain ARGS` in cwd with the test data as the default dataset root: by default in this process,
    through the command's own entry point (gentrain.cli.main) without the seconds an interpreter takes to
    import torch and Hydra; with `process=True` as `python -m gentrain ARGS` in a process of its own, for
    runs that start processes, install signal handlers of their own or set the environment (torchrun,
    submitit). Returns what subprocess.run would: args, returncode, stdout, stderr."""
    full_env = {"GENTRAIN_DATA": str(data_root), "PYTHONUNBUFFERED": "1", **(env or {})}
    if process:
        proc = subprocess.run([sys.executable, "-m", "gentrain", *map(str, args)], cwd=cwd,
                              env={**os.environ, **full_env}, capture_output=True, text=True, timeout=timeout)
    else:
        proc = _in_process([str(a) for a in args], cwd, full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"gentrain {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def _in_process(args: list[str], cwd, env: dict) -> subprocess.CompletedProcess:
    """gentrain.cli.main(args) as a process would run it: in cwd, with env set (OMP_NUM_THREADS as torch's
    thread count), stdout and stderr captured, and an exit code from SystemExit (1 and the traceback for
    an exception that escapes, as the interpreter would print it)."""
    import torch

    from gentrain import cli

    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_env = {k: os.environ.get(k) for k in env}
    saved_argv, saved_cwd, saved_threads = sys.argv[:], os.getcwd(), torch.get_num_threads()
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        sys.argv[:] = saved_argv
        torch.set_num_threads(saved_threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["gentrain", *args], code, out.getvalue(), err.getvalue())


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

    def run(*args, cwd=None, check=True, timeout=300, env=None, process=False):
        return run_cli(args, cwd or tmp_path, data_root, check, timeout, env, process)

    return run


@pytest.fixture(scope="session")
def metrics_cache(tmp_path_factory, data_root):
    """One metrics cache for the session, and `classifier(dataset)`: the test accuracy that `gentrain classifier`
    reports for the dataset's classifier (MNIST's and Fashion-MNIST's ship with gentrain)."""
    def reference(folder):  # the MNIST training split's statistics in classifier space, which most tests use
        run_cli(["eval", "dataset=mnist", "n=10", "metrics=[fid]", f"metrics.cache_dir={folder}"], folder, data_root)

    cache = once(tmp_path_factory, "metrics-cache", reference)
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
    def train(folder):
        run_cli(["model=vqvae", "model.ch=32", "model.prior_ch=32", "trainer.steps=150", "trainer.batch_size=32",
                 "trainer.log_every=50", "trainer.sample_every=150", "trainer.ckpt_every=150", "trainer.n_samples=16",
                 "trainer.device=cpu", f"hydra.run.dir={folder / 'run'}"], folder, data_root, env={"OMP_NUM_THREADS": "1"})

    return once(tmp_path_factory, "vqvae", train) / "run"


def assert_one_line_error(proc, *fragments):
    """A user error: non-zero exit, exactly one line on stderr that names the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gentrain: error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# Small, fast settings for CLI runs: a few steps with every kind of output written.
FAST = ["trainer.batch_size=32", "trainer.log_every=2", "trainer.sample_every=2", "trainer.ckpt_every=2", "trainer.keep_every=2",
        "trainer.n_samples=16", "model.ch=16"]
