"""The fast path the loop switches on: channels_last memory layout, torch.compile, and a whole training
step captured as one CUDA graph, decided once per run by `plan`.

None of these changes what a step computes, only how fast it runs: a step with them on and off takes
the same arithmetic up to floating-point order (tests/test_fast.py checks it on CPU, and on CUDA where
there is one).
"""

import functools
from dataclasses import dataclass, field

import torch

from gentrain.errors import GentrainError


@dataclass(frozen=True)
class FastPath:
    """What a run switches on. `uncaptured` says why a step that trainer.cuda_graphs=auto would capture is
    not (None when it is captured, or when capture was switched off)."""

    channels_last: bool = False
    compile: bool = False
    compile_options: dict = field(default_factory=dict)
    cuda_graphs: bool = False
    uncaptured: str | None = None

    def describe(self) -> list[str]:
        return [name for name, on in (("channels_last", self.channels_last), ("torch.compile", self.compile),
                                      ("CUDA graphs", self.cuda_graphs)) if on]


def plan(t, device: torch.device, amp: torch.dtype | None, processes: int, points: bool,
         scheduled: bool = False) -> FastPath:
    """The trainer's channels_last, compile and cuda_graphs settings for a run on `device` in `amp` over
    `processes` processes, `scheduled` with a learning-rate schedule; a switch set to true that cannot work
    here is one GentrainError line."""
    compile_options, channels_last = {}, _channels_last(t.channels_last, device, points)
    if t.compile and device.type == "cuda" and not inductor_knows_nhwc_conv_grads():
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
    return FastPath(channels_last, bool(t.compile), compile_options, capture,
                    why if t.cuda_graphs == "auto" else None)


def uncapturable(device: torch.device, amp: torch.dtype | None, processes: int, scheduled: bool = False) -> str | None:
    """Why a training step on `device` in `amp` over `processes` processes (`scheduled`: with a learning-rate
    schedule) cannot be one CUDA graph, or None. Every family's step reads nothing back to the host
    (tests/test_fast.py), so that is not a reason."""
    if device.type != "cuda":
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


class StepGraphs:
    """trainer.cuda_graphs: a StepGraph for each set of phases a step can run, so a phase that runs every k
    steps (lazy regularisation) is in the graph replayed on its steps and absent from the other one."""

    def __init__(self, step_fn, device: torch.device):
        self.step_fn, self.device, self.graphs = step_fn, device, {}

    def __call__(self, phases: tuple, inputs: list[tuple], step: int):
        if phases not in self.graphs:
            self.graphs[phases] = StepGraph(functools.partial(self.step_fn, phases), self.device)
        return self.graphs[phases](inputs, step)


class StepGraph:
    """One whole training step (every phase's forward, backward, optimizer step and after_step hook)
    captured once as a CUDA graph and replayed, so a step costs one launch instead of
    hundreds; at small batches the GPU otherwise waits on the CPU launching kernels. This is PyTorch's
    "whole-network capture" (torch.cuda.graph; CUDA semantics notes, "CUDA Graphs"):

    - shapes are static: each replay reads its batches from fixed input buffers, copied in before it, and
      the step number from a device tensor (a Python number would be baked into the graph);
    - the first `warmup` steps run eagerly on a side stream, as capture requires (cuDNN autotuning,
      optimizer state, compilation); they are real training steps;
    - the optimizers are built with capturable=True (state on the device), autocast runs without its
      weight cache, and nothing in the step may read a value back to the host.
    The step's outputs are static tensors, overwritten by every replay: read them before the next one.
    """

    def __init__(self, step_fn, device: torch.device, warmup: int = 3):
        self.step_fn, self.warmup, self.calls = step_fn, warmup, 0
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.inputs = self.outputs = self.graph = None
        self.side = torch.cuda.Stream(device)

    def __call__(self, inputs: list[tuple], step: int):
        if self.inputs is None:
            self.inputs = [tuple(None if t is None else t.clone() for t in run) for run in inputs]
        else:
            for static, new in zip(self.inputs, inputs):
                for s, t in zip(static, new):
                    if s is not None:
                        s.copy_(t, non_blocking=True)
        self.step.fill_(step)
        self.calls += 1
        if self.calls <= self.warmup:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.step_fn(self.inputs, self.step)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the kernels; replay() below runs them
                self.outputs = self.step_fn(self.inputs, self.step)
        self.graph.replay()
        return self.outputs
