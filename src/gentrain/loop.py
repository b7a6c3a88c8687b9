"""The training loop shared by every model family.

It owns devices, mixed precision, the fast path (gentrain.fast), optimizer steps, logging, sample grids
and checkpoints. A family supplies `phases` and `loss(phase, x, y, step)` (GAN: "D" d_steps times, then
"G"; VAE: "vae"); the loop runs each phase with its own optimizer, calls the model's
`after_step(phase, step)` hook if it has one (WGAN clipping, EMA), and knows nothing else about the
model. Under torchrun each rank runs this same loop on its rows of every batch, with gradients averaged
before each step (gentrain.dist).
"""

import json
import logging
import math
import signal
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torchvision.utils import save_image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gentrain import GentrainError, Interrupted, checkpoint, dist, fast
from gentrain.data import Batches, ImageData, ImageFiles, on_device_setting
from gentrain.models import grid_codes

log = logging.getLogger("gentrain")


def pick_device(name: str, key: str = "trainer.device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GentrainError(f"{key}=cuda but torch sees no CUDA GPU; use {key}=cpu or auto")
    if name not in ("cpu", "cuda"):
        raise GentrainError(f"{key} must be one of auto|cpu|cuda, got {name!r}")
    return torch.device(name)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None
    if name not in PRECISIONS:
        raise GentrainError(f"trainer.precision must be one of auto|{'|'.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, reference: torch.Tensor | None = None) -> None:
    """Images in [-1, 1] as one PNG grid, about square unless nrow is given; 2-D points as a scatter
    plot over the `reference` (real) points."""
    if images.ndim == 2:
        from gentrain.plot import scatter

        return scatter(images.float().cpu(), path, reference)
    nrow = nrow or max(1, math.isqrt(len(images) - 1) + 1)
    save_image(images.float(), path, nrow=nrow, normalize=True, value_range=(-1, 1))


class _StopOnSignal:
    """Ctrl-C / SIGTERM, and the preemption signals USR1 / USR2 of a cluster scheduler, set a flag the
    loop reads between steps, so the checkpoint it then writes is taken at a step boundary; a second
    signal falls back to the handler before (Python's default: stop at once).

    SLURM (through submitit) sends USR2 before a job's time limit or preemption; the checkpoint is then
    marked `preempted`, so the requeued job resumes it by itself, and submitit's own handler, called
    afterwards, requeues the job."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    PREEMPT = (signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.requested, self.signum, self._old = False, None, {}

    def _handler(self, signum, frame):
        self.requested, self.signum = True, signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    @property
    def preempted(self) -> bool:
        return self.signum in self.PREEMPT

    def hand_over(self) -> None:
        """After the checkpoint: a preemption signal goes on to the handler that was there before
        (submitit's requeue), if there was one."""
        old = self._old.get(self.signum)
        if self.preempted and callable(old):
            old(self.signum, None)

    def __enter__(self):
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def train(cfg, model: torch.nn.Module, data: ImageData | ImageFiles, make_optimizer, run_dir: Path,
          device: torch.device, ckpt: dict | None = None, evaluate=None, best_by: tuple[str, bool] | None = None):
    """Train `model` on `device` for cfg.trainer.steps steps, writing everything into run_dir; `ckpt`
    resumes.

    `evaluate(model) -> {name: score}` runs every trainer.eval_every steps; the checkpoint with the
    best score `best_by = (name, lower_is_better)` so far is kept as checkpoints/best.pt. Under torchrun
    only rank 0 writes files and evaluates.
    """
    t = cfg.trainer
    amp_dtype = pick_precision(t.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True         # fixed shapes: let cuDNN pick its fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    is_main = dist.rank() == 0  # only rank 0 writes files

    if t.get("sync_bn"):  # batch-norm statistics over the global batch, not each rank's rows
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    layout = torch.contiguous_format
    if fast.channels_last(t.channels_last, device, data.points):
        layout = torch.channels_last
    model.to(device, memory_format=layout).train()
    phases = dict.fromkeys(model.phases)  # each phase once, in order: one optimizer each
    optimizers = {p: make_optimizer(p, model.phase_parameters(p)) for p in phases}
    # fp16 needs loss scaling (Micikevicius et al. 2018); bf16 has fp32's exponent range and does not.
    scalers = {p: torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16) for p in phases}
    # A phase that runs several times per step (D with d_steps > 1) reads a fresh real batch each time:
    # its r-th run in step s reads batch s * draws + r. Its logged numbers are the mean over its runs.
    draws = max(model.phases.count(p) for p in phases)
    after_step = getattr(model, "after_step", None)
    step, seconds, sums, counts, logged_at, best = 0, 0.0, {}, {}, 0, None
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise GentrainError("the checkpoint's weights do not fit the model its config describes") from None
        for p in phases:
            optimizers[p].load_state_dict(ckpt["optim"][p])
            for group in optimizers[p].param_groups:  # hyperparameters follow the config (optim.lr=... on resume)
                group.update(optimizers[p].defaults)
            scalers[p].load_state_dict(ckpt["scaler"][p])
        step, seconds = ckpt["step"], ckpt["seconds"]
        sums = {k: v.to(device) for k, v in ckpt["log"]["sums"].items()}
        logged_at = ckpt["log"]["logged_at"]
        counts = ckpt["log"].get("counts", {k: step - logged_at for k in sums})  # older runs: one per step
        best = ckpt.get("best")
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:  # the training GPU's state; all ranks share it
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
    dist.broadcast_(model)
    if t.compile:
        fast.compile_networks(model)

    d = cfg.dataset
    batches = Batches(data, t.batch_size, cfg.seed, device, on_device_setting(d), d.get("hflip", False),
                      d.get("workers", 4))
    # One fixed noise batch for every sample grid, so grids over training show the same latents
    # (a conditional model's grid has one class per row).
    fixed_z, fixed_y, nrow = grid_codes(model, t.n_samples, torch.Generator().manual_seed(cfg.seed))
    fixed = (fixed_z.to(device),) if fixed_y is None else (fixed_z.to(device), fixed_y.to(device))
    reference = data.images[:t.n_samples] if data.points else None  # toy data: samples over real points
    ckpt_dir, sample_dir = run_dir / "checkpoints", run_dir / "samples"
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        sample_dir.mkdir(parents=True, exist_ok=True)
        if step == 0:
            save_grid(reference if data.points else batches(0)[0][:t.n_samples], run_dir / "reals.png")
        _truncate_metrics(run_dir / "metrics.jsonl", logged_at, step)

    # The first step whose loss was not finite, kept on the device: checking it costs a host sync,
    # so it is read only where the loop syncs anyway (log, sample and checkpoint steps).
    bad_step = torch.tensor(-1, device=device)

    def check_finite(done: int) -> None:
        bad = int(dist.maximum(bad_step))  # every rank sees the same answer
        if bad >= 0:
            last = ckpt_dir / "last.pt"
            kept = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was written"
            stop_all(GentrainError(f"loss became NaN/inf at step {bad + 1}; stopped at step {done} without saving "
                                f"({kept}); lower optim.lr or use trainer.precision=fp32"))

    def write_metrics(record: dict) -> None:
        if is_main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def write_checkpoint(done: int, keep: bool, path: Path | None = None, preempted: bool = False) -> None:
        if not is_main:
            return
        state = {
            "family": cfg.model.family,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "data": {"channels": data.channels, "image_size": data.image_size, "num_classes": data.num_classes},
            "step": done,
            "seconds": seconds + time.perf_counter() - t0,
            "model": model.state_dict(),
            "optim": {p: o.state_dict() for p, o in optimizers.items()},
            "scaler": {p: s.state_dict() for p, s in scalers.items()},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []},
            "log": {"sums": {k: v.cpu() for k, v in sums.items()}, "counts": counts, "logged_at": logged_at},
            "best": best,
            "preempted": preempted,  # stopped by a scheduler's signal: a requeued job resumes by itself
        }
        if path is not None:
            checkpoint.save(state, path)
        else:
            checkpoint.save(state, ckpt_dir / "last.pt", also=ckpt_dir / f"step_{done:07d}.pt" if keep else None)

    def train_step(inputs: list[tuple], step: int | torch.Tensor) -> list[tuple]:
        """One training step: every phase run on its batch with its own optimizer; each run's detached
        loss and logged numbers."""
        out = []
        for phase, (x, y) in zip(model.phases, inputs):
            # Only this phase's parameters collect gradients (G's step does not fill D's .grad).
            model.requires_grad_(False)
            for p in model.phase_parameters(phase):
                p.requires_grad_(True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                                cache_enabled=not t.cuda_graphs):  # a graph cannot hold autocast's weight cache
                loss, stats = model.loss(phase, x, y, step)
            optimizers[phase].zero_grad(set_to_none=True)
            scalers[phase].scale(loss).backward()
            dist.average_gradients(model.phase_parameters(phase))
            scalers[phase].step(optimizers[phase])
            scalers[phase].update()
            if after_step is not None:
                after_step(phase, step)
            out.append((loss.detach(), stats))
        return out

    graph = fast.StepGraph(train_step, device) if t.cuda_graphs else None
    t0 = tick = time.perf_counter()
    tick_step, shown = step, {}  # shown: the progress bar's latest numbers
    bar = tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True, disable=None if is_main else True)
    with _StopOnSignal() as stop, logging_redirect_tqdm():
        what = f"{len(data)} points" if data.points else f"{len(data)} images, {data.image_size}x{data.image_size}"
        where = f"{dist.world_size()} processes ({device.type}, global batch {t.batch_size})" \
            if dist.world_size() > 1 else device
        how = [str(amp_dtype) if amp_dtype else "", "channels_last" if layout is torch.channels_last else "",
               "torch.compile" if t.compile else "", "CUDA graphs" if graph else ""]
        log.info("training %s on %s (%s, %s) on %s%s, from step %d to %d, run folder %s", cfg.model.family,
                 cfg.dataset.name, what, batches.where, where, "".join(f" with {h}" for h in how if h), step,
                 t.steps, run_dir)
        while step < t.steps:
            # A phase that runs r times per step reads batches step * draws + 0 .. r - 1.
            runs, inputs = dict.fromkeys(phases, 0), []
            for phase in model.phases:
                x, y = batches(step * draws + runs[phase])
                inputs.append((x.contiguous(memory_format=layout) if x.ndim == 4 else x, y))
                runs[phase] += 1
            # (A CUDA graph's outputs are overwritten by its next replay: the sums are new tensors.)
            for loss, stats in (graph or train_step)(inputs, step):
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
                for k, v in stats.items():  # a number's mean over the runs that reported it (R1 is lazy)
                    sums[k] = sums[k] + v.float() if k in sums else v.float().clone()
                    counts[k] = counts.get(k, 0) + 1
            step += 1
            bar.update(1)
            # trainer.max_minutes: the run ends here, as at its last step, once its training time is up
            # (across resumes), so runs can be compared at equal wall time or fit a job's time limit.
            # Under torchrun every rank stops at the same step: on a signal any rank has had, and when
            # rank 0's clock (the one that leaves out evaluation) runs out.
            stopping, timed_out = dist.agree(
                stop.requested, t.max_minutes is not None and seconds + time.perf_counter() - t0 >= 60 * t.max_minutes)
            last = step == t.steps or timed_out
            if last or stopping or any(every and step % every == 0 for every in
                                       (t.log_every, t.sample_every, t.ckpt_every, t.eval_every)):
                check_finite(step)  # nothing is logged, drawn or saved from a model that has diverged

            if step % t.log_every == 0 or last:
                totals = dist.mean(torch.stack(list(sums.values()))).tolist()  # one host sync for all of them
                values = {k: total / counts[k] for k, total in zip(sums, totals)}
                now = time.perf_counter()
                images = (step - tick_step) * t.batch_size * draws  # real images consumed
                record = {"step": step, **values, "img_per_s": images / (now - tick),
                          "seconds": seconds + now - t0}
                write_metrics(record)
                shown |= {k: f"{v:.3g}" for k, v in values.items()} | {"img/s": f"{record['img_per_s']:.0f}"}
                bar.set_postfix(shown)
                log.info("step %d/%d  %s  %.0f img/s", step, t.steps,
                         "  ".join(f"{k} {v:.4g}" for k, v in values.items()), record["img_per_s"])
                if step % t.log_every == 0:  # a run's last, off-grid line leaves the interval open for a resume
                    sums, counts, logged_at, tick, tick_step = {}, {}, step, now, step

            if is_main and (step % t.sample_every == 0 or last):
                model.eval()
                with torch.no_grad():
                    save_grid(model.sample(*fixed), sample_dir / f"step_{step:07d}.png", nrow, reference)
                model.train()

            if evaluate is not None and (step % t.eval_every == 0 or last):
                started = time.perf_counter()
                model.eval()
                scored = evaluate(model)
                model.train()
                took = time.perf_counter() - started
                t0, tick = t0 + took, tick + took  # evaluation time is neither training time nor throughput
                write_metrics({"step": step, **{f"eval/{k}": v for k, v in scored.items()}, "eval/seconds": took})
                log.info("eval at step %d  %s", step, "  ".join(f"{k} {v:.4g}" for k, v in scored.items()))
                shown |= {k.split("@")[0]: f"{v:.3g}" for k, v in scored.items() if "_" not in k}
                bar.set_postfix(shown)
                name, lower = best_by
                value = scored[name]
                if best is None or (value < best["value"] if lower else value > best["value"]):
                    best = {"metric": name, "value": value, "step": step}
                    write_checkpoint(step, keep=False, path=ckpt_dir / "best.pt")
                    log.info("new best %s %.4g: %s", name, value, ckpt_dir / "best.pt")

            if step % t.ckpt_every == 0 or last:
                write_checkpoint(step, keep=step % t.ckpt_every == 0)

            if stopping:
                write_checkpoint(step, keep=False, preempted=stop.preempted)
                dist.barrier()  # rank 0's checkpoint is on disk before any rank leaves
                stop.hand_over()  # a preempted job under submitit: its handler requeues the job and exits
                how = (f"stopped by {signal.Signals(stop.signum).name} (preemption) at step {step}; the job's "
                       f"next start resumes it" if stop.preempted else f"interrupted at step {step}")
                stop_all(Interrupted(f"{how}; checkpoint written to {ckpt_dir / 'last.pt'}; "
                                     f"continue with: gentrain resume={run_dir}"))
            if timed_out:
                log.info("trainer.max_minutes=%g reached at step %d; continue with: gentrain resume=%s "
                         "trainer.max_minutes=MORE", t.max_minutes, step, run_dir)
                break
    bar.close()
    log.info("done: %d steps; checkpoint %s, samples in %s", step, ckpt_dir / "last.pt", sample_dir)


def stop_all(error: GentrainError) -> None:
    """An outcome every rank reached at the same step: rank 0 reports it, the other ranks leave quietly."""
    dist.barrier()
    if dist.rank() != 0:
        sys.exit(error.exit_code)
    raise error


def _truncate_metrics(path: Path, logged_at: int, step: int) -> None:
    """A resumed run logs again from the checkpoint's last full log interval, and evaluates again after
    the checkpoint's step: drop the lines it will write again."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    records = [json.loads(ln) if ln.strip() else None for ln in lines]
    kept = [ln for ln, r in zip(lines, records)
            if r is not None and r["step"] <= (step if any(k.startswith("eval/") for k in r) else logged_at)]
    if len(kept) != len(lines):
        path.write_text("".join(kept))
