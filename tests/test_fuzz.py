"""A corpus of bad inputs, one table row each: config values and types for every verb, damaged checkpoints and
codes files, damaged folders and images, unwritable and full outputs, concurrent runs. Every one must end
in exactly one `gentrain: error:` line and a non-zero exit, with no traceback, and leave the files of the
run folders it touched as they were."""

import contextlib
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import FAST, assert_one_line_error, run_cli, start_cli, wait_for_log_lines
from gentrain import checkpoint, files

TINY = [*FAST, "model.ch=8", "trainer.steps=2", "trainer.device=cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_root):
    """A trained GAN and VAE, a codes file, an image folder and damaged copies of them, made once."""
    root = tmp_path_factory.mktemp("corpus")
    for family in ("gan", "vae"):
        run_cli([f"model={family}", *TINY, f"hydra.run.dir={root / family}"], root, data_root)
    run_cli(["encode", f"ckpt={root / 'vae'}", "input=test", "n=8", f"out={root / 'codes.pt'}"], root, data_root)
    good = (root / "gan" / "checkpoints" / "last.pt").read_bytes()
    bad = root / "bad"
    bad.mkdir()
    (bad / "truncated.pt").write_bytes(good[: len(good) // 2])
    (bad / "empty.pt").write_bytes(b"")
    (bad / "text.pt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, bad / "foreign.pt")
    state = torch.load(root / "gan" / "checkpoints" / "last.pt", weights_only=True)
    plain = {k: v for k, v in state.items() if k not in ("format", "version", "digest")}
    checkpoint.save({**plain, "config": "model=gan"}, bad / "config_string.pt")
    checkpoint.save({**plain, "family": "vae"}, bad / "family_mismatch.pt")
    checkpoint.save({**plain, "data": {"channels": "one", "image_size": 28}}, bad / "bad_facts.pt")
    # one byte flipped inside the stored weights: the file still loads, with a changed tensor
    flipped = bytearray(good)
    key = next(k for k in state["model"] if k.endswith("weight") and state["model"][k].numel() > 64)
    needle = state["model"][key].contiguous().view(-1)[:16].numpy().tobytes()
    at = bytes(flipped).find(needle)
    flipped[at + 5] ^= 0x40
    (bad / "flipped.pt").write_bytes(bytes(flipped))
    # one byte flipped in the pickle record (its first opcode): damage, which torch's unpickler may refuse
    # as it would a pickle that names Python objects
    import zipfile
    with zipfile.ZipFile(root / "gan" / "checkpoints" / "last.pt") as z:
        pickled = z.read(next(i for i in z.infolist() if i.filename.endswith("data.pkl")))
    damaged = bytearray(good)
    damaged[good.find(pickled)] ^= 0x10
    (bad / "pickle_flipped.pt").write_bytes(bytes(damaged))
    codes = torch.load(root / "codes.pt", weights_only=True)
    torch.save({"format": codes["format"], "version": codes["version"]}, bad / "codes_header_only.pt")
    torch.save({**{k: v for k, v in codes.items() if k != "digest"}, "family": "vqvae"}, bad / "codes_other_family.pt")
    # a diverged run: its last checkpoint's decoder holds a NaN (with a valid digest), its step_0000002.pt not
    shutil.copytree(root / "vae", root / "nan")
    diverged = torch.load(root / "nan" / "checkpoints" / "last.pt", weights_only=True)
    weight = next(k for k in diverged["model"] if k.startswith("decoder.") and k.endswith("weight"))
    diverged["model"][weight].view(-1)[0] = float("nan")
    checkpoint.save({k: v for k, v in diverged.items() if k not in ("format", "version", "digest")},
                    root / "nan" / "checkpoints" / "last.pt")
    images = root / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "empty_folder").mkdir()
    (root / "a_file").write_text("a regular file")
    (bad / "run_without_ckpt" / ".hydra").mkdir(parents=True)
    return root


def snapshot(*folders: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# (verb and overrides, a fragment of the one error line); {root} is the corpus folder, {data} the data root.
CASES = [
    # training config: values and types
    (["seed=abc"], "seed must be an integer"), (["seed=1.5"], "seed must be an integer"),
    (["seed=null"], "seed must be an integer"), (["seed=true"], "seed must be an integer"),
    (["seed=99999999999999999999"], "seed must be an integer from 0 to"),
    (["trainer.steps=100000000000000000000"], "trainer.steps must be a positive integer up to"),
    (["trainer.steps=0"], "trainer.steps must be a positive integer"), (["trainer.steps=2.5"], "must be a positive integer, got 2.5"),
    (["trainer.batch_size=abc"], "trainer.batch_size must be a positive integer"),
    (["trainer.device=tpu"], "trainer.device must be one of auto|cpu|cuda"),
    (["trainer.precision=fp8"], "trainer.precision must be one of"), (["trainer.compile=maybe"], "true or false"),
    (["trainer.log_every=-1"], "must be a positive integer, got -1"), (["trainer.max_minutes=-1"], "must be a positive number (or null)"),
    (["trainer.eval_every=-3"], "must be an integer >= 0, got -3"), (["trainer.n_samples=0"], "must be an integer from 1 to 10000"),
    (["trainer.eval_every=5", "trainer.eval_metric=foo"], "trainer.eval_metric must be one of"),
    (["trainer.eval_every=5", "trainer.eval_metric=nll"], "trainer.eval_metric=nll is not computed here"),
    (["trainer.eval_every=5", "metrics.k=0"], "metrics.k must be a positive integer"),
    (["optim.lr=0"], "optim.lr must be a positive number"), (["optim.lr=abc"], "optim.lr must be a positive number"),
    (["optim.betas=[0.5,1.0]"], "optim.betas[1]"), (["optim.betas=[0.5]"], "optim.betas must be a list of 2"),
    (["optim._target_=os.system"], "optim._target_ must name a torch.optim optimizer"),
    (["+optim.amsgrd=true"], "did you mean optim.amsgrad"), (["optim.lr_g=1e-4"], "did you mean optim.lr_G"),
    (["+trainer.stpes=10"], "did you mean trainer.steps"), (["trainer.stpes=10"], "did you mean trainer.steps"),
    (["modle=gan"], "did you mean model"), (["+model.foo=1"], "model.foo is not a setting of model=gan"),
    (["model.ch=0"], "model.ch must be a positive integer"), (["model.ch=1.5"], "model.ch must be an integer"),
    (["model.ema=maybe"], "model.ema must be a number"), (["model.ema=1.0"], "0 <= model.ema < 1"),
    (["model.loss=wasserstein"], "is not a GAN loss"), (["model.z_dim=-2"], "must be a positive integer, got -2"),
    (["model.ch=100000000"], "too large to build here"),
    (["model=vae", "model.beta=-1"], "model.beta >= 0"), (["model=vae", "model.k=0"], "must be a positive integer, got 0"),
    (["model=vqvae", "model.num_codes=1"], "must be an integer >= 2"),
    (["dataset.image_size=100"], "dataset.image_size must be one of 16, 28, 32, 64, 128, 256, 512"),
    (["dataset=folder", "dataset.root={root}/images", "dataset.workers=-1"], "must be an integer from 0 to 256"), (["dataset.hflip=maybe"], "dataset.hflip must be true or false"),
    (["dataset.on_device=maybe"], "dataset.on_device must be one of"), (["dataset=folder"], "dataset.root has no value"),
    (["rollback=maybe"], "rollback must be true or false"), (["model=foo"], "model=foo is not an option"),
    (["trainer=5"], "choose from default"), (["model=[1]"], "choose from gan, vae, vqvae"),
    (["trainer.steps=[1"], "no viable alternative"), (["model=gan,vae"], "--multirun"),
    (["hydra.run.dir={root}/a_file/run"], "a_file is a file"),
    # data: missing, empty, broken, not a folder
    (["dataset=folder", "dataset.root={root}/empty_folder"], "no images under"),
    (["dataset=folder", "dataset.root={root}/images"], "cannot be decoded"),
    (["dataset=folder", "dataset.root={root}/a_file"], "is not a folder"),
    (["dataset=fashion_mnist", "dataset.root={root}/nothing_here", "dataset.download=false"], "not found in"),
    # resume: damaged checkpoints, a changed group, a folder without a checkpoint
    (["resume={root}/bad/truncated.pt"], "truncated or corrupt"), (["resume={root}/bad/empty.pt"], "not a PyTorch file"),
    (["resume={root}/bad/flipped.pt"], "do not match their digest"),
    (["sample", "ckpt={root}/bad/pickle_flipped.pt"], "is damaged, truncated or corrupt (its record"),
    (["resume={root}/bad/config_string.pt"], "its config is not a gentrain config"),
    (["resume={root}/bad/family_mismatch.pt"], "is not its config's model.family"),
    (["resume={root}/bad/run_without_ckpt"], "no checkpoint in"),
    (["resume={root}/gan", "model=vae"], "model=vae cannot change when resuming"),
    (["resume={root}/gan", "trainer.steps=abc"], "trainer.steps must be a positive integer"),
    # sample
    (["sample"], "ckpt has no value"), (["sample", "ckpt={root}/gan", "ema=maybe"], "ema must be true or false"),
    (["sample", "ckpt={root}/gan", "nrow=0"], "nrow must be a positive integer"),
    (["sample", "ckpt={root}/gan", "seed=abc"], "seed must be an integer"),
    (["sample", "ckpt={root}/gan", "batch_size=abc"], "batch_size must be a positive integer"),
    (["sample", "ckpt={root}/gan", "n=-1"], "n must be an integer from 1"),
    (["sample", "ckpt={root}/gan", "mode=dream"], "mode must be one of"),
    (["sample", "ckpt={root}/gan", "class=abc"], "class must be an integer"),
    (["sample", "ckpt={root}/gan", "class=3"], "needs a conditional model"),
    (["sample", "ckpt={root}/vae", "prior=gmm", "class=3"], "needs a conditional model"),  # before a prior is kept
    (["sample", "ckpt={root}/gan", "mode=reconstruct"], "needs a VAE checkpoint"),
    (["sample", "ckpt={root}/gan", "bogus=1"], "bogus is not a key of gentrain sample"),
    (["sample", "ckpt={root}/bad/flipped.pt"], "do not match their digest"),
    (["sample", "ckpt={root}/bad/config_string.pt"], "its config is not a gentrain config"),
    (["sample", "ckpt={root}/bad/bad_facts.pt"], "dataset facts"),
    (["sample", "ckpt={root}/bad/foreign.pt"], "not a gentrain checkpoint"),
    (["sample", "ckpt={root}/bad/text.pt"], "not a PyTorch file"),
    (["sample", "ckpt={root}/nowhere.pt"], "checkpoint not found"),
    (["sample", "ckpt={root}/gan", "out={root}/a_file/grid.png"], "a_file is a file"),
    (["sample", "ckpt={root}/gan", "out={root}/a_file/"], "is a file"),
    (["sample", "ckpt={root}/gan", "out={root}/grid.txt"], "is not an image type"),
    # eval
    (["eval", "ckpt={root}/gan", "n=1"], "n must be an integer from 2"),
    (["eval", "ckpt={root}/gan", "dataset.image_size=32"], "dataset.image_size needs a dataset: add dataset=NAME; a checkpoint's own data: dataset.root=PATH"),
    (["eval", "ckpt={root}/gan", "metrics.k=0"], "metrics.k must be a positive integer"),
    (["eval", "ckpt={root}/gan", "metrics.nll_n=-5"], "metrics.nll_n must be a positive integer"),
    (["eval", "ckpt={root}/gan", "metrics=[bogus]"], "metrics.compute[0] must be one of"),
    (["eval", "ckpt={root}/gan", "metrics=[nll]"], "nothing to compute"),
    (["eval", "ckpt={root}/gan", "metrics.features=clip"], "metrics.features must be one of"),
    (["eval", "ckpt={root}/gan", "metrics.cache_dir={root}/a_file/cache"], "for the metrics cache"),
    (["eval", "ckpt={root}/gan", "ema=maybe"], "ema must be true or false"),
    (["eval", "ckpt={root}/gan", "metrics=[fid]", "out={root}/a_file/eval.json"], "a_file is a file"),
    # encode and decode
    (["encode", "ckpt={root}/vae", "input=test", "n=0"], "n must be a positive integer"),
    (["encode", "ckpt={root}/vae", "input=test", "batch_size=0"], "batch_size must be a positive integer"),
    (["encode", "ckpt={root}/vae", "input=test", "background=red"], "background must be one of"),
    (["encode", "ckpt={root}/gan", "input=test"], "encode and decode need a VAE or VQ-VAE"),
    (["encode", "ckpt={root}/bad/family_mismatch.pt", "input=test"], "is not its config's model.family"),
    (["encode", "ckpt={root}/vae", "input={root}/nowhere"], "neither a folder of images nor a split"),
    (["encode", "ckpt={root}/vae", "input=test", "n=4", "out={root}/a_file/codes.pt"], "a_file is a file"),
    (["decode", "input={root}/codes.pt", "out={root}/dec/", "batch_size=0"], "batch_size must be a positive integer"),
    (["decode", "input={root}/codes.pt"], "out has no value"),
    (["decode", "input={root}/bad/codes_header_only.pt", "out={root}/dec/"], "incomplete codes file"),
    (["decode", "input={root}/bad/codes_other_family.pt", "out={root}/dec/", "ckpt={root}/vae"], "holds vqvae codes"),
    (["decode", "input={root}/gan/checkpoints/last.pt", "out={root}/dec/"], "is a checkpoint, not a codes file"),
    (["decode", "input={root}/codes.pt", "out={root}/a_file"], "is a file"),
    (["decode", "input={root}/codes.pt", "out={root}/a_file/dec/"], "a_file is a file"),
    (["eval", "ckpt={root}/gan", "metrics=[fid]", "out={root}/gan"], "it is a folder"),
    (["eval", "{root}/bad/truncated.pt"], "truncated or corrupt"),
    # non-finite weights, refused where they are loaded, by every verb and prior, with the way back
    *[(args, "holds non-finite weights (NaN/inf in decoder, at step 2); the newest checkpoint of the run with finite "
             "weights is {root}/nan/checkpoints/step_0000002.pt (step 2); continue the run from there with: "
             "gentrain resume={root}/nan/checkpoints/step_0000002.pt rollback=true")
      for args in (["sample", "ckpt={root}/nan"], ["sample", "ckpt={root}/nan", "prior=gmm"],
                   ["sample", "ckpt={root}/nan", "mode=reconstruct"], ["eval", "ckpt={root}/nan", "metrics=[fid]"],
                   ["encode", "ckpt={root}/nan", "input=test", "n=4", "out={root}/nan.pt"],
                   ["decode", "input={root}/codes.pt", "ckpt={root}/nan", "out={root}/dec/"],
                   ["resume={root}/nan", "trainer.steps=4"])],
    # classifier
    (["classifier", "epochs=0"], "epochs must be an integer from 1"), (["classifier", "lr=-1"], "lr must be a positive"),
    (["classifier", "dataset=imagenet"], "dataset=imagenet is not an option"),
]


def refuse_a_case_that_cannot_fail(args: list[str], fragment: str) -> None:
    """A fragment the command line itself holds (a key, a file name) is in any error that quotes the command:
    such a case passes whatever the error says."""
    if fragment in " ".join(args):
        raise ValueError(f"the expected fragment {fragment!r} is part of the case's own command {args}: "
                         f"expect words of the error that the command does not say")


def test_the_harness_refuses_a_case_whose_fragment_is_in_its_command():
    with pytest.raises(ValueError, match="part of the case's own command"):
        refuse_a_case_that_cannot_fail(["decode", "input=/x/codes_other_family.pt"], "codes")
    for args, fragment in CASES:
        refuse_a_case_that_cannot_fail(args, fragment)


@pytest.mark.parametrize("args, fragment", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_a_bad_input_is_one_line_and_changes_nothing(corpus, data_root, tmp_path, args, fragment):
    args, fragment = [a.format(root=corpus, data=data_root) for a in args], fragment.format(root=corpus)
    refuse_a_case_that_cannot_fail(args, fragment)
    if args[0] not in ("sample", "eval", "encode", "decode", "classifier") and not any(
            a.startswith(("resume=", "hydra.run.dir=")) for a in args):
        args = [*TINY, f"hydra.run.dir={tmp_path / 'run'}", *args]  # a training start, in its own folder
    before = snapshot(corpus / "gan", corpus / "vae", corpus / "nan")
    proc = run_cli(args, tmp_path, data_root, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert_one_line_error(proc, fragment)
    assert snapshot(corpus / "gan", corpus / "vae", corpus / "nan") == before  # existing files unchanged
    assert not (tmp_path / "run").exists()  # a failed start leaves no run folder


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, data_root):
    """A GAN run of 4 steps with checkpoints and grids at steps 2 and 4: something for a rollback to delete."""
    root = tmp_path_factory.mktemp("four")
    run_cli(["model=gan", *TINY, "trainer.steps=4", f"hydra.run.dir={root / 'run'}"], root, data_root)
    return root / "run"


# A refusal at each check a start makes: the command line, the checkpoint (its config groups, its weights),
# the device, the data, the folder's lock, and last the checkpoint restored into the model.
REFUSALS = [
    (["trainer.steps=abc"], "trainer.steps must be a positive integer"),
    (["model=vae"], "model=vae cannot change when resuming"),
    (["trainer.device=cuda"], "torch sees no CUDA GPU"),  # on a machine without one
    (["trainer.devices=3"], "must split evenly over 3 processes"),
    (["dataset.root={tmp}/nothing_here", "dataset.download=false"], "not found in"),
    (["busy"], "is in use by another gentrain run"),
    (["model.ch=4"], "the stored weights do not fit"),
    (["nan"], "holds non-finite weights (NaN/inf in D, at step"),  # the checkpoint resumed from diverged
]
STARTS = {  # a resume that would delete (rollback), replace last.pt and trim the log, or branch into a new folder
    "rollback": lambda run, tmp: [f"resume={run / 'checkpoints' / 'step_0000002.pt'}", "rollback=true"],
    "resume": lambda run, tmp: [f"resume={run}", "trainer.steps=6"],
    "resume_here": lambda run, tmp: [f"resume={run}", f"hydra.run.dir={run}", "trainer.steps=6"],  # its .hydra/ kept
    "branch": lambda run, tmp: [f"resume={run / 'checkpoints' / 'step_0000002.pt'}", f"hydra.run.dir={tmp / 'branch'}"],
}


# every refusal for the three kinds of start; for a resume naming its own folder, one refused before Hydra's
# job starts and one after (Hydra writes .hydra/ as a job starts)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
COMBINATIONS = [pytest.param(start, bad, fragment, marks=[NO_CUDA] if bad == ["trainer.device=cuda"] else [])
                for start in ("rollback", "resume", "branch") for bad, fragment in REFUSALS
                if not (start == "branch" and bad == ["busy"])]  # a branch goes to a folder of its own
COMBINATIONS += [("resume_here", ["trainer.steps=abc"], "trainer.steps must be a positive integer"),
                 ("resume_here", ["model.ch=4"], "the stored weights do not fit")]


@pytest.mark.parametrize("start, bad, fragment", COMBINATIONS)
def test_a_refused_start_changes_no_file_of_the_run(four_steps, data_root, tmp_path, start, bad, fragment):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    if bad == ["nan"]:  # the checkpoint this start resumes from holds a NaN in D (with a valid digest)
        resumed = run / "checkpoints" / ("last.pt" if start.startswith("resume") else "step_0000002.pt")
        state = torch.load(resumed, weights_only=True)
        state["model"][next(k for k in state["model"] if k.startswith("D.") and k.endswith("weight"))].view(-1)[0] = float("nan")
        checkpoint.save({k: v for k, v in state.items() if k not in ("format", "version", "digest")}, resumed)
    before = snapshot(run)
    args = [*STARTS[start](run, tmp_path), *(a.format(tmp=tmp_path) for a in bad if a not in ("busy", "nan"))]
    refuse_a_case_that_cannot_fail(args, fragment)
    with files.RunLock(run) if bad == ["busy"] else contextlib.nullcontext():
        proc = run_cli(args, tmp_path, data_root, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert_one_line_error(proc, fragment)
    log = run / "train.log"  # the log is a history: a refused start may add to it (what it loaded), never change it
    assert log.read_bytes().startswith(four_steps.joinpath("train.log").read_bytes())
    assert {p: h for p, h in snapshot(run).items() if p != log} == {p: h for p, h in before.items() if p != log}
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == sorted(p.relative_to(four_steps) for p in four_steps.rglob("*"))
    assert (run / ".hydra" / "config.yaml").read_bytes() == (four_steps / ".hydra" / "config.yaml").read_bytes()
    assert not (tmp_path / "branch").exists()


def test_a_second_run_or_resume_into_a_busy_folder_is_refused(gentrain, corpus, tmp_path):
    busy = tmp_path / "busy"
    shutil.copytree(corpus / "gan", busy)
    before = snapshot(busy)
    with files.RunLock(busy):  # as a run training there holds it
        assert_one_line_error(gentrain(f"resume={busy}", "trainer.steps=4", check=False), "is in use by another gentrain run")
        assert_one_line_error(gentrain(*TINY, f"hydra.run.dir={busy}", check=False), "is in use by another gentrain run")
    assert snapshot(busy) == before
    gentrain(f"resume={busy}", "trainer.steps=4")  # the lock is gone with its holder


@pytest.mark.slow
def test_two_runs_started_at_once_into_one_folder(data_root, tmp_path):
    """Two real processes: the first trains, the second is refused while it does, and the first's files are
    its own (one run's metrics, not two interleaved)."""
    run = tmp_path / "run"
    args = ["model=vae", *FAST, "trainer.steps=100000", "trainer.log_every=1", f"hydra.run.dir={run}"]
    first = start_cli(args, tmp_path, data_root)
    wait_for_log_lines(run / "metrics.jsonl", 2, first)
    second = run_cli(args, tmp_path, data_root, check=False, process=True)
    assert_one_line_error(second, "is in use by another gentrain run")
    first.send_signal(2)
    first.communicate(timeout=120)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))


@pytest.mark.slow
def test_ctrl_c_while_starting_is_one_line(data_root, tmp_path):
    """Ctrl-C while the command imports torch: the same one line as later, no traceback, no run folder."""
    import signal
    import time

    proc = start_cli(["model=gan", *TINY, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, data_root)
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.time() + 60
    while proc.poll() is None and "libtorch" not in maps.read_text() and time.time() < deadline:
        time.sleep(0.01)  # until the process is loading torch's libraries, well inside the command
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    # 130, or killed by SIGINT itself (-2), which a shell also reports as 130
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("gentrain: interrupted"), stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size): a tmpfs of that many bytes at tmp_path/disk, a disk that fills up (Linux, and the
    right to mount one; skipped where either is missing)."""
    disk = tmp_path / "disk"

    def mount(size: int) -> Path:
        disk.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 1024 + 1}k", "tmpfs", str(disk)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()[:80]})")
        return disk

    yield mount
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fill `disk` but for about `leave` bytes."""
    free = shutil.disk_usage(disk).free
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_full_disk_is_one_line_and_keeps_the_previous_files(corpus, data_root, small_disk):
    size = sum(p.stat().st_size for p in (corpus / "gan").rglob("*") if p.is_file())
    tiny_disk = small_disk(size + (corpus / "codes.pt").stat().st_size + 256 * 1024)
    run = tiny_disk / "run"
    shutil.copytree(corpus / "gan", run)
    shutil.copy(corpus / "codes.pt", tiny_disk / "codes.pt")
    fill(tiny_disk, 8_000)
    before = snapshot(run)
    for args, fragment in [
        (["sample", f"ckpt={run}", "n=3000", f"out={tiny_disk / 'many'}/"], "the disk is full"),
        (["sample", f"ckpt={run}", "n=1024", f"out={tiny_disk / 'grid.png'}"], "the disk is full"),
        (["decode", f"input={tiny_disk / 'codes.pt'}", f"ckpt={corpus / 'vae'}", f"out={tiny_disk / 'dec'}/"], "the disk is full"),
        (["encode", f"ckpt={corpus / 'vae'}", "input=test", "n=2000", f"out={tiny_disk / 'more.pt'}"], "the disk is full"),
        ([f"resume={run}", "trainer.steps=4"], "the disk is full"),
    ]:
        metrics = (run / "metrics.jsonl").read_text()
        proc = run_cli(args, tiny_disk, data_root, check=False)
        assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr
        assert_one_line_error(proc, fragment)
        # every file as it was; the resumed run may have added log lines (its next start trims metrics.jsonl)
        kept = lambda shot: {p: h for p, h in shot.items() if p.name not in ("metrics.jsonl", "train.log")
                             and "tfevents" not in p.name}
        assert kept(snapshot(run)) == kept(before)
        assert (run / "metrics.jsonl").read_text().startswith(metrics)
        assert not [p for p in tiny_disk.rglob(".*.tmp")]  # no partial file left


def test_a_flipped_byte_anywhere_is_refused_or_changes_nothing(corpus, tmp_path):
    """Bit rot: a byte flipped at 60 places across a real checkpoint. Each copy is refused in one line, or
    (a flip in the zip's padding or metadata torch does not read) loads exactly what was saved."""
    import random

    from gentrain.errors import GentrainError

    good = (corpus / "gan" / "checkpoints" / "last.pt").read_bytes()
    original = checkpoint.load(corpus / "gan").state
    refused = 0
    for at in random.Random(0).sample(range(len(good)), 60):
        flipped = bytearray(good)
        flipped[at] ^= 0x10
        path = tmp_path / f"flip{at}.pt"
        path.write_bytes(bytes(flipped))
        try:
            loaded = checkpoint.load(path).state
        except GentrainError as e:
            assert "\n" not in str(e)
            refused += 1
            continue
        assert checkpoint.digest(loaded) == checkpoint.digest(original), at
    assert refused >= 40  # most bytes of a checkpoint are its tensors
