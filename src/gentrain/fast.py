"""The fast path the loop switches on: channels_last memory layout, torch.compile, and a whole training
step captured as one CUDA graph.

None of these changes what a step computes, only how fast it runs: a step with them on and off takes
the same arithmetic up to floating-point order (tests/test_fast.py checks it on CPU, and on CUDA where
there is one).
"""

import functools

import torch


def channels_last(setting, device: torch.device, points: bool) -> bool:
    """trainer.channels_last: NHWC layout for the conv nets and their batches. auto: on CUDA, where cuDNN's
    tensor-core convolutions run in NHWC and NCHW costs a transpose around each of them."""
    if points:
        return False
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_networks(model: torch.nn.Module) -> None:
    """trainer.compile: every network of the family (G, D and G's EMA; the VAE's encoder and decoder)
    compiled by torch.compile with TorchInductor, in place, so state-dict keys and checkpoints stay as they
    are. Each network is compiled apart rather than a whole phase at once: a GAN's gradient penalties
    differentiate D twice, which a compiled graph does not (they call D's plain forward, models/losses.py)."""
    for net in model.children():
        net.compile()


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
