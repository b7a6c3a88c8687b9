"""The captured step checks itself: on the CPU, a capture backend played by the tests (fast.CAPTURE) stands in
for a GPU's, so the fallback of trainer.cuda_graphs=auto, the refusal of true and the check itself run through
the CLI here. A graph that agrees is kept; one that raises at capture or replays other numbers is dropped at
its check, and the run ends with the weights of a run that never captured."""

import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, assert_one_line_error
from gentrain import fast
from gentrain.fast import StepState

# Lazy R1 every 2 steps: two graphs, (D, Dreg, G) on even steps and (D, G) on odd ones; reused fakes and the
# EMA, as in the default GAN.
GAN = ["model=gan", *FAST, "model.ch=8", "model.r1=0.1", "model.r1_every=2", "model.ema=0.9", "model.reuse_fakes=true",
       "trainer.steps=8", "trainer.device=cpu", "trainer.sample_every=8", "trainer.ckpt_every=8", "trainer.keep_every=0",
       "trainer.loggers=[jsonl]"]


class PlayedGraph:
    """A graph as the tests play it: replay() runs the captured step again, eagerly, into the same output list
    (a real graph overwrites its static outputs); `perturb` then moves what it returns, or the weights."""

    def __init__(self, fn, outputs: list, perturb: str | None):
        self.fn, self.outputs, self.perturb = fn, outputs, perturb

    def replay(self):
        model = self.fn.__self__.step_fn.func.model
        self.before = next(model.G.parameters()).detach().clone()
        out = self.fn()
        if self.perturb == "losses":
            out = [(loss * 1.05, stats) for loss, stats in out]
        elif self.perturb in ("weights", "half"):  # G's first weight, reached through the step the graph runs
            model = self.fn.__self__.step_fn.func.model  # StepGraph.run -> partial(loop.Step, phases)
            with torch.no_grad():
                w = next(model.G.parameters())
                if self.perturb == "weights":
                    w.mul_(1.1)
                else:  # half of this step's update, as a graph with a learning rate baked in at half would
                    w.copy_((w + self.before) / 2)
        self.outputs[:] = out


class PlayedCapture:
    """fast.CudaCapture's interface on the CPU: `mode` is agree, raise (at capture), losses or weights."""

    instances = []

    def __init__(self, device, mode: str):
        self.mode, self.captures = mode, 0
        PlayedCapture.instances.append(self)

    def eager(self, fn):
        return fn()

    def capture(self, fn):
        if self.mode == "raise":
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        outputs = []
        return PlayedGraph(fn, outputs, None if self.mode == "agree" else self.mode), outputs

    def rng_state(self):
        return [torch.get_rng_state()]

    def set_rng_state(self, state):
        torch.set_rng_state(state[0])


@pytest.fixture
def played(monkeypatch):
    """play(mode): the CPU captures with a PlayedCapture of that mode from now on."""
    PlayedCapture.instances.clear()

    def play(mode: str):
        monkeypatch.setitem(fast.CAPTURE, "cpu", lambda device: PlayedCapture(device, mode))
    return play


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def log_of(run: Path) -> str:
    return (run / "train.log").read_text()


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory, data_root):
    """The same 8 steps never captured: what every fallback must end with."""
    from conftest import run_cli

    run = tmp_path_factory.mktemp("eager") / "run"
    run_cli([*GAN, "trainer.cuda_graphs=false", f"hydra.run.dir={run}"], run.parent, data_root)
    assert "captured" not in log_of(run)
    return run


def test_a_graph_that_agrees_is_captured_checked_and_replayed(gentrain, tmp_path, played, eager_run):
    played("agree")
    proc = gentrain(*GAN, f"hydra.run.dir={tmp_path / 'run'}")  # auto
    log = log_of(tmp_path / "run")
    assert "with CUDA graphs" in log.splitlines()[0] + log
    # (D, Dreg, G) on steps 0, 2, 4 eager, captured at the fourth call (step index 6); (D, G) at step index 7.
    assert "captured the (D, Dreg, G) step at step 7 (checked against the eager step" in log
    assert "captured the (D, G) step at step 8 (checked against the eager step" in log
    assert "CUDA graphs off" not in log and "CUDA graphs off" not in proc.stderr
    capture, = PlayedCapture.instances
    assert capture.captures == 2
    assert_same_weights(eager_run, tmp_path / "run")  # the played replay computes what the eager step does


@pytest.mark.parametrize("mode, why", [
    ("raise", "capturing the (D, Dreg, G) step raised RuntimeError: operation not permitted when stream is capturing"),
    ("losses", "the captured step's loss of phase 1 is"),
    ("weights", "weights, buffers and optimizer states differ from the eager step's"),
    # a change far below the weights' norms (the check compares with what the step changed, not the norms)
    ("half", "1 of "),
])
def test_auto_falls_back_to_the_eager_step_with_one_line(gentrain, tmp_path, played, eager_run, mode, why):
    played(mode)
    gentrain(*GAN, f"hydra.run.dir={tmp_path / 'run'}")
    log = log_of(tmp_path / "run")
    off = [line for line in log.splitlines() if "CUDA graphs off for this run" in line]
    assert len(off) == 1 and why in off[0] and off[0].endswith("trainer.cuda_graphs=false skips the check"), log
    assert "captured the" not in log
    assert_same_weights(eager_run, tmp_path / "run")  # the eager step's result was kept, then no capture at all


@pytest.mark.parametrize("mode, why", [("raise", "raised RuntimeError"), ("losses", "the captured step's loss")])
def test_strict_capture_refuses_in_one_line(gentrain, tmp_path, played, mode, why):
    played(mode)
    proc = gentrain(*GAN, "trainer.cuda_graphs=true", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert_one_line_error(proc, "trainer.cuda_graphs=true: the captured step failed its check at step 7", why,
                          "trainer.cuda_graphs=auto falls back")


def test_step_state_restores_every_tensor_and_the_rng_in_place():
    """A snapshot names the model's parameters and buffers, the optimizers' state and the RNG; restore writes
    them back into the same tensors (a captured graph keeps reading those)."""
    from gentrain.models import build

    torch.manual_seed(0)
    model = build({"family": "gan", "ch": 8, "ema": 0.9, "r1": 0.1, "r1_every": 2}, 1, 28)
    optimizers = {o: torch.optim.Adam(model.phase_parameters(o)) for o in model.optimizers}
    state = StepState(model, optimizers, PlayedCapture(None, "agree"))

    def step():
        for o, opt in optimizers.items():
            loss = sum(p.square().sum() for p in model.phase_parameters(o)) * torch.rand(())
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.after_step("G", 0)
    values = lambda: [t.detach().clone() for t in state.tensors()]
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    step()
    before, ids = state.snapshot(), [id(t) for t in state.tensors()]
    saved, draw = values(), torch.rand(3)
    state.restore(before)
    step()
    assert not same(values(), saved)
    state.restore(before)
    assert same(values(), saved) and torch.equal(torch.rand(3), draw)
    assert [id(t) for t in state.tensors()] == ids


# gentrain doctor: the facts and the default steps, eager and (where a capture backend exists) captured.

def test_doctor_reports_the_cpu_path_and_the_gpu_checks_as_not_applicable(gentrain, tmp_path):
    proc = gentrain("doctor", "seconds=0.1", f"out={tmp_path / 'doctor.json'}")
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["gpu"] is None
    for family in ("gan", "vae"):
        rows = report["families"][family]
        assert rows["eager"]["applies"] and rows["eager"]["img_per_s"] > 0 and rows["eager"]["finite"]
        assert rows["captured"] == {"applies": False, "why": "it runs on cpu, and CUDA graphs need a CUDA GPU"}
        assert not rows["compiled"]["applies"]
    assert report["broken"] == [] and "gan  eager" in proc.stdout


@pytest.mark.parametrize("mode", ["agree", "losses"])
def test_doctor_checks_the_captured_step_and_names_the_switch_that_avoids_a_broken_one(gentrain, tmp_path, played,
                                                                                        monkeypatch, mode):
    from gentrain.commands import doctor

    small = ["model.ch=8", "trainer.batch_size=16"]
    families = {"gan": ["model=gan", *small, "model.r1_every=2"], "vae": ["model=vae", *small]}
    if mode == "agree":  # the GAN's two graphs; the VAE's one is no different
        families.pop("vae")
    monkeypatch.setattr(doctor, "FAMILIES", families)
    played(mode)
    proc = gentrain("doctor", "seconds=0.1", f"out={tmp_path / 'doctor.json'}", check=False)
    report = json.loads((tmp_path / "doctor.json").read_text())
    gan = report["families"]["gan"]["captured"]
    if mode == "agree":
        assert proc.returncode == 0, proc.stderr
        assert gan["graphs_captured"] == 2 and gan["fallback"] is None and gan["agrees"] is True
    else:
        assert gan["graphs_captured"] == 0 and "loss of phase 1" in gan["fallback"]
        assert_one_line_error(proc, "the captured gan step failed its check against the eager step",
                              "trainer.cuda_graphs=false avoids it", "(and 1 more in")
    assert proc.returncode == (mode != "agree")


def test_doctor_refuses_a_bad_argument_in_one_line(gentrain):
    assert_one_line_error(gentrain("doctor", "seconds=soon", check=False), "seconds must be a number")
    assert_one_line_error(gentrain("doctor", "device=tpu", check=False), "device must be one of auto|cpu|cuda")
    assert "Exits non-zero" in gentrain("doctor", "--help").stdout


def test_r3gans_step_with_r2_in_its_dreg_phase_is_captured_and_ends_as_the_eager_run(gentrain, tmp_path, played):
    """The Dreg phase of RpGAN + R1 + R2 draws fakes of its own (R2's): its noise comes from the RNG that
    the check snapshots and restores, so the replayed run ends with the eager run's weights exactly."""
    args = [*GAN, "experiment=r3gan", "dataset=mnist", "model.ch=8", "model.r1_every=2", "model.r2_every=2"]
    gentrain(*args, "trainer.cuda_graphs=false", f"hydra.run.dir={tmp_path / 'eager'}")
    played("agree")
    gentrain(*args, f"hydra.run.dir={tmp_path / 'run'}")
    log = log_of(tmp_path / "run")
    assert "captured the (D, Dreg, G) step at step 7" in log and "captured the (D, G) step at step 8" in log
    assert "D/r2" in (tmp_path / "run" / "metrics.jsonl").read_text()
    assert_same_weights(tmp_path / "eager", tmp_path / "run")
