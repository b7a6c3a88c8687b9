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
import sys

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


def torchrun(nproc: int, args: list[str]) -> None:
    """`torchrun --standalone --nproc-per-node=N -m gentrain ARGS`, from this process: torch's own
    launcher (torch.distributed.run) starts the workers, forwards Ctrl-C to them, and stops them all
    when one fails. A worker prints its own one-line error, so this one exits with its code quietly."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.root.manager.loggerDict):  # torchrun's own reports: the workers speak for themselves
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun's default is 1; split this machine's cores instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    launch = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--monitor-interval=0.5",
                         "-m", "gentrain", *args])  # --standalone: a local rendezvous with a fresh id
    try:
        run(launch)
    except ChildFailedError as e:
        # A worker's own error code (2, 130); 1 where every failure was a signal (a crash, a kill)
        sys.exit(min([f.exitcode for f in e.failures.values() if f.exitcode > 0] or [1]))
    except SignalException:
        sys.exit(130)
