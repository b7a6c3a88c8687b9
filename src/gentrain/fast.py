"""The fast path of a training run: every decision about the hardware (precision, TF32 and cuDNN flags,
memory format, fused and capturable optimizers, torch.compile, CUDA-graph capture) made once by `plan` from
the config and the machine, and the captured step that checks itself against the eager one (StepGraphs).

None of these changes what a step computes, only how fast it runs: a step with them on and off takes
the same arithmetic up to floating-point order (tests/test_fast.py checks it on CPU, and on CUDA where
there is one). Where that does not hold on some machine, the captured step's own check sees it and the run
goes on uncaptured (trainer.cuda_graphs=auto) or stops in one line (true).
"""

import functools
import logging
from dataclasses import dataclass, field

import torch

from gentrain.device import pick_precision
from gentrain.errors import GentrainError

log = logging.getLogger("gentrain")


@dataclass(frozen=True)
class FastPath:
    """What a run switches on, decided by `plan`. `uncaptured` says why a step that trainer.cuda_graphs=auto
    would capture is not (None when it is captured, or when capture was switched off); `strict`: capture was
    asked for (trainer.cuda_graphs=true), so a capture that fails its check is an error, not a fallback."""

    device: torch.device = torch.device("cpu")
    amp: torch.dtype | None = None   # the autocast dtype; None: fp32 weights and activations
    tf32: bool = False               # TF32 tensor cores for fp32 matrix multiplies and convolutions (CUDA)
    cudnn_benchmark: bool = False    # cuDNN times its kernels for the run's fixed shapes and keeps the fastest
    channels_last: bool = False
    fused: bool = False              # torch's fused optimizer kernels: one launch per parameter set
    compile: bool = False
    compile_options: dict = field(default_factory=dict)
    cuda_graphs: bool = False        # the step captured and replayed
    capturable: bool = False         # optimizers that keep their state on the GPU, as a captured step needs
    strict: bool = False
    uncaptured: str | None = None

    def apply(self) -> None:
        """The process-wide backend flags of this plan (CUDA's; the CPU has none to set)."""
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
            torch.backends.cudnn.benchmark = self.cudnn_benchmark

    def describe(self) -> list[str]:
        return [name for name, on in ((str(self.amp), self.amp is not None), ("TF32", self.tf32 and self.amp is None),
                                      ("channels_last", self.channels_last), ("torch.compile", self.compile),
                                      ("CUDA graphs", self.cuda_graphs)) if on]


def plan(t, device: torch.device, processes: int, points: bool, scheduled: bool = False) -> FastPath:
    """The trainer's precision, channels_last, compile and cuda_graphs settings for a run on `device` over
    `processes` processes, `scheduled` with a learning-rate schedule; a switch set to true that cannot work
    here is one GentrainError line. The single place these are decided (nanoGPT's block of dtype, TF32 and
    autocast at the top of train.py, grown to the rest of the fast path)."""
    cuda = device.type == "cuda"
    amp = pick_precision(t.precision, device)
    # fp32 on CUDA is IEEE fp32; every other precision lets cuBLAS and cuDNN round fp32 inputs to TF32 (under
    # bf16 autocast that reaches what autocast keeps in fp32).
    tf32 = cuda and t.precision != "fp32"
    compile_options, channels_last = {}, _channels_last(t.channels_last, device, points)
    if t.compile and cuda and not inductor_knows_nhwc_conv_grads():
        # This torch's inductor predicts NCHW strides for the gradients of a channels_last convolution
        # where cuDNN returns NHWC ones, and its compiled backward then fails a stride assertion
        # (pytorch/pytorch#171622; seen with ConvTranspose2d, on torch 2.11). Its own layout optimisation
        # makes such convolutions from NCHW inputs, so both the eager layout and inductor's stay NCHW.
        if t.channels_last is True:
            raise GentrainError(f"trainer.compile=true with trainer.channels_last=true fails in torch "
                                f"{torch.__version__}'s inductor on CUDA (pytorch/pytorch#171622); use "
                                f"trainer.channels_last=auto, or a torch whose inductor has the fix")
        compile_options, channels_last = {"layout_optimization": False}, False
    why = uncapturable(device, amp, processes, scheduled)
    if t.cuda_graphs is True and why:
        raise GentrainError(f"trainer.cuda_graphs=true cannot capture this run's step: {why}")
    capture = t.cuda_graphs is True or (t.cuda_graphs == "auto" and why is None)
    return FastPath(device, amp, tf32, cudnn_benchmark=cuda, channels_last=channels_last, fused=cuda,
                    compile=bool(t.compile), compile_options=compile_options, cuda_graphs=capture,
                    capturable=capture and cuda,
                    strict=t.cuda_graphs is True, uncaptured=why if t.cuda_graphs == "auto" else None)


def uncapturable(device: torch.device, amp: torch.dtype | None, processes: int, scheduled: bool = False) -> str | None:
    """Why a training step on `device` in `amp` over `processes` processes (`scheduled`: with a learning-rate
    schedule) cannot be one CUDA graph, or None. Every family's step reads nothing back to the host
    (tests/test_fast.py), so that is not a reason."""
    if device.type not in CAPTURE:
        return f"it runs on {device.type}, and CUDA graphs need a CUDA GPU"
    if amp is torch.float16:
        return "fp16's GradScaler reads its overflow check back to the host; use trainer.precision=bf16 or fp32"
    if processes > 1:
        # NCCL's all-reduce can run inside a graph (NCCL >= 2.9.6, torch's CUDA graph notes), gloo's
        # cannot; capturing the gradient averaging of gentrain.dist is not built or measured yet.
        return f"it runs in {processes} processes, whose gradient all-reduce is not captured yet"
    if scheduled and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
        # A captured step reads the learning rate from a device tensor that the scheduler must fill in
        # place: torch 2.4's schedulers read it back to the host first (pytorch/pytorch#133663), older
        # ones replace it by a float, which the graph never sees.
        return f"torch {torch.__version__}'s learning-rate schedulers cannot update a captured step (torch >= 2.5 can)"
    return None


def _channels_last(setting, device: torch.device, points: bool) -> bool:
    """trainer.channels_last: NHWC layout for the conv nets and their batches. auto: on CUDA, where cuDNN's
    tensor-core convolutions run in NHWC and NCHW costs a transpose around each of them."""
    if points:
        return False
    return device.type == "cuda" if setting == "auto" else bool(setting)


@functools.cache
def inductor_knows_nhwc_conv_grads() -> bool:
    """Does this torch's shape propagation give a channels_last convolution channels_last gradients, as
    cuDNN does? Asked of the meta kernel directly (a transposed convolution, on meta tensors, no compute)."""
    x = torch.empty(2, 4, 3, 3, device="meta").to(memory_format=torch.channels_last)
    w, grad = torch.empty(4, 2, 3, 3, device="meta"), torch.empty(2, 2, 5, 5, device="meta")
    grad_x, _, _ = torch.ops.aten.convolution_backward(grad, x, w, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1,
                                                       [True, True, False])
    return grad_x.is_contiguous(memory_format=torch.channels_last)


def compile_networks(model: torch.nn.Module, options: dict | None = None) -> None:
    """trainer.compile: every network of the family (G, D and G's EMA; the VAE's encoder and decoder)
    compiled by torch.compile with TorchInductor (and these inductor `options`), in place, so state-dict
    keys and checkpoints stay as they are. Each network is compiled apart rather than a whole phase at
    once: a GAN's gradient penalties differentiate D twice, which a compiled graph does not (they call D's
    plain forward, models/losses.py). Inside a CUDA graph (trainer.cuda_graphs) the compiled kernels are
    captured like any other: the graph is gentrain's own, so inductor's own CUDA graphs stay off."""
    for net in model.children():
        net.compile(options=options or None)


# The captured step.

class CudaCapture:
    """How a step is captured on a CUDA GPU (torch.cuda.graph; PyTorch's CUDA semantics notes, "CUDA
    Graphs"). One memory pool for all of a run's graphs, so a run with lazy regularisation (two graphs) holds
    one set of static activations; capture_error_mode="thread_local", so another thread's CUDA calls (a
    DataLoader's pin-memory thread) cannot invalidate the capture (pytorch/pytorch#175425). Warm-up and check
    steps run on a side stream, as capture requires. Tests replace it (CAPTURE) to play a GPU on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.pool, self.side = device, torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)

    def eager(self, fn):
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.side)
        return out

    def capture(self, fn):
        """fn's kernels recorded (not run) as a graph: returns (graph with replay(), fn's static outputs).
        A capture that fails leaves neither its stream current (torch.cuda.graph's exit ends the capture
        before it leaves the stream, so a failed end would leave it) nor the CUDA generator in capture."""
        graph, current = torch.cuda.CUDAGraph(), torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = fn()
        except Exception:
            torch.cuda.set_stream(current)
            self._reset_generator()
            raise
        return graph, out

    def _reset_generator(self) -> None:
        """After a capture that failed at its end, torch before 2.13 can leave the default CUDA generator
        marked as capturing, and the next eager random draw fails ("Offset increment outside graph capture");
        a capture that succeeds clears the mark and leaves the generator's offset as it was. Best effort: if
        it fails too, the eager step after it says so."""
        try:
            x = torch.zeros(1, device=self.device)
            with torch.cuda.graph(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
                x.add_(1)
        except Exception:  # noqa: BLE001
            torch.cuda.set_stream(torch.cuda.default_stream(self.device))

    def rng_state(self) -> list[torch.Tensor]:
        return [torch.get_rng_state(), torch.cuda.get_rng_state(self.device)]

    def set_rng_state(self, state: list[torch.Tensor]) -> None:
        torch.set_rng_state(state[0])
        torch.cuda.set_rng_state(state[1], self.device)


# A capture backend for each device type that has one; `uncapturable` reads it.
CAPTURE = {"cuda": CudaCapture}

# The relative tolerance of the captured-vs-eager check of the losses, by autocast dtype: what the CUDA
# tests allow a captured run against an eager one. A state tensor (weight, buffer, optimizer moment) may
# differ from the eager step's result by UPDATE_RTOL of what the step itself changed in it: atomics in a
# few backward kernels reorder sums, and Adam turns a rounding on a near-zero gradient into a full step
# for that element, while a graph that skips, repeats or scales an update misses by all of it.
CHECK_RTOL = {None: 1e-3, torch.bfloat16: 2e-2}
UPDATE_RTOL = 0.1


class StepState:
    """The state one training step changes, named in one place so it can be snapshot and restored: every
    parameter and buffer of the model (EMA, ADA's statistics, spectral norm's vectors), every optimizer
    state tensor, and the RNG. Nothing else survives a step: what one phase hands the next lives in the
    step's `carry` (loop.Step). Restored in place, so a captured graph that reads these tensors still does."""

    def __init__(self, model: torch.nn.Module, optimizers: dict, capture):
        self.model, self.optimizers, self.capture = model, optimizers, capture

    def tensors(self) -> list[torch.Tensor]:
        out = [t for t in (*self.model.parameters(), *self.model.buffers())]
        for opt in self.optimizers.values():
            out += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return out

    def snapshot(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list]:
        """Each state tensor with a copy of its value (restore writes into the tensors named here, even if
        an optimizer made new state since), and the RNG states."""
        with torch.no_grad():
            return [(t, t.detach().clone()) for t in self.tensors()], self.capture.rng_state()

    def restore(self, snap) -> None:
        saved, rng = snap
        with torch.no_grad():
            for t, s in saved:
                t.copy_(s)
        self.capture.set_rng_state(rng)

    def misses(self, before, after) -> torch.Tensor:
        """For each state tensor: how far its value now is from `after`, as a share of what the step changed
        from `before` to `after` (both snapshots), with a floor of 1e-6 of its size for what did not change."""
        with torch.no_grad():
            return torch.stack([(t.double() - a.double()).norm() /
                                ((a.double() - b.double()).norm() + 1e-6 * a.double().norm() + 1e-12)
                                for (t, b), (_, a) in zip(before[0], after[0], strict=True)])


class StepGraphs:
    """trainer.cuda_graphs: a captured graph for each set of phases a step can run (a phase that runs every
    k steps, lazy regularisation, is in the graph replayed on its steps and absent from the other one), each
    checked against the eager step at its first replay.

    The check (for each graph, once): snapshot the step's state, run the step eagerly, keep its losses and its
    resulting state, restore, replay the graph, and compare the losses at CHECK_RTOL and every state tensor
    against the eager result at UPDATE_RTOL of the step's own change to it.
    A capture error or a mismatch keeps the eager step's result and turns capture off for the rest of the
    run, with one log line; with `strict` (trainer.cuda_graphs=true) it is one error line instead."""

    def __init__(self, step_fn, state: StepState, capture, amp: torch.dtype | None = None, strict: bool = False,
                 warmup: int = 3):
        self.step_fn, self.state, self.capture, self.strict, self.warmup = step_fn, state, capture, strict, warmup
        self.rtol = CHECK_RTOL.get(amp, CHECK_RTOL[torch.bfloat16])
        self.graphs, self.off = {}, None  # off: why capture was turned off for this run
        self.captured = self.replays = 0

    def __call__(self, phases: tuple, inputs: list[tuple], step: int):
        if self.off:
            return self.step_fn(phases, inputs, step)
        if phases not in self.graphs:
            self.graphs[phases] = StepGraph(functools.partial(self.step_fn, phases), inputs)
        graph = self.graphs[phases]
        graph.load(inputs, step)
        if graph.calls < self.warmup:  # real training steps, eager, as capture needs (cuDNN autotuning, Adam's state)
            graph.calls += 1
            return self.capture.eager(graph.run)
        if graph.graph is None:
            return self._capture_and_check(graph, phases, step)
        graph.graph.replay()
        self.replays += 1
        return graph.outputs

    def _capture_and_check(self, graph: "StepGraph", phases: tuple, step: int):
        name = f"({', '.join(p.name for p in phases)})"
        before = self.state.snapshot()
        eager = self.capture.eager(graph.run)
        eager = [(loss.clone(), {k: v.clone() for k, v in stats.items()}) for loss, stats in eager]
        after = self.state.snapshot()
        try:
            self.state.restore(before)
            graph.graph, graph.outputs = self.capture.capture(graph.run)
            graph.graph.replay()
            why = self._differs(eager, graph.outputs, before, after)
        except Exception as e:  # noqa: BLE001 - whatever the capture raised, the eager step stands
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = f"capturing the {name} step raised {type(e).__name__}: {text}"
        if why is None:
            self.captured += 1
            self.replays += 1
            log.info("captured the %s step at step %d (checked against the eager step: losses, weights and "
                     "optimizer states agree)", name, step + 1)
            return graph.outputs
        self.state.restore(after)  # the eager step's result, as an uncaptured run has it
        self.graphs = {}  # the graphs and, with them, their memory pool
        if self.strict:
            raise GentrainError(f"trainer.cuda_graphs=true: the captured step failed its check at step {step + 1}: "
                                f"{why}; trainer.cuda_graphs=auto falls back to the eager step, false skips capture")
        self.off = why
        log.warning("CUDA graphs off for this run: %s; trainer.cuda_graphs=false skips the check", why)
        return eager

    def _differs(self, eager: list, replayed: list, before, after) -> str | None:
        """Why the replayed step is not the eager one, or None: each loss and logged number within rtol of the
        eager one's magnitude (plus 1e-5 for numbers near zero), and each state tensor within UPDATE_RTOL of
        the change the eager step made to it. A step whose losses are not finite is left to the loop's check."""
        a = torch.stack([x for loss, stats in eager for x in (loss, *stats.values())]).double().cpu()
        b = torch.stack([x for loss, stats in replayed for x in (loss, *stats.values())]).double().cpu()
        if not torch.isfinite(a).all():
            return None
        names = [n for i, (_, stats) in enumerate(eager) for n in (f"loss of phase {i + 1}", *stats)]
        for n, x, y in zip(names, a.tolist(), b.tolist()):
            if not abs(x - y) <= self.rtol * abs(x) + 1e-5:
                return f"the captured step's {n} is {y:.6g} where the eager step's is {x:.6g}"
        misses = self.state.misses(before, after).cpu()
        bad = ~(misses <= UPDATE_RTOL)
        if bad.any():
            return (f"{int(bad.sum())} of {len(misses)} weights, buffers and optimizer states differ from the eager "
                    f"step's (one by {float(misses[bad].max()):.3g} of the step's own change to it)")
        return None


class StepGraph:
    """One whole training step (every phase's forward, backward, optimizer step and after_step hook) as one
    graph, replayed, so a step costs one launch instead of hundreds; at small batches the GPU otherwise
    waits on the CPU launching kernels. PyTorch's "whole-network capture":

    - shapes are static: each replay reads its batches from fixed input buffers, copied in before it, and
      the step number from a device tensor (a Python number would be baked into the graph);
    - the optimizers are built with capturable=True (state on the device), autocast runs without its
      weight cache, and nothing in the step may read a value back to the host.
    The step's outputs are static tensors, overwritten by every replay: read them before the next one.
    """

    def __init__(self, step_fn, inputs: list[tuple]):
        device = next(t for run in inputs for t in run if t is not None).device
        self.step_fn, self.calls = step_fn, 0
        self.inputs = [tuple(None if t is None else t.clone() for t in run) for run in inputs]
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.graph = self.outputs = None

    def load(self, inputs: list[tuple], step: int) -> None:
        for static, new in zip(self.inputs, inputs):
            for s, t in zip(static, new):
                if s is not None:
                    s.copy_(t, non_blocking=True)
        self.step.fill_(step)

    def run(self):
        return self.step_fn(self.inputs, self.step)
