"""The fast path computes what the plain path computes: channels_last, torch.compile and bf16 against the
plain fp32 step, the sync-free EMA, CUDA-graph replay, and the benchmark script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, REPO, assert_one_line_error
from gentrain.checkpoint import load_model
from gentrain.models import build

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# A GAN step with every part that needs care on the fast path: two optimizers, R1 (a double backward,
# which compiled graphs do not support) and the EMA of G.
# The optimizer is pinned: the tolerances below were measured at it (a larger learning rate moves single weights
# further, and another beta2 moves which near-zero gradients flip sign).
GAN = ["model=gan", *FAST, "trainer.steps=3", "optim.lr=4e-4", "optim.betas=[0.5,0.999]", "model.r1=0.1",
       "model.r1_every=1", "model.ema=0.9"]


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_training(a: Path, b: Path, rel: float = 1e-2) -> None:
    """Two runs of the same steps through different kernels: each weight tensor within `rel` of the other's
    norm. Not element by element: fused kernels (inductor's, cuDNN's algorithm choice, TF32) sum in another
    order, and Adam's normalised step turns a rounding on a gradient near zero into a full step of the
    learning rate, so single elements can differ by far more than the tensors do (compiled on the CPU, after
    3 steps at lr 4e-4: elements up to 5e-5 apart, every tensor within 1e-4 of the plain run's). A step that
    computed something else moves whole tensors."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        x, y = wa[k].double(), wb[k].double()
        assert (x - y).norm() <= rel * x.norm() + 1e-6, (k, float((x - y).norm() / x.norm().clamp(min=1e-12)))


def log_of(run: Path) -> str:
    return (run / "train.log").read_text()


def captures(run: Path) -> list[str]:
    """The graphs a run captured and kept (fast.StepGraphs logs each after its check passed), in order;
    a run whose check failed says so in a line that fails this."""
    log = log_of(run)
    assert "CUDA graphs off" not in log, log
    return [line.split("captured the ", 1)[1].split(" (checked", 1)[0] for line in log.splitlines()
            if "captured the " in line]


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("switch", ["trainer.channels_last=true", "trainer.compile=true"])
def test_fast_switches_take_the_plain_steps(gentrain, tmp_path, switch, device):
    plain = [*GAN, f"trainer.device={device}", "trainer.precision=fp32", "trainer.channels_last=false"]
    gentrain(*plain, f"hydra.run.dir={tmp_path / 'plain'}")
    proc = gentrain(*plain, switch, f"hydra.run.dir={tmp_path / 'fast'}", timeout=600)
    assert ("channels_last" if "channels" in switch else "torch.compile") in proc.stderr + proc.stdout
    assert_same_training(tmp_path / "plain", tmp_path / "fast", rel=1e-3 if device == "cpu" else 1e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_bf16_steps_track_fp32(gentrain, tmp_path, device):
    """bf16 autocast rounds each step a little differently, so the runs drift apart weight by weight; the
    losses they log stay within 2% over the first steps."""
    args = ["model=vae", *FAST, "trainer.steps=8", f"trainer.device={device}"]
    gentrain(*args, "trainer.precision=fp32", f"hydra.run.dir={tmp_path / 'fp32'}")
    gentrain(*args, "trainer.precision=bf16", f"hydra.run.dir={tmp_path / 'bf16'}")
    records = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    pairs = list(zip(records(tmp_path / "fp32"), records(tmp_path / "bf16")))
    assert len(pairs) == 4 and pairs[0][0]["vae/loss"] > pairs[-1][0]["vae/loss"]  # it trains
    for a, b in pairs:
        assert b["vae/loss"] == pytest.approx(a["vae/loss"], rel=0.02)


def test_fp32_on_cuda_is_ieee_fp32_and_tf32_asks_for_tensor_cores():
    """The plan's precision: trainer.precision=fp32 turns TF32 off for cuBLAS and cuDNN, every other precision
    turns it on, and cuDNN times its kernels (the flags are process-wide and can be set without a GPU); on the
    CPU nothing is touched."""
    from gentrain import fast
    from gentrain.device import pick_precision, use_tf32

    saved = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for precision, tf32 in [("fp32", False), ("tf32", True), ("bf16", True), ("auto", True), ("fp32", False)]:
            speed = fast.plan(trainer(precision=precision), torch.device("cuda"), 1, points=False)
            speed.apply()
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32), precision
            assert torch.backends.cudnn.benchmark and speed.fused and speed.cudnn_benchmark
        cpu = fast.plan(trainer(precision="tf32"), torch.device("cpu"), 1, points=False)
        cpu.apply()
        assert not torch.backends.cuda.matmul.allow_tf32 and not (cpu.tf32 or cpu.fused or cpu.cudnn_benchmark)
        torch.backends.cudnn.benchmark = False
        use_tf32(torch.device("cuda"), "tf32")  # evaluation: TF32 as asked, cuDNN's default kernel choice
        assert torch.backends.cudnn.allow_tf32 and not torch.backends.cudnn.benchmark
        assert pick_precision("tf32", torch.device("cpu")) is None  # fp32 weights and activations, no autocast
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_ema_keeps_the_state_dict_of_torchs_averaged_model():
    """Checkpoints written when G's EMA was torch's AveragedModel still load."""
    from torch.optim.swa_utils import AveragedModel

    model = build({"family": "gan", "z_dim": 8, "ch": 8, "ema": 0.99}, 1, 28)
    assert model.G_ema.state_dict().keys() == AveragedModel(model.G).state_dict().keys()


def trainer(**settings):
    from omegaconf import OmegaConf

    return OmegaConf.create({"precision": "bf16", "channels_last": "auto", "compile": False, "cuda_graphs": "auto",
                             **settings})


@pytest.mark.parametrize("device, precision, processes, why", [
    ("cpu", "fp32", 1, "it runs on cpu, and CUDA graphs need a CUDA GPU"),
    ("cuda", "fp16", 1, "fp16's GradScaler reads its overflow check back to the host; use trainer.precision=bf16 or fp32"),
    ("cuda", "bf16", 2, "it runs in 2 processes, whose gradient all-reduce is not captured yet"),
])
def test_cuda_graphs_auto_says_why_it_does_not_capture(device, precision, processes, why):
    """Every configuration auto leaves uncaptured, with its reason; trainer.cuda_graphs=true refuses it in one
    line, and false is never captured. (The device is only named here: nothing runs on it.)"""
    from gentrain import fast
    from gentrain.errors import GentrainError

    device, t = torch.device(device), lambda **kw: trainer(precision=precision, **kw)
    auto = fast.plan(t(), device, processes, points=False)
    assert (auto.cuda_graphs, auto.uncaptured) == (False, why)
    with pytest.raises(GentrainError, match=f"^trainer.cuda_graphs=true cannot capture this run's step: {why}$"):
        fast.plan(t(cuda_graphs=True), device, processes, points=False)
    assert fast.plan(t(cuda_graphs=False), device, processes, points=False).uncaptured is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_auto_captures_one_process_in_bf16_or_fp32_on_cuda(precision):
    from gentrain import fast

    cuda = torch.device("cuda")
    speed = fast.plan(trainer(precision=precision), cuda, 1, points=False)
    assert speed.cuda_graphs and speed.uncaptured is None and speed.channels_last and not speed.strict
    assert "CUDA graphs" in speed.describe() and fast.plan(trainer(cuda_graphs=True), cuda, 1, points=False).strict
    amp = ["torch.bfloat16"] if precision == "bf16" else []
    assert fast.plan(trainer(precision=precision, compile=True), cuda, 1, points=True).describe() == \
        [*amp, "torch.compile", "CUDA graphs"]  # points: no conv layout to choose


@pytest.mark.parametrize("fixed", [True, False])
def test_compile_keeps_nchw_where_inductor_mispredicts_channels_last_gradients(monkeypatch, fixed):
    """On a torch whose inductor predicts NCHW gradients for a channels_last convolution (pytorch#171622),
    trainer.compile on CUDA keeps the eager layout and inductor's own NCHW, and channels_last=true with it
    is refused in one line; on a torch with the fix, and on the CPU, nothing changes. Both answers of the
    probe are played, whichever this torch gives (torch 2.14 has the fix, 2.11 lacks it)."""
    from gentrain import fast
    from gentrain.errors import GentrainError

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert isinstance(fast.inductor_knows_nhwc_conv_grads(), bool)  # the probe runs on this torch
    monkeypatch.setattr(fast, "inductor_knows_nhwc_conv_grads", lambda: fixed)
    speed = fast.plan(trainer(compile=True), cuda, 1, points=False)
    if fixed:
        assert speed.channels_last and speed.compile_options == {}
        assert fast.plan(trainer(compile=True, channels_last=True), cuda, 1, points=False).channels_last
    else:
        assert (speed.channels_last, speed.compile_options, speed.cuda_graphs) == \
            (False, {"layout_optimization": False}, True)
        with pytest.raises(GentrainError, match="pytorch/pytorch#171622"):
            fast.plan(trainer(compile=True, channels_last=True), cuda, 1, points=False)
    assert fast.plan(trainer(precision="fp32", compile=True, channels_last=True), cpu, 1, points=False).channels_last


def test_a_cpu_run_says_its_step_is_not_captured(gentrain, tmp_path):
    gentrain(*GAN, "trainer.device=cpu", "trainer.steps=1", f"hydra.run.dir={tmp_path}")
    first = next(line for line in (tmp_path / "train.log").read_text().splitlines() if "] - training " in line)
    assert first.endswith("(not captured as a CUDA graph: it runs on cpu, and CUDA graphs need a CUDA GPU)")


def test_cuda_graphs_need_a_gpu(gentrain):
    cpu = [*GAN, "trainer.device=cpu"]
    assert_one_line_error(gentrain(*cpu, "trainer.cuda_graphs=true", check=False),
                          "trainer.cuda_graphs=true cannot capture this run's step: it runs on cpu, and CUDA graphs need a CUDA GPU")
    assert_one_line_error(gentrain(*cpu, "trainer.compile=maybe", check=False), "trainer.compile must be true or false")


@pytest.mark.slow
def test_benchmark_runs_on_cpu_and_counts_the_classic_dcgan_flops(data_root, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark

    # The classic DCGAN-64 step (pytorch/examples dcgan) costs 2.44 GFLOP per image, and so does gentrain's
    # default step (its lazy R1 phase, one step in 16, left out of the count), whose G phase scores D's fakes
    # as the classic one does; drawing them anew for G's phase (model.reuse_fakes=false) costs a forward pass
    # of G more.
    cfg = benchmark.config([*benchmark.ROWS["dcgan64_b64"], f"dataset.root={data_root}"])
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = build(cfg.model, 1, 64)
    classic = benchmark.flops_per_image(benchmark.classic_step(model, cpu), torch.rand(4, 1, 64, 64) * 2 - 1)
    assert classic == pytest.approx(2.44e9, rel=0.01)
    assert benchmark.gentrain_flops(cfg, cpu) == pytest.approx(classic, rel=0.01)
    fresh = benchmark.config([*benchmark.ROWS["dcgan64_b64"], f"dataset.root={data_root}", "model.reuse_fakes=false"])
    assert classic * 1.05 < benchmark.gentrain_flops(fresh, cpu) < 1.2 * classic

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick", "--json", str(out)],
                          env={**os.environ, "GENTRAIN_DATA": str(data_root)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert [(r["row"], r["impl"]) for r in results] == [(row, impl) for row in ("dcgan64_b64", "gan28", "vae28")
                                                        for impl in ("reference", "gentrain default")]
    assert all(r["img_per_s"] > 0 and len(r["windows"]) == 2 for r in results)
    assert proc.stdout.count("| dcgan64_b64 |") == 2 and "vs reference" in proc.stdout


def test_step_time_compares_two_configs_interleaved(data_root):
    """scripts/step_time.py: both configs' median ms a step and their ratio, the lazy R1 phase on its steps."""
    tiny = ["model=gan", "model.ch=8", "trainer.batch_size=8"]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "step_time.py"), "--a", *tiny, "model.r1=0",
                           "--b", *tiny, "--rounds", "3", "--steps", "16"],
                          env={**os.environ, "GENTRAIN_DATA": str(data_root)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    a, b, ratio = proc.stdout.strip().splitlines()
    assert a.startswith("A model=gan") and "model.r1=0:" in a and b.startswith("B model=gan model.ch=8 trainer.batch_size=8:")
    medians = [float(line.rsplit(": ", 1)[1].split()[0]) for line in (a, b)]
    assert all(m > 0 for m in medians) and float(ratio.split()[1]) > 0 and "(median of 2 rounds)" in ratio


@cuda
def test_a_step_reads_nothing_back_from_the_gpu():
    """No host sync in a step that does not log: the loop's own step (loop.Step, with its carry, and the Meter),
    the families' losses, lazy R1's Dreg phase, ADA's update of its probability, the lightweight GAN, fused
    Adam, the EMA update and the batch gather, with torch's sync debugging set to raise. The step number is
    a device tensor, as in a captured step."""
    from gentrain import loop
    from gentrain.data import Batches, ImageData

    device = torch.device("cuda")
    for cfg, channels, size in (({"family": "gan", "ch": 16, "ema": 0.99, "r1": 0.1, "r1_every": 1}, 1, 28),
                                ({"family": "gan", "ch": 16, "r1": 0.1, "r1_every": 2, "reuse_fakes": True}, 1, 28),
                                ({"family": "gan", "ch": 16, "augment": ["color", "translation"], "augment_p": "auto",
                                  "ada_interval": 1}, 1, 28),
                                ({"family": "gan", "arch": "lightweight", "ch": 8, "ema": 0.99}, 3, 128),
                                ({"family": "vae", "ch": 16, "kl_warmup_steps": 10, "binarize": True}, 1, 28),
                                ({"family": "vqvae", "ch": 16, "prior_ch": 16}, 1, 28)):
        data = ImageData(torch.randint(0, 256, (64, channels, size, size), dtype=torch.uint8),
                         torch.randint(0, 10, (64,)), 10)
        batches = Batches(data, 16, 0, device)
        model = build(cfg, channels, size).to(device)
        optimizers = {o: torch.optim.Adam(model.phase_parameters(o), fused=True, capturable=True)
                      for o in model.optimizers}
        scalers = {o: torch.amp.GradScaler("cuda", enabled=False) for o in optimizers}
        step, meter = loop.Step(model, optimizers, scalers, device, torch.bfloat16, cache=False), loop.Meter(device)
        batches(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for s in range(4):
                phases = tuple(p for p in model.phases if s % p.every == 0)
                meter.add(s, step(phases, [batches(s)] * len(phases), torch.tensor(s, device=device)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert meter.bad_step() is None, cfg


@cuda
def test_step_graph_replays_the_eager_steps():
    """fast.StepGraphs with the CUDA capture: three eager warm-up steps, a capture checked against the eager
    step, then replays, each the eager step's numbers."""
    from gentrain.fast import CudaCapture, StepGraphs, StepState
    from gentrain.models.family import Phase

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(8, 1)

    def make():
        net = Net().cuda()
        return net, torch.optim.Adam(net.parameters(), lr=0.1, capturable=True)

    def step_fn(net, opt):
        def step(phases, inputs, t):
            (x, y), = inputs
            loss = (net.lin(x).squeeze(1) - y).pow(2).mean() * (1 + 0 * t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return [(loss.detach(), {})]
        return step

    g = torch.Generator(device="cuda").manual_seed(1)
    data = [(torch.randn(16, 8, device="cuda", generator=g), torch.randn(16, device="cuda", generator=g)) for _ in range(8)]
    eager, graphed = make(), make()
    capture = CudaCapture(torch.device("cuda"))
    phases = (Phase("fit", "opt"),)
    eager_step = step_fn(*eager)
    graphs = StepGraphs(step_fn(*graphed), StepState(graphed[0], {"opt": graphed[1]}, capture), capture, None)
    for i, batch in enumerate(data):
        a, b = eager_step(phases, [batch], i)[0][0], graphs(phases, [batch], i)[0][0]
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), i
    assert graphs.captured == 1 and graphs.replays == 5 and graphs.off is None  # steps 3..7 were replays
    assert torch.allclose(eager[0].lin.weight, graphed[0].lin.weight, rtol=1e-5, atol=1e-6)


def saves_the_emas_own_statistics(gentrain, run: Path, device: str, steps: int = 2) -> None:
    """A run on `device` calibrates its EMA between steps (captured ones on a GPU); the batch-norm statistics
    its checkpoint holds are the EMA's own, not G's: a fresh calibration of the loaded weights gives them again.
    In IEEE fp32: TF32's rounding alone moved the statistics by more than the tolerance (an H200, 2026-12-04)."""
    gentrain("model=gan", *FAST, f"trainer.device={device}", "trainer.precision=fp32", "model.ema=0.9",
             f"trainer.steps={steps}", f"hydra.run.dir={run}")
    saved = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    model, _ = load_model(run / "checkpoints" / "last.pt", torch.device(device))
    model.G_ema.calibrate()
    again = {f"G_ema.{k}": v.cpu() for k, v in model.G_ema.state_dict().items() if "running_" in k}
    assert again and all(torch.allclose(again[k], saved[k], rtol=1e-4, atol=1e-5) for k in again)
    assert all(saved[k].abs().sum() > 0 for k in again if k.endswith("running_mean"))  # not the init's zeros
    assert not all(torch.allclose(saved[k.replace("G_ema.module.", "G.")], saved[k]) for k in again)


def test_a_run_saves_the_emas_own_batch_norm_statistics(gentrain, tmp_path):
    saves_the_emas_own_statistics(gentrain, tmp_path / "run", "cpu")


@cuda
def test_a_captured_run_saves_the_emas_own_batch_norm_statistics(gentrain, tmp_path):
    saves_the_emas_own_statistics(gentrain, tmp_path / "run", "cuda", steps=8)  # past the capture at step 5
    assert captures(tmp_path / "run") == ["(D, G) step at step 5"]


@cuda
def test_cuda_graphs_train_and_resume_through_the_cli(gentrain, tmp_path):
    args = ["model=gan", *FAST, "trainer.device=cuda", "trainer.cuda_graphs=true", "model.ema=0.9"]
    gentrain(*args, "trainer.steps=8", f"hydra.run.dir={tmp_path / 'run'}")
    gentrain(f"resume={tmp_path / 'run'}", "trainer.steps=12")  # warm-up at steps 9-11, captured at 12
    assert captures(tmp_path / "run") == ["(D, G) step at step 5", "(D, G) step at step 12"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(2, 13, 2))
    assert all(torch.isfinite(torch.tensor(r["D/loss"])) for r in records)


def test_a_schedule_is_captured_only_where_torch_fills_the_learning_rate_in_place(monkeypatch):
    from gentrain.fast import uncapturable
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    assert "torch >= 2.5" in uncapturable(gpu, None, 1, scheduled=True)
    assert uncapturable(gpu, None, 1, scheduled=False) is None
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    assert uncapturable(gpu, None, 1, scheduled=True) is None


@cuda
def test_a_captured_step_follows_the_learning_rate_schedule(gentrain, tmp_path):
    """optim/scheduler=linear under CUDA graphs: the captured step reads the learning rate that the
    scheduler sets in place (a float would stay baked into the graph). The rate changes after each capture
    (at step 4, and at step 11 after the resume, with the schedule ending at 12): it trains as the eager run
    does, and past the schedule's end (lr 0) no weight moves."""
    args = ["model=gan", *FAST, "trainer.device=cuda", "trainer.precision=fp32", "optim/scheduler=linear",
            "optim.scheduler.total_iters=12", "model.r1=0"]  # one graph, (D, G)
    gentrain(*args, "trainer.steps=14", "trainer.cuda_graphs=false", f"hydra.run.dir={tmp_path / 'eager'}")
    gentrain(*args, "trainer.steps=7", "trainer.cuda_graphs=true", f"hydra.run.dir={tmp_path / 'captured'}")
    gentrain(f"resume={tmp_path / 'captured'}", "trainer.steps=14")
    assert captures(tmp_path / "captured") == ["(D, G) step at step 4", "(D, G) step at step 11"]
    # cuDNN picks its kernels apart in each process: a zero-initialised batch-norm bias, all Adam steps, was
    # 0.35% apart after 8 steps (an H200, 2026-12-04); a step at the wrong rate moves whole tensors.
    assert_same_training(tmp_path / "eager", tmp_path / "captured")
    at = lambda step: torch.load(tmp_path / f"captured/checkpoints/step_{step:07d}.pt", weights_only=True)
    twelve, fourteen = at(12), at(14)
    assert [float(g["lr"]) for o in ("D", "G") for g in fourteen["optim"][o]["param_groups"]] == [0.0, 0.0]
    weights = [k for k in fourteen["model"] if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(twelve["model"][k], fourteen["model"][k]) for k in weights)
    assert not all(torch.equal(at(10)["model"][k], twelve["model"][k]) for k in weights)  # replays at lr > 0


# Ops that launch no kernel on a GPU: views, allocations, metadata.
NO_KERNEL = {"aten::detach", "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::slice", "aten::select",
             "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::as_strided", "aten::t", "aten::transpose",
             "aten::permute", "aten::flatten", "aten::alias", "aten::unbind", "aten::split", "aten::narrow",
             "aten::lift_fresh", "aten::_unsafe_view", "aten::empty", "aten::empty_like", "aten::empty_strided",
             "aten::resize_", "aten::result_type", "aten::is_nonzero"}


def kernels_per_step(cfg: dict) -> tuple[int, int, int]:
    """One uncaptured training step of the loop (loop.Step and loop.Meter) on CPU under torch.profiler: the
    kernels it runs in all (leaf aten ops, not views), those the loop runs itself (outside the family's
    loss and after_step, autograd's backward and the optimizers), and the phases it ran."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from gentrain import loop

    torch.manual_seed(0)
    model = build(cfg, 1, 28).train()
    for name in ("loss", "after_step"):
        def scoped(*args, fn=getattr(model, name), label=f"family.{name}"):
            with record_function(label):
                return fn(*args)
        setattr(model, name, scoped)
    # foreach Adam: a fixed number of kernels per optimizer, as the fused one on a GPU (one) is
    optimizers = {o: torch.optim.Adam(model.phase_parameters(o), foreach=True) for o in model.optimizers}
    scalers = {o: torch.amp.GradScaler("cpu", enabled=False) for o in optimizers}
    run, meter = loop.Step(model, optimizers, scalers, torch.device("cpu"), None), loop.Meter()
    x, y = torch.rand(8, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (8,))

    def step(s: int) -> int:
        phases = tuple(p for p in model.phases if s % p.every == 0)
        meter.add(s, run(phases, [(x, y)] * len(phases), s))
        return len(phases)

    step(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        phases = step(1)
    total = own = 0
    for e in prof.events():
        if not e.name.startswith("aten::") or e.name in NO_KERNEL or any(c.name.startswith("aten::") for c in e.cpu_children):
            continue
        total += 1
        outer, inside = e.cpu_parent, False
        while outer is not None:
            inside |= outer.name.startswith(("family.", "autograd::engine", "Optimizer."))
            outer = outer.cpu_parent
        own += not inside
    return total, own, phases


@pytest.mark.parametrize("cfg, budget", [({"family": "gan"}, 271), ({"family": "vae"}, 224),
                                         ({"family": "gan", "d_steps": 2, "ema": 0.99}, None)])
def test_kernel_launches_per_step(cfg, budget):
    """The loop's own work in a step is a fixed handful of kernels, whatever the phases log (one stack of
    every loss and logged number, one sum, the finiteness check), plus backward's seed gradient per
    phase; a default step in all stays within its budget, measured on torch 2.14.1, so a regression shows."""
    total, own, phases = kernels_per_step(cfg)
    assert own - phases <= 11, own
    if budget:
        assert total <= budget * 1.1, total


# Lazy R1 every 2 steps: the step graph of (D, Dreg, G) and the one of (D, G), each replayed on its steps.
LAZY = ["model.r1=0.1", "model.r1_every=2"]


@cuda
@pytest.mark.parametrize("reuse", ["false", "true"])
def test_captured_lazy_r1_trains_as_the_uncaptured_step(gentrain, tmp_path, reuse):
    """With model.reuse_fakes, G's graph from D's phase crosses D's optimizer step and the Dreg phase
    inside the captured step."""
    args = ["model=gan", *FAST, *LAZY, "trainer.device=cuda", "trainer.precision=fp32", "trainer.steps=12",
            "model.ema=0.9", f"model.reuse_fakes={reuse}"]
    gentrain(*args, "trainer.cuda_graphs=false", f"hydra.run.dir={tmp_path / 'eager'}")
    gentrain(*args, f"hydra.run.dir={tmp_path / 'graphs'}")  # auto
    assert captures(tmp_path / "graphs") == ["(D, Dreg, G) step at step 7", "(D, G) step at step 8"]
    assert "CUDA graphs" not in log_of(tmp_path / "eager")
    records = [json.loads(line) for line in (tmp_path / "graphs" / "metrics.jsonl").read_text().splitlines()]
    assert all("D/r1" in r and torch.isfinite(torch.tensor(r["D/r1"])) for r in records)
    assert_same_training(tmp_path / "eager", tmp_path / "graphs")


@cuda
@pytest.mark.parametrize("layout, reuse", [("auto", "false"), ("true", "false"), ("auto", "true")])
def test_compile_with_channels_last_on_cuda(gentrain, tmp_path, layout, reuse):
    """trainer.compile=true with the channels_last layout (auto: on CUDA), captured (auto) and not: the
    weights of the plain step, with G's fakes drawn in its phase or reused from D's. On a torch whose
    inductor mispredicts channels_last convolution gradients (pytorch#171622), auto trains in NCHW and
    channels_last=true is refused in one line."""
    from gentrain.fast import inductor_knows_nhwc_conv_grads

    args = ["model=gan", *FAST, *LAZY, "trainer.device=cuda", "trainer.precision=fp32", "trainer.steps=8",
            f"model.reuse_fakes={reuse}"]
    compiled = [*args, "trainer.compile=true", f"trainer.channels_last={layout}"]
    if layout == "true" and not inductor_knows_nhwc_conv_grads():
        assert_one_line_error(gentrain(*compiled, check=False), "pytorch/pytorch#171622")
        return
    gentrain(*args, "trainer.cuda_graphs=false", f"hydra.run.dir={tmp_path / 'plain'}")
    for graphs in ("false", "auto"):
        gentrain(*compiled, f"trainer.cuda_graphs={graphs}", f"hydra.run.dir={tmp_path / graphs}", timeout=900)
        first = next(line for line in log_of(tmp_path / graphs).splitlines() if "] - training " in line)
        assert "torch.compile" in first and ("CUDA graphs" in first) == (graphs == "auto")
        assert len(captures(tmp_path / graphs)) == (2 if graphs == "auto" else 0)
        assert ("channels_last" in first) == inductor_knows_nhwc_conv_grads()
        assert_same_training(tmp_path / "plain", tmp_path / graphs)


@cuda
def test_a_captured_run_resumes_as_it_would_have_continued(gentrain, tmp_path):
    """16 captured steps in one go, and 8 + 8 with a resume between, which captures both graphs again after
    its own eager warm-up steps: the same training. A run stepped without capture resumes captured, and a
    captured one resumes on the CPU: the optimizers' step counts follow the step that reads them."""
    args = ["model=gan", *FAST, *LAZY, "trainer.device=cuda", "trainer.precision=fp32", "model.ema=0.9",
            "trainer.log_every=4", "trainer.keep_every=4", "trainer.ckpt_every=4", "trainer.sample_every=8"]
    both = ["(D, Dreg, G) step at step 7", "(D, G) step at step 8"]
    gentrain(*args, "trainer.steps=16", f"hydra.run.dir={tmp_path / 'whole'}")
    gentrain(*args, "trainer.steps=8", f"hydra.run.dir={tmp_path / 'halves'}")
    gentrain(f"resume={tmp_path / 'halves'}", "trainer.steps=16")
    assert captures(tmp_path / "whole") == both
    assert captures(tmp_path / "halves") == [*both, "(D, Dreg, G) step at step 15", "(D, G) step at step 16"]
    assert_same_training(tmp_path / "whole", tmp_path / "halves", rel=1e-3)
    steps = lambda run: [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps(tmp_path / "halves") == steps(tmp_path / "whole") == [4, 8, 12, 16]

    gentrain(*args, "trainer.steps=8", "trainer.cuda_graphs=false", f"hydra.run.dir={tmp_path / 'eager'}")
    gentrain(f"resume={tmp_path / 'eager'}", "trainer.steps=16", "trainer.cuda_graphs=auto")  # captured from here on
    assert captures(tmp_path / "eager") == ["(D, Dreg, G) step at step 15", "(D, G) step at step 16"]
    gentrain(f"resume={tmp_path / 'whole'}", "trainer.steps=18", "trainer.device=cpu")
    assert steps(tmp_path / "whole")[-1] == 18


@cuda
def test_the_default_gan_captured_in_bf16_trains_as_the_eager_step(gentrain, tmp_path):
    """The default GAN as users get it (hinge, lazy R1 every 16 steps with D's batch norm, reused fakes, the
    EMA, bf16, channels_last, fused capturable Adam), captured and eager over 64 steps: both graphs captured
    and kept by their check, the losses of every log interval and the weights close. bf16 rounds each step a
    little differently and cuDNN picks kernels apart in each process, so the runs drift; a graph that
    computed something else would move whole tensors (tolerances not yet measured on a GPU)."""
    args = ["model=gan", "trainer.device=cuda", "trainer.steps=64", "trainer.log_every=16", "trainer.sample_every=64",
            "trainer.ckpt_every=64", "trainer.loggers=[jsonl]"]
    gentrain(*args, "trainer.cuda_graphs=false", f"hydra.run.dir={tmp_path / 'eager'}")
    gentrain(*args, f"hydra.run.dir={tmp_path / 'graphs'}")  # the default, auto
    first = next(line for line in log_of(tmp_path / "graphs").splitlines() if "] - training " in line)
    assert "with torch.bfloat16" in first and "CUDA graphs" in first
    assert captures(tmp_path / "graphs") == ["(D, G) step at step 5", "(D, Dreg, G) step at step 49"]
    records = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(records(tmp_path / "eager"), records(tmp_path / "graphs"), strict=True):
        for key in ("D/loss", "G/loss"):
            assert b[key] == pytest.approx(a[key], rel=0.1, abs=0.05), (a["step"], key)
    assert_same_training(tmp_path / "eager", tmp_path / "graphs", rel=0.1)
