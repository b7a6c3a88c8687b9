"""Data parallelism across processes: torchrun's process group, the global batch split across ranks,
and torchrun itself for `gentrain trainer.devices=N`.

Every rank holds the same model and draws the same random numbers; rank r trains on its rows of each
global batch and gradients are averaged over ranks before every optimizer step. N processes therefore
take exactly the steps one process takes on trainer.batch_size examples (up to floating-point sums
and per-rank batch-norm statistics; trainer.sync_bn=true shares those too). Outside torchrun every
function here is the single-process identity.
"""

import logging
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as td

log = logging.getLogger("gentrain")

_control = None  # a gloo group for the small host-side agreements (stop, time up), also beside NCCL


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_initialized() else int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Is this process one of torchrun's workers?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL between GPUs, gloo on CPU); the device this rank trains on."""
    global _control
    if not launched():
        return device
    if device.type == "cuda":
        gpus, local = torch.cuda.device_count(), int(os.environ["LOCAL_WORLD_SIZE"])
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % gpus)
        torch.cuda.set_device(device)
        if local <= gpus:
            td.init_process_group("nccl", device_id=device)
            _control = td.new_group(backend="gloo")
        else:  # NCCL takes one GPU per process; gloo's all-reduce and broadcast also run on CUDA tensors
            log.warning("%d processes share %d GPU(s) through gloo: slower than one process per GPU",
                        local, gpus)
            td.init_process_group("gloo")
            _control = td.group.WORLD
    else:
        td.init_process_group("gloo")
        _control = td.group.WORLD
    if rank() != 0:
        log.setLevel(logging.WARNING)  # rank 0 speaks for the run
    return device


def shutdown() -> None:
    """Leave the process group, every rank at the same point (after the last barrier), while the interpreter
    is whole. No reference to a group may outlive this call: destroy_process_group() leaves a group that is
    still referenced (as `_control` referenced the default one) with its gloo threads running, and they end
    only with the interpreter, where a thread still freeing work (and the tensors it holds) cannot take the
    GIL and is torn down inside a C++ destructor: `terminate called without an active exception`, SIGABRT.
    On a loaded 2-core machine 2 of 25 two-process launches that kept the reference aborted so, 0 of 40
    that let it go."""
    global _control
    _control = None
    if td.is_initialized():
        td.destroy_process_group()


def peer_lost(e: Exception) -> bool:
    """Did a collective fail because another worker is gone (it failed and reported why, or was stopped)?"""
    return launched() and (isinstance(e, td.DistError) or "closed by peer" in str(e) or "reset by peer" in str(e))


def local_rows(n: int) -> slice:
    """This rank's rows of a global batch of n examples (n is a multiple of the world size)."""
    b = n // world_size()
    return slice(rank() * b, (rank() + 1) * b)


def per_example(draw, n: int) -> torch.Tensor:
    """Random numbers for this rank's n examples: `draw(m)` draws them for m examples. Each rank draws
    the whole global batch's numbers from the same RNG state and keeps its own rows, so no two ranks
    share noise and N ranks see exactly the numbers one process would."""
    w = world_size()
    return draw(n) if w == 1 else draw(n * w)[rank() * n:(rank() + 1) * n]


def average_gradients(params) -> None:
    """Mean of every rank's gradients, in one all-reduce over a flat buffer.

    Not torch's DistributedDataParallel wrapper: it syncs in the wrapped module's backward, one module
    and one forward per step, and does not support torch.autograd.grad (its documented limits). A GAN
    step runs D twice (real, fake), trains D and G in turn and differentiates D's input gradient (R1,
    WGAN-GP), so gradients are averaged per phase after backward, as StyleGAN2-ADA's training loop does.
    """
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    td.all_reduce(flat)
    flat /= world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def _reduced(x: torch.Tensor, op) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.clone()
    td.all_reduce(x, op=op)
    return x


def mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor every rank holds (logged losses)."""
    return _reduced(x, td.ReduceOp.SUM) / world_size()


def total(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor every rank holds (counts over the global batch)."""
    return _reduced(x, td.ReduceOp.SUM)


def minimum(x: torch.Tensor) -> torch.Tensor:
    """The smallest value over ranks of a tensor every rank holds."""
    return _reduced(x, td.ReduceOp.MIN)


def broadcast_(module: torch.nn.Module) -> None:
    """Start every rank from rank 0's weights and buffers."""
    if world_size() > 1:
        for t in [*module.parameters(), *module.buffers()]:
            td.broadcast(t.data, 0)


def sync_batchnorm(model: torch.nn.Module) -> None:
    """trainer.sync_bn: batch-norm statistics over the global batch, not each rank's rows, in the networks
    that train (the children with trainable parameters), in place. An EMA of weights never trains and runs
    its batch norms on rank 0 alone (models/gan.py, EMA.calibrate), where a synced one would wait for the
    other ranks."""
    for name, net in model.named_children():
        if any(p.requires_grad for p in net.parameters()):
            setattr(model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(net))


def agree(any_rank: bool = False, rank0: bool = False) -> tuple[bool, bool]:
    """Decisions every rank must take at the same step: (any rank asks for it, rank 0 says so).

    A signal may reach the ranks a step apart, and only rank 0 keeps the training clock (it alone
    pauses for evaluation), so the loop stops where these agree, not where each rank sees fit."""
    if world_size() == 1:
        return any_rank, rank0
    flags = torch.tensor([int(any_rank), int(rank0) if rank() == 0 else 0])
    td.all_reduce(flags, op=td.ReduceOp.MAX, group=_control)
    return bool(flags[0]), bool(flags[1])


def share(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        td.barrier(group=_control)


def torchrun(nproc: int, args: list[str], run_dir: Path) -> str | None:
    """`torchrun --standalone --nproc-per-node=N -m gentrain ARGS`, from this process: torch's own
    launcher (torch.distributed.run) starts the workers, forwards Ctrl-C to them, and stops them all
    when one fails. A worker that fails with an error prints its own line, so this one exits with its code
    quietly; a worker killed or crashed (a signal) says nothing: the line that names it is returned."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.root.manager.loggerDict):  # torchrun's own reports: the workers speak for themselves
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # torchrun's default thread count is 1; split this machine's cores instead. Set for the workers alone:
    # left in this process's environment it would change the thread count of every process it starts later
    # (a test suite's subprocesses then reduce in another order than its in-process runs).
    threads = "OMP_NUM_THREADS" not in os.environ
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    launch = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--monitor-interval=0.5",
                         "-m", "gentrain", *args])  # --standalone: a local rendezvous with a fresh id
    try:
        run(launch)
    except ChildFailedError as e:
        failures = {rank: (f.pid, f.exitcode) for rank, f in e.failures.items()}
        if all(code <= 1 for _, code in failures.values()):  # no worker said why (2, 130: its own line)
            return failed_worker(failures, nproc, run_dir)
        sys.exit(min(code for _, code in failures.values() if code > 1))
    except SignalException as e:  # the launcher's own signal, passed on to the workers: exit as a shell expects
        sys.exit(128 + int(e.sigval))
    finally:
        if threads:
            del os.environ["OMP_NUM_THREADS"]
    return None


def failed_worker(failures: dict[int, tuple[int, int]], nproc: int, run_dir: Path) -> str:
    """One line for workers that stopped without saying why, {rank: (pid, exit status)}: killed or crashed (a
    negative status, the signal) or an exception's exit 1 (its traceback above). Not the cause: a worker that
    exits 1 because its peer is gone (gentrain.errors), or one the launcher stopped with SIGTERM after."""
    rank, (pid, code) = min(failures.items(), key=lambda f: (f[1][1] >= 0, f[1][1] == -signal.SIGTERM, f[0]))
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = "stopped on an error (its traceback is above)"
    log = run_dir / "train.log"
    where = f"its log is {log}" if rank == 0 else f"its output is above (rank 0 alone keeps a log file: {log})"
    resume = (f"; continue from the last checkpoint with: gentrain resume={run_dir}"
              if (run_dir / "checkpoints" / "last.pt").exists() else "")
    others = "the other worker was" if nproc == 2 else "the other workers were"
    return f"worker rank {rank} of {nproc} (pid {pid}) {how} (exit status {code}) and {others} stopped; {where}{resume}"
