"""The training loop shared by every model family.

It owns autocast, optimizer steps, logging, sample grids and checkpoints. It is handed built parts (the
model on its device, the batches, one optimizer per parameter set, the evaluator) and the `trainer` config,
and knows nothing about the family but its contract (models/family.py): each step it runs the family's
phases that fall on it, each a loss minimised by that phase's optimizer, then calls the family's
after_step. Under torchrun each rank runs this same loop on its rows of every batch, with gradients
averaged before each optimizer step (gentrain.dist).
"""

import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gentrain import checkpoint, dist, fast, files
from gentrain.errors import GentrainError, Interrupted
from gentrain.images import save_grid
from gentrain.models import grid_codes

log = logging.getLogger("gentrain")


def train(model, batches, optimizers: dict, t, run_dir: Path, *, device: torch.device, amp: torch.dtype | None,
          speed: fast.FastPath, meta: dict, seed: int, what: str,
          schedulers: dict | None = None, resume: checkpoint.Checkpoint | None = None, evaluate=None, best_by: tuple[str, bool] | None = None, reference: torch.Tensor | None = None, loggers=(),
          start=None) -> None:
    """Train `model` (on `device`, in train mode) for t.steps steps of `batches`, writing everything into
    run_dir; `resume` continues a checkpoint. `meta` goes into every checkpoint, `what` names the run in
    its first log line; `schedulers` (by optimizer) set the learning rates, stepped after every step;
    `amp` is the autocast dtype (None: fp32), `speed` the fast path (fast.plan);
    `loggers` get what metrics.jsonl gets. `start() -> loggers`, if given, is called once the checkpoint is
    restored and before the loop writes anything: the command's own changes to the run folder, made only
    after its last check; the loggers it returns join `loggers`.

    `evaluate(model) -> {name: score}` runs every t.eval_every steps; the checkpoint with the best score
    `best_by = (name, lower_is_better)` so far is kept as checkpoints/best.pt. Toy data's samples are
    drawn over the `reference` points. Under torchrun only rank 0 writes files and evaluates.
    """
    # Setup: restore the state of a resumed run, then the step, the fixed noise of the sample grids.
    scalers = {o: torch.amp.GradScaler(device.type, enabled=amp is torch.float16) for o in optimizers}
    schedulers = schedulers or {}
    step, seconds, best, meter = 0, 0.0, None, Meter(device)
    if resume is not None:
        state = checkpoint.restore(resume, model, optimizers, scalers, schedulers, device)
        step, seconds, best = state.step, state.seconds, state.best
        meter.load_state_dict(state.log, step, device)
    dist.broadcast_(model)
    if speed.compile:
        fast.compile_networks(model, speed.compile_options)
    run_step = stepper(model, optimizers, scalers, speed)
    draws = draws_per_step(model)
    # One fixed noise batch for every sample grid, so grids over training show the same latents.
    grid = SampleGrid(model, t.n_samples, seed, device, reference)
    # Every check has passed: from here on the run folder changes.
    loggers = [*loggers, *(start() if start is not None else [])]
    report = Report(run_dir, t, step, loggers, images_per_step=t.batch_size * draws)
    report.start(step, meter.logged_at, lambda: reference if reference is not None else batches(0)[0][:t.n_samples],
                 grid)
    clock = Clock(seconds, step)

    def save(done: int, path: Path, also: Path | None = None, preempted: bool = False) -> None:
        # A step whose loss was finite can still leave NaN weights (its update diverged): never save those,
        # on any rank (every rank holds the same weights, so all of them stop here together).
        bad = checkpoint.nonfinite(model.state_dict())
        if bad:
            kept = f"last good checkpoint: {report.last}" if report.last.exists() else "no checkpoint was written"
            stop_all(GentrainError(f"the weights of {', '.join(bad)} became NaN/inf by step {done}; stopped "
                                   f"without saving ({kept}); lower optim.lr or use trainer.precision=fp32"))
        if report.writes:
            checkpoint.save(checkpoint.training_state(meta, done, clock.training(), model, optimizers, scalers,
                                                      schedulers, device, meter.state_dict(), best, preempted), path, also)

    with _StopOnSignal() as stop, logging_redirect_tqdm():
        how = speed.describe()
        uncaptured = f" (not captured as a CUDA graph: {speed.uncaptured})" if speed.uncaptured else ""
        log.info("training %s on %s%s, from step %d to %d, run folder %s%s", what, _where(device, t.batch_size),
                 "".join(f" with {h}" for h in how), step, t.steps, run_dir, uncaptured)
        while step < t.steps:
            # Train: every phase that falls on this step, each on its own batch.
            meter.add(step, run_step(*due(model, batches, step, draws), step))
            step += 1
            report.bar.update(1)
            # Agree on stopping: trainer.max_minutes ends the run as its last step would, once its training
            # time is up (across resumes); a signal stops it after a checkpoint. Under torchrun every rank
            # stops at the same step: on a signal any rank has had, and when rank 0's clock runs out.
            stopping, timed_out = dist.agree(
                stop.requested, t.max_minutes is not None and clock.training() >= 60 * t.max_minutes)
            last = step == t.steps or timed_out
            if last or stopping or any(every and step % every == 0 for every in
                                       (t.log_every, t.sample_every, t.ckpt_every, t.eval_every)):
                _check_finite(meter.bad_step(), step, report.last)  # nothing is logged, drawn or saved from a diverged model

            # Log: the interval's mean of every number (one host sync for all of them) and the throughput.
            if step % t.log_every == 0 or last:
                lrs = {f"lr/{o}": float(opt.param_groups[0]["lr"]) for o, opt in optimizers.items()}
                report.log(step, meter.means(), clock.rate(step, t.batch_size * draws), clock.training(), lrs)
                if step % t.log_every == 0:  # a run's last, off-grid line leaves the interval open for a resume
                    meter.reset(step)
                    clock.tick(step)
            for scheduler in schedulers.values():  # after the log line, which shows the rate this step had
                scheduler.step()
            if step % t.sample_every == 0 or last:
                report.grid(grid, step)

            # Evaluate (neither training time nor throughput), and keep the best checkpoint.
            if evaluate is not None and (step % t.eval_every == 0 or last):
                with clock.paused(), _eval_mode(model):
                    scored = evaluate(model)
                report.evaluation(step, scored, clock.paused_for)
                name, lower = best_by
                if best is None or (scored[name] < best["value"] if lower else scored[name] > best["value"]):
                    best = {"metric": name, "value": scored[name], "step": step}
                    save(step, report.checkpoints / "best.pt")
                    log.info("new best %s %.4g: %s", name, scored[name], report.checkpoints / "best.pt")

            # Checkpoint (keeping a numbered copy every keep_every steps), and stop where asked to.
            if step % t.ckpt_every == 0 or last:
                keep = t.get("keep_every", t.ckpt_every)
                save(step, report.last, report.checkpoints / f"step_{step:07d}.pt" if keep and step % keep == 0 else None)
            if stopping:
                save(step, report.last, preempted=stop.preempted)
                dist.barrier()  # rank 0's checkpoint is on disk before any rank leaves
                stop.hand_over()  # a preempted job under submitit: its handler requeues the job and exits
                name = signal.Signals(stop.signum).name
                how = (f"stopped by {name} (preemption) at step {step}; the job's next start resumes it"
                       if stop.preempted else f"interrupted at step {step}" if stop.signum == signal.SIGINT
                       else f"stopped by {name} at step {step}")
                stop_all(Interrupted(f"{how}; checkpoint written to {report.last}; "
                                     f"continue with: gentrain resume={run_dir}", stop.signum))
            if timed_out:
                log.info("trainer.max_minutes=%g reached at step %d; continue with: gentrain resume=%s "
                         "trainer.max_minutes=MORE", t.max_minutes, step, run_dir)
                break
    report.done(step, clock, best)


def draws_per_step(model) -> int:
    """Batches a step reads per phase name at most: a phase that runs r times in a step (a GAN's d_steps) reads a
    fresh batch each time, batches step * draws + 0 .. r - 1."""
    return max(sum(p.name == q.name for q in model.phases) for p in model.phases)


def due(model, batches, step: int, draws: int) -> tuple[tuple, list]:
    """The phases that fall on `step` (a lazy phase every `every` steps) and each run's batch."""
    phases = tuple(p for p in model.phases if step % p.every == 0)
    runs = [sum(q.name == p.name for q in phases[:i]) for i, p in enumerate(phases)]
    return phases, [batches(step * draws + r) for r in runs]


def stepper(model, optimizers: dict, scalers: dict, speed: fast.FastPath):
    """What runs a training step: `step(phases, inputs, step)`, the eager Step, or under trainer.cuda_graphs
    its captured graphs, each checked against the eager step at its first replay (fast.StepGraphs)."""
    step = Step(model, optimizers, scalers, speed.device, speed.amp, cache=not speed.cuda_graphs)
    if not speed.cuda_graphs:
        return step
    capture = fast.CAPTURE[speed.device.type](speed.device)
    return fast.StepGraphs(step, fast.StepState(model, optimizers, capture), capture, speed.amp, strict=speed.strict)


class Step:
    """The phases of one training step, each on its batch: its loss under autocast, backward, the gradients
    averaged over ranks, its optimizer's step, and the family's after_step. Returns each run's detached
    loss and logged numbers. What a phase hands a later one (the fakes a GAN's G phase reuses) goes in the
    step's `carry`, made empty each step, so between steps the state is the networks, optimizers and RNG
    alone (fast.StepState)."""

    def __init__(self, model, optimizers: dict, scalers: dict, device: torch.device, amp: torch.dtype | None,
                 cache: bool = True):
        self.model, self.optimizers, self.scalers, self.device, self.amp = model, optimizers, scalers, device, amp
        self.cache = cache  # autocast's weight cache; a CUDA graph cannot hold it
        self.params = {o: list(model.phase_parameters(o)) for o in optimizers}
        self.training = None  # the optimizers whose parameters collect gradients now

    def __call__(self, phases, inputs: list[tuple], step: int | torch.Tensor) -> list[tuple]:
        out, carry = [], {}
        for phase, (x, y) in zip(phases, inputs):
            self.train_only((phase.opt, *phase.records))
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None,
                                cache_enabled=self.cache):
                loss, stats = self.model.loss(phase.name, x, y, step, carry)
            optimizer, scaler = self.optimizers[phase.opt], self.scalers[phase.opt]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            dist.average_gradients(self.params[phase.opt])
            scaler.step(optimizer)
            scaler.update()
            self.model.after_step(phase.name, step)
            out.append((loss.detach(), stats))
        return out

    def train_only(self, opts: tuple[str, ...]) -> None:
        """Only these optimizers' parameters collect gradients or record graphs (G's step does not fill D's
        .grad, nor compute it), switched when the set changes from the phase before, not every phase."""
        if opts == self.training:
            return
        if self.training is None:
            self.model.requires_grad_(False)
        else:
            for o in self.training:
                for p in self.params[o]:
                    p.requires_grad_(False)
        for o in opts:
            for p in self.params[o]:
                p.requires_grad_(True)
        self.training = opts


class Meter:
    """Sums of the numbers the steps log, kept on the device until a log step reads them all at once; each
    number's mean is over the runs that reported it (a lazy penalty reports every few steps). It also
    keeps the first step whose loss was not finite, on the device, read where the loop syncs anyway.

    A step costs a fixed handful of kernels, however many numbers it logs: its losses and numbers are
    stacked into one vector, added to the sum of the steps with the same numbers, and checked at once."""

    NEVER = 2 ** 62  # first_bad before any step went wrong

    def __init__(self, device: torch.device | None = None):
        self.sums, self.counts, self.logged_at = {}, {}, 0
        self.first_bad = torch.tensor(self.NEVER, device=device)

    def add(self, step: int | torch.Tensor, runs: list[tuple[torch.Tensor, dict]]) -> None:
        keys = tuple(k for _, stats in runs for k in stats)
        # One new vector: a CUDA graph's outputs are overwritten by its next replay.
        values = torch.stack([loss for loss, _ in runs] + [v for _, stats in runs for v in stats.values()]).float()
        ok = torch.isfinite(values[:len(runs)].sum())  # NaN and inf survive the sum
        self.first_bad = torch.minimum(self.first_bad, torch.where(ok, self.NEVER, step))
        numbers = values[len(runs):]
        self.sums[keys] = self.sums[keys] + numbers if keys in self.sums else numbers
        for k in keys:
            self.counts[k] = self.counts.get(k, 0) + 1

    def bad_step(self) -> int | None:
        """The first step whose loss was not finite (the same on every rank), or None; a host sync."""
        bad = int(dist.minimum(self.first_bad))
        return None if bad == self.NEVER else bad

    def totals(self) -> dict[str, torch.Tensor]:
        out = {}
        for keys, vector in self.sums.items():
            for k, v in zip(keys, vector):
                out[k] = out[k] + v if k in out else v
        return out

    def means(self) -> dict[str, float]:
        totals = self.totals()
        values = dist.mean(torch.stack(list(totals.values()))).tolist()  # one host sync for all of them
        return {k: total / self.counts[k] for k, total in zip(totals, values)}

    def reset(self, step: int) -> None:
        self.sums, self.counts, self.logged_at = {}, {}, step

    def state_dict(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self.totals().items()}, "counts": self.counts,
                "logged_at": self.logged_at}

    def load_state_dict(self, state: dict, step: int, device: torch.device) -> None:
        sums = state["sums"]
        self.sums = {tuple(sums): torch.stack([v.float() for v in sums.values()]).to(device)} if sums else {}
        self.logged_at = state["logged_at"]
        # runs from before the counts were kept logged one number per step
        self.counts = state.get("counts", {k: step - self.logged_at for k in sums})


class Clock:
    """Training time across resumes, without evaluation, and images per second between log steps."""

    def __init__(self, seconds: float, step: int):
        self.before, self.t0 = seconds, time.perf_counter()
        self.tick_time, self.tick_step, self.paused_for = self.t0, step, 0.0

    def training(self) -> float:
        return self.before + time.perf_counter() - self.t0

    def rate(self, step: int, images_per_step: int) -> float:
        return (step - self.tick_step) * images_per_step / (time.perf_counter() - self.tick_time)

    def tick(self, step: int) -> None:
        self.tick_time, self.tick_step = time.perf_counter(), step

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside counts neither as training time nor in the throughput (evaluation)."""
        started = time.perf_counter()
        yield
        self.paused_for = time.perf_counter() - started
        self.t0 += self.paused_for
        self.tick_time += self.paused_for


class SampleGrid:
    """One fixed noise batch (and classes: a conditional model's grid has one class per row) for every sample
    grid, so grids over training show the same latents; toy data's samples are drawn over real points."""

    def __init__(self, model, n: int, seed: int, device: torch.device, reference: torch.Tensor | None):
        z, y, self.nrow = grid_codes(model, n, torch.Generator().manual_seed(seed))
        self.codes = (z.to(device),) if y is None else (z.to(device), y.to(device))
        self.model, self.reference = model, reference

    @torch.no_grad()
    def save(self, path: Path) -> None:
        with _eval_mode(self.model):
            save_grid(self.model.sample(*self.codes), path, self.nrow, self.reference)


class Report:
    """What a run tells, and where: metrics.jsonl, the log, the progress bar, the sample grids, reals.png and
    checkpoints/ in its folder, and the loggers (TensorBoard, W&B). Only rank 0 writes."""

    def __init__(self, run_dir: Path, t, step: int, loggers=(), images_per_step: int = 0):
        self.dir, self.writes, self.t, self.loggers = run_dir, dist.rank() == 0, t, list(loggers)
        self.images_per_step = images_per_step
        self.checkpoints, self.samples = run_dir / "checkpoints", run_dir / "samples"
        self.last, self.metrics = self.checkpoints / "last.pt", run_dir / "metrics.jsonl"
        self.first, self.final, self.shown = step, {}, {}  # shown: the progress bar's latest numbers
        self.bar = tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True,
                        disable=None if self.writes else True)

    def start(self, step: int, logged_at: int, reals, grid: SampleGrid) -> None:
        """The run's folders, with stale temporary files gone; for a new run the real images and a grid at
        step 0; for a resumed one, metrics.jsonl trimmed to what the checkpoint has seen."""
        if not self.writes:
            return
        for folder in (self.dir, files.make_dir(self.checkpoints), files.make_dir(self.samples)):
            for stale in files.remove_stale_temps(folder):  # writes a killed run left unfinished
                log.info("removed %s, left by a write that was stopped midway", stale)
        if step == 0:
            save_grid(reals(), self.dir / "reals.png")
            self.grid(grid, 0)
        self._truncate_metrics(logged_at, step)

    def log(self, step: int, values: dict, images_per_s: float, seconds: float, extra: dict) -> None:
        record = {"step": step, **values, "img_per_s": images_per_s, "seconds": seconds}
        self.write(record, extra)
        self.final |= values
        self.shown |= {k: f"{v:.3g}" for k, v in values.items()} | {"img/s": f"{images_per_s:.0f}"}
        self.bar.set_postfix(self.shown)
        log.info("step %d/%d  %s  %.0f img/s", step, self.t.steps,
                 "  ".join(f"{k} {v:.4g}" for k, v in values.items()), images_per_s)

    def evaluation(self, step: int, scored: dict, took: float) -> None:
        self.write({"step": step, **{f"eval/{k}": v for k, v in scored.items()}, "eval/seconds": took})
        log.info("eval at step %d  %s", step, "  ".join(f"{k} {v:.4g}" for k, v in scored.items()))
        self.shown |= {k.split("@")[0]: f"{v:.3g}" for k, v in scored.items() if "_" not in k}
        self.bar.set_postfix(self.shown)

    def grid(self, grid: SampleGrid, step: int) -> None:
        if self.writes:
            path = self.samples / f"step_{step:07d}.png"
            grid.save(path)
            for logger in self.loggers:
                logger.image(step, path)

    def write(self, record: dict, extra: dict | None = None) -> None:
        if self.writes:
            files.append_line(self.metrics, json.dumps(record))
            numbers = {k: v for k, v in record.items() if k != "step"} | (extra or {})
            for logger in self.loggers:
                logger.scalars(record["step"], numbers)

    def done(self, step: int, clock: "Clock", best: dict | None) -> None:
        """The run's summary: steps, training time and mean throughput, the last grid, the checkpoint, the
        best evaluation; the loggers close with the final numbers."""
        self.bar.close()
        if not self.writes:
            return
        grids = sorted(self.samples.glob("step_*.png"))
        took = clock.training() - clock.before
        per_s = (step - self.first) * self.images_per_step / took if took > 0 else 0.0
        best_text = f"; best {best['metric']} {best['value']:.4g} at step {best['step']} ({self.checkpoints / 'best.pt'})" \
            if best else ""
        log.info("done: %d steps, %s of training (%s steps this run, %.0f img/s on average); last grid %s; "
                 "checkpoint %s%s", step, _duration(clock.training()), step - self.first, per_s,
                 grids[-1] if grids else "-", self.last, best_text)
        for logger in self.loggers:
            logger.close(self.final | ({f"best_{best['metric']}": best["value"]} if best else {}))

    def _truncate_metrics(self, logged_at: int, step: int) -> None:
        """A resumed run logs again from the checkpoint's last full log interval, and evaluates again after
        the checkpoint's step: drop the lines it will write again, and any line that a killed write or a
        full disk left unreadable (saying how many)."""
        if not self.metrics.exists():
            return
        lines = self.metrics.read_text(errors="replace").splitlines(keepends=True)
        records = [read_record(ln) for ln in lines]
        damaged = sum(r is None and bool(ln.strip()) for ln, r in zip(lines, records))
        if damaged:
            log.warning("note: dropped %d unreadable line(s) of %s (a write cut short)", damaged, self.metrics)
        kept = [ln if ln.endswith("\n") else ln + "\n" for ln, r in zip(lines, records)
                if r is not None and r["step"] <= (step if any(k.startswith("eval/") for k in r) else logged_at)]
        if kept != lines:
            files.write_text(self.metrics, "".join(kept))


@contextlib.contextmanager
def _eval_mode(model):
    model.eval()
    try:
        yield
    finally:
        model.train()


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60} h {m % 60} min" if m >= 60 else f"{m} min {s} s" if m else f"{s} s"


def read_record(line: str) -> dict | None:
    """A metrics.jsonl line as its record, or None where it is not one (blank, cut short, garbage)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _where(device: torch.device, batch_size: int) -> str:
    if dist.world_size() > 1:
        return f"{dist.world_size()} processes ({device.type}, global batch {batch_size})"
    return str(device)


def _check_finite(bad: int | None, done: int, last: Path) -> None:
    if bad is not None:
        kept = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was written"
        stop_all(GentrainError(f"loss became NaN/inf at step {bad + 1}; stopped at step {done} without saving "
                               f"({kept}); lower optim.lr or use trainer.precision=fp32"))


def stop_all(error: GentrainError) -> None:
    """An outcome every rank reached at the same step: rank 0 reports it, the other ranks leave quietly."""
    dist.barrier()
    if dist.rank() != 0:
        sys.exit(error.exit_code)
    raise error


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
