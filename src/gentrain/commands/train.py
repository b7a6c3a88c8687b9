"""`gentrain [overrides]`: build the parts a run needs from its config, then hand them to the loop."""

import contextlib
import functools
import inspect
import logging
import os
import shutil
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gentrain import checkpoint, data, dist, fast, files, loggers, loop, models
from gentrain.config import GROUPS, check_train, config_dir
from gentrain.device import pick_device
from gentrain.errors import GentrainError, quote, reported
from gentrain.metrics import SCORES
from gentrain.metrics.evaluator import Evaluator

log = logging.getLogger("gentrain")


def resumed_config(cfg: DictConfig, ckpt: checkpoint.Checkpoint) -> DictConfig:
    """The checkpoint's own config, with the key overrides given on this command line on top. The command
    line the run was started with may be given again: a group choice equal to the run's own is accepted,
    only a different one is refused (and a different optim.scheduler key: the schedule's state is saved)."""
    merged, stored = ckpt.config, ckpt.choices
    scheduled = OmegaConf.select(merged, "optim.scheduler") is not None
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key in ("resume", "rollback") or key.startswith("hydra."):
            continue
        if key in GROUPS:
            was = stored.get(key)
            if str(value) != str(was) and not (value in ("null", "") and was in (None, "null")):
                raise GentrainError(f"{key}={value} cannot change when resuming: {ckpt.path} was trained with "
                                    f"{key}={was}; a resumed run keeps its config groups (drop {key}= or give "
                                    f"{key}={was}), while key overrides such as trainer.steps=N apply on top")
            continue
        if (key == "optim.scheduler" or key.startswith("optim.scheduler.") or (scheduled and key.startswith("optim.lr"))) \
                and OmegaConf.select(cfg, key) != OmegaConf.select(merged, key):
            # The schedule's state (its step, base learning rates, horizon) is saved with the run.
            raise GentrainError(f"{key} cannot change when resuming a run with a learning-rate schedule "
                                f"({ckpt.path} has {key}={OmegaConf.select(merged, key)})")
        OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True)
    merged.resume, merged.rollback = cfg.resume, cfg.get("rollback", False)
    return with_defaults(merged, cfg)


def with_defaults(merged: DictConfig, cfg: DictConfig) -> DictConfig:
    """A run from before a config node or key existed takes today's defaults for it."""
    for key in ("metrics", "rollback"):
        if key not in merged:
            merged[key] = cfg[key]
    for key, value in cfg.trainer.items():
        if key not in merged.trainer:
            merged.trainer[key] = value
    return merged


def optimizer_factory(optim_cfg: DictConfig, device: torch.device, fused: bool = False, capturable: bool = False):
    """make_optimizer(name, params, ratio=1): one optimizer per parameter set from the `optim` partial. A
    key optim.lr_<name> (lr_D, lr_G) gives that optimizer its own learning rate: the two time-scale
    update rule (TTUR, Heusel et al. 2017, Sec. 2), e.g. lr_D=4e-4 lr_G=1e-4 as in SAGAN (Zhang et al. 2019).

    `ratio` < 1 scales the learning rate by it and Adam's betas to its power, as StyleGAN2-ADA does for an
    optimizer that lazy regularisation steps more often (see lazy_ratio).

    With `fused` (fast.plan: on a GPU), an optimizer that has torch's fused kernel (Adam, AdamW, SGD) uses it,
    one launch for all of a set's parameters, unless optim.fused says otherwise; `capturable` (trainer.cuda_graphs) keeps
    its state on the device, as a captured step needs. With a learning-rate schedule a captured step reads
    the learning rate from a device tensor, which the scheduler fills in place (a float would be baked
    into the graph)."""
    cfg = OmegaConf.to_container(optim_cfg, resolve=True)
    scheduled = cfg.pop("scheduler", None) is not None  # scheduler_factory's
    per_phase = {k[len("lr_"):]: cfg.pop(k) for k in list(cfg) if k.startswith("lr_")}
    if isinstance(cfg.get("betas"), list) and all(isinstance(b, (int, float)) for b in cfg["betas"]):
        cfg["betas"] = [float(b) for b in cfg["betas"]]  # betas=[0,0.99]: torch wants floats, 0 is an int
    make = instantiate(cfg, _convert_="all")
    accepts = inspect.signature(make.func).parameters
    if fused and "fused" in accepts and "fused" not in cfg:
        make = functools.partial(make, fused=True)
    if capturable and "capturable" in accepts:
        make = functools.partial(make, capturable=True)

    def make_optimizer(name: str, params, ratio: float = 1.0):
        kwargs = {} if per_phase.get(name) is None else {"lr": per_phase[name]}
        if ratio != 1:
            kwargs["lr"] = kwargs.get("lr", cfg["lr"]) * ratio
            if "betas" in cfg:
                kwargs["betas"] = tuple(b ** ratio for b in cfg["betas"])
        if capturable and scheduled:
            kwargs["lr"] = torch.tensor(float(kwargs.get("lr", cfg["lr"])), device=device)
        return make(params, **kwargs)

    return make_optimizer


def scheduler_factory(schedule: DictConfig | None):
    """make_scheduler(optimizer) from optim.scheduler (optim/scheduler=linear|cosine), a
    torch.optim.lr_scheduler partial that the loop steps once per training step; None: a constant
    learning rate."""
    return None if schedule is None else instantiate(schedule, _convert_="all")


def choices(ckpt: checkpoint.Checkpoint | None) -> dict | None:
    """The config group choices of the run: a resumed run's own, else this command's (model=gan, ...)."""
    if ckpt is not None:
        return ckpt.choices
    if HydraConfig.initialized():
        return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}
    return None


def lazy_ratio(phases, opt: str) -> float:
    """An optimizer that a lazy phase (one with every > 1) also steps takes more updates per batch than its
    main phases alone: StyleGAN2-ADA scales its learning rate and betas by mb_ratio = k / (k + 1) for one
    main update and a regulariser every k (training/training_loop.py). In general: the main updates per
    step over all updates per step."""
    every = [p.every for p in phases if p.opt == opt]
    return sum(e == 1 for e in every) / sum(1 / e for e in every)


def prepare(cfg: DictConfig) -> tuple[DictConfig, Path, checkpoint.Checkpoint | None, dict | None]:
    """The run this command asks for: its config, its folder, the checkpoint it continues (or None), and
    the run and step it branches from (or None). It only reads and checks: what a start changes in a run
    folder (begin) waits until every check has passed.

    resume= continues a run in its own folder; from an earlier checkpoint than its last, it continues in a
    new folder instead (a branch, recorded in every checkpoint of the new run), unless rollback=true.
    A run folder that holds a checkpoint is continued only when asked (resume=), or when the same job
    starts again after its scheduler stopped it: its last checkpoint was written on a preemption signal,
    or SLURM requeued it (SLURM_RESTART_COUNT). Then the job keeps the config it was started with. A
    folder whose run stopped before its first checkpoint is started again.
    """
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ckpt = branched_from = None
    last = run_dir / "checkpoints" / "last.pt"
    if cfg.resume:
        path = checkpoint.resolve(cfg.resume)
        ckpt = checkpoint.load(path)
        cfg = resumed_config(cfg, ckpt)
        home = checkpoint.run_dir_of(path)
        if checkpoint.branches(path, cfg.rollback):
            branched_from = {"run": str(home.resolve()), "checkpoint": str(path.resolve()), "step": ckpt.step}
            log.warning("note: %s is at step %d and its last checkpoint at step %d: continuing in a new run "
                        "folder, %s, to keep its later work (rollback=true continues in %s instead)", path,
                        ckpt.step, checkpoint.peek_step(home / "checkpoints" / "last.pt"), run_dir, home)
        else:
            run_dir = home
    elif last.exists():
        ckpt = checkpoint.load(last)
        if not (ckpt.preempted or int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0):
            raise GentrainError(f"{run_dir} already holds a run; continue it with resume={run_dir} "
                                f"or pick another hydra.run.dir")
        log.info("%s was stopped by its scheduler at step %d: resuming it", run_dir, ckpt.step)
        cfg = with_defaults(ckpt.config, cfg)
        cfg.resume = str(run_dir)
    elif (run_dir / "metrics.jsonl").exists():
        log.warning("note: %s holds no checkpoint (its run stopped before writing one): starting it again", run_dir)
    check_train(cfg)
    files.check_writable(run_dir, folder=True)
    return cfg, run_dir, ckpt, branched_from


def begin(cfg: DictConfig, run_dir: Path, ckpt: checkpoint.Checkpoint | None, branched_from: dict | None) -> None:
    """What a start changes in the run folders before training, called once every check has passed (the
    config, the device, the data, the folder's lock, the checkpoint loaded into the model: see run): a
    branch's history up to its branch point, or rollback's deletions."""
    if branched_from is not None:
        home = Path(branched_from["run"])
        for name in ("metrics.jsonl", "reals.png"):  # the history up to the branch point (the loop trims it)
            if (home / name).is_file() and not (run_dir / name).exists():
                shutil.copyfile(home / name, run_dir / name)
    elif ckpt is not None and cfg.rollback and checkpoint.run_dir_of(ckpt.path).resolve() == run_dir.resolve():
        roll_back(run_dir, ckpt.step)


def roll_back(run_dir: Path, step: int) -> None:
    """rollback=true: the run continues from `step`, so its later checkpoints and sample grids go (its later
    metrics lines are dropped by the loop)."""
    later = [p for folder, pattern in (("checkpoints", "step_*.pt"), ("samples", "step_*.png"))
             for p in (run_dir / folder).glob(pattern) if int(p.stem.split("_")[1]) > step]
    for p in later:
        p.unlink()
    if later:
        log.warning("note: rolled %s back to step %d (rollback=true): removed %d later checkpoint(s) and grid(s)",
                    run_dir, step, len(later))


def objective(cfg: DictConfig, run_dir: Path) -> float | None:
    """The run's best trainer.eval_metric score, as a Hydra sweeper (Optuna) optimises it; None without
    evaluation."""
    if not cfg.trainer.eval_every or not (run_dir / "metrics.jsonl").exists():
        return None
    lower = SCORES[cfg.trainer.eval_metric][1]
    name = f"eval/{cfg.trainer.eval_metric}"
    records = [loop.read_record(line) for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines()]
    scores = [v for r in records if r for k, v in r.items() if k == name or k.startswith(name + "@")]
    return (min if lower else max)(scores) if scores else None


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
@reported
def main(cfg: DictConfig) -> float | None:
    if not dist.launched():
        cfg, run_dir, ckpt, origin = prepare(cfg)
        if cfg.trainer.devices > 1:  # gentrain trainer.devices=N: torchrun N workers of this same command
            failed = dist.torchrun(cfg.trainer.devices, [*HydraConfig.get().overrides.task,
                                                         f"hydra.run.dir={quote(str(run_dir))}",
                                                         "hydra.output_subdir=null"], run_dir)
            if failed:  # a worker killed or crashed, which could not say so itself
                raise GentrainError(failed)
            return objective(cfg, run_dir)
        device = pick_device(cfg.trainer.device)
    else:  # a torchrun worker: rank 0 decides what to run and every rank follows
        device = dist.init(pick_device(cfg.trainer.device))
        plan = None
        if dist.rank() == 0:
            cfg, run_dir, ckpt, origin = prepare(cfg)
            plan = OmegaConf.to_container(cfg, resolve=True), run_dir, origin
        plan = dist.share(plan)
        if dist.rank() != 0:
            cfg, run_dir, origin = OmegaConf.create(plan[0]), plan[1], plan[2]
            ckpt = checkpoint.load(cfg.resume) if cfg.resume else None
    # One run at a time in a folder: the gentrain command that started this one holds the folder's lock
    # (files.run_folder), else (a job of a sweep, a torchrun worker started by hand) rank 0 takes it here.
    held = files.lock_held(run_dir) or dist.rank() > 0
    try:
        with contextlib.nullcontext() if held else files.RunLock(run_dir):
            run(cfg, run_dir, device, ckpt, origin)
        dist.barrier()  # every rank is done, rank 0's last checkpoint written, before the group goes away
    finally:
        dist.shutdown()
    return objective(cfg, run_dir)


def run(cfg: DictConfig, run_dir: Path, device: torch.device, ckpt: checkpoint.Checkpoint | None,
        branched_from: dict | None = None) -> None:
    """Build the data, model, optimizers, batches and evaluator the config describes, and run the loop.

    A start checks everything before it changes anything: the config, device and run folder (prepare), the
    folder's lock (main, or the gentrain command that started this one), the data and every part built
    here, then the checkpoint restored into them (the loop); only then does `start` change the run folder
    (rollback's deletions, a branch's history) and open the loggers, and the loop write its first files."""
    t, d = cfg.trainer, cfg.dataset
    torch.manual_seed(cfg.seed)
    main_rank = dist.rank() == 0
    if main_rank:  # rank 0 first: a dataset it downloads is there for the others
        train_data = data.load(d, split="train", streamable=True)
    dist.barrier()
    if not main_rank:
        train_data = data.load(d, split="train", streamable=True)
    facts = train_data.facts
    model = models.build(cfg.model, *facts)
    schedule = cfg.optim.get("scheduler")
    # Every hardware decision (precision, TF32, cuDNN, layout, fused and capturable optimizers, compile,
    # capture), made once, here.
    speed = fast.plan(t, device, dist.world_size(), facts.points, scheduled=schedule is not None)
    amp = speed.amp
    evaluate = best_by = None
    if t.eval_every and main_rank:
        evaluate = Evaluator(cfg.metrics, d, model.capabilities, t.eval_n, cfg.seed, device, nll_n=t.eval_n, amp=amp)
        best_by = evaluate.key(t.eval_metric)

    speed.apply()  # after the evaluator's reference features, which keep cuDNN's default kernels
    if t.get("sync_bn"):
        dist.sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if speed.channels_last else torch.contiguous_format).train()
    make_optimizer = optimizer_factory(cfg.optim, device, fused=speed.fused, capturable=speed.capturable)
    optimizers = {o: make_optimizer(o, model.phase_parameters(o), lazy_ratio(model.phases, o))
                  for o in model.optimizers}
    make_scheduler = scheduler_factory(schedule)
    try:
        schedulers = {o: make_scheduler(opt) for o, opt in optimizers.items()} if make_scheduler else {}
    except (ValueError, TypeError) as e:  # torch's own check of a value, e.g. start_factor=0
        raise GentrainError(f"optim.scheduler: {e}") from None
    horizon = schedule and schedule.get("total_iters", schedule.get("T_max"))
    if horizon and horizon < t.steps:
        after = "rises again (a cosine's period)" if "T_max" in schedule else \
            f"stays at {schedule.get('end_factor', 0)} x optim.lr"
        log.warning("note: the learning-rate schedule ends at step %d (optim.scheduler, the run's trainer.steps when "
                    "it started), before trainer.steps=%d: after it the learning rate %s", horizon, t.steps, after)
    batches = data.Batches(train_data, t.batch_size, cfg.seed, device, data.on_device_setting(d),
                           d.get("hflip", False), d.get("workers", 4), channels_last=speed.channels_last)

    config = OmegaConf.to_container(cfg, resolve=True)

    def start() -> list:
        """Every check has passed, the last of them the loop's restore of the checkpoint: now the run folder
        may change (begin), and the loggers open their files."""
        if not main_rank:
            return []
        begin(cfg, run_dir, ckpt, branched_from)
        return loggers.build(t.loggers, run_dir, config, ckpt.step if ckpt else 0, t.wandb_project)

    size = f"{len(train_data)} points" if facts.points else \
        f"{len(train_data)} images, {facts.image_size}x{facts.image_size}"
    loop.train(model, batches, optimizers, t, run_dir, schedulers=schedulers, device=device, amp=amp, speed=speed,
               meta=checkpoint.meta(config, facts, choices(ckpt), branched_from), start=start,
               seed=cfg.seed,
               what=f"{cfg.model.family} on {d.name} ({size}, {batches.where})", resume=ckpt,
               evaluate=evaluate, best_by=best_by, reference=train_data.images[:t.n_samples] if facts.points else None)
