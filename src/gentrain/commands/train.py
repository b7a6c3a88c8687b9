"""`gentrain [overrides]`: build the parts a run needs from its config, then hand them to the loop."""

import functools
import inspect
import json
import logging
import os
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gentrain import checkpoint, data, dist, fast, loop, models
from gentrain.config import GROUPS, check_train, config_dir
from gentrain.device import pick_device, pick_precision, use_fast_kernels
from gentrain.errors import GentrainError, quote, reported
from gentrain.metrics.evaluator import SCORES, Evaluator

log = logging.getLogger("gentrain")


def resumed_config(cfg: DictConfig, ckpt: checkpoint.Checkpoint) -> DictConfig:
    """The checkpoint's own config, with the key overrides given on this command line on top."""
    merged = ckpt.config
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "resume" or key.startswith("hydra."):
            continue
        if key in GROUPS:
            raise GentrainError(f"{key}= cannot change when resuming: the run keeps its config; "
                                f"key overrides such as trainer.steps=N can")
        OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True)
    merged.resume = cfg.resume
    return with_defaults(merged, cfg)


def with_defaults(merged: DictConfig, cfg: DictConfig) -> DictConfig:
    """A run from before a config node or key existed takes today's defaults for it."""
    if "metrics" not in merged:
        merged.metrics = cfg.metrics
    for key, value in cfg.trainer.items():
        if key not in merged.trainer:
            merged.trainer[key] = value
    return merged


def optimizer_factory(optim_cfg: DictConfig, device: torch.device, capturable: bool = False):
    """make_optimizer(name, params, ratio=1): one optimizer per parameter set from the `optim` partial. A
    key optim.lr_<name> (lr_D, lr_G) gives that optimizer its own learning rate: the two time-scale
    update rule (TTUR, Heusel et al. 2017, Sec. 2), e.g. lr_D=4e-4 lr_G=1e-4 as in SAGAN (Zhang et al. 2019).

    `ratio` < 1 scales the learning rate by it and Adam's betas to its power, as StyleGAN2-ADA does for an
    optimizer that lazy regularisation steps more often (see lazy_ratio).

    On a GPU, an optimizer that has torch's fused kernel (Adam, AdamW, SGD) uses it, one launch for all
    of a set's parameters, unless optim.fused says otherwise; `capturable` (trainer.cuda_graphs) keeps
    its state on the device, as a captured step needs."""
    cfg = OmegaConf.to_container(optim_cfg, resolve=True)
    per_phase = {k[len("lr_"):]: cfg.pop(k) for k in list(cfg) if k.startswith("lr_")}
    make = instantiate(cfg, _convert_="all")
    accepts = inspect.signature(make.func).parameters
    if device.type == "cuda" and "fused" in accepts and "fused" not in cfg:
        make = functools.partial(make, fused=True)
    if capturable and "capturable" in accepts:
        make = functools.partial(make, capturable=True)

    def make_optimizer(name: str, params, ratio: float = 1.0):
        kwargs = {} if per_phase.get(name) is None else {"lr": per_phase[name]}
        if ratio != 1:
            kwargs["lr"] = kwargs.get("lr", cfg["lr"]) * ratio
            if "betas" in cfg:
                kwargs["betas"] = tuple(b ** ratio for b in cfg["betas"])
        return make(params, **kwargs)

    return make_optimizer


def lazy_ratio(phases, opt: str) -> float:
    """An optimizer that a lazy phase (one with every > 1) also steps takes more updates per batch than its
    main phases alone: StyleGAN2-ADA scales its learning rate and betas by mb_ratio = k / (k + 1) for one
    main update and a regulariser every k (training/training_loop.py). In general: the main updates per
    step over all updates per step."""
    every = [p.every for p in phases if p.opt == opt]
    return sum(e == 1 for e in every) / sum(1 / e for e in every)


def prepare(cfg: DictConfig) -> tuple[DictConfig, Path, checkpoint.Checkpoint | None]:
    """The run this command asks for: its config, its folder, and the checkpoint it continues (or None).

    A run folder that already holds a run is continued only when asked (resume=), or when the same job
    starts again after its scheduler stopped it: its last checkpoint was written on a preemption signal,
    or SLURM requeued it (SLURM_RESTART_COUNT). Then the job keeps the config it was started with.
    """
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ckpt = None
    if cfg.resume:
        ckpt = checkpoint.load(cfg.resume)
        cfg = resumed_config(cfg, ckpt)
        run_dir = checkpoint.run_dir_of(checkpoint.resolve(cfg.resume))
    elif (run_dir / "checkpoints" / "last.pt").exists() or (run_dir / "metrics.jsonl").exists():
        last = run_dir / "checkpoints" / "last.pt"
        ckpt = checkpoint.load(last) if last.exists() else None
        if ckpt is None or not (ckpt.preempted or int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0):
            raise GentrainError(f"{run_dir} already holds a run; continue it with resume={run_dir} "
                                f"or pick another hydra.run.dir")
        log.info("%s was stopped by its scheduler at step %d: resuming it", run_dir, ckpt.step)
        cfg = with_defaults(ckpt.config, cfg)
        cfg.resume = str(run_dir)
    check_train(cfg)
    return cfg, run_dir, ckpt


def objective(cfg: DictConfig, run_dir: Path) -> float | None:
    """The run's best trainer.eval_metric score, as a Hydra sweeper (Optuna) optimises it; None without
    evaluation."""
    if not cfg.trainer.eval_every or not (run_dir / "metrics.jsonl").exists():
        return None
    lower = SCORES[cfg.trainer.eval_metric][1]
    name = f"eval/{cfg.trainer.eval_metric}"
    with open(run_dir / "metrics.jsonl") as f:
        scores = [v for line in f if line.strip()
                  for k, v in json.loads(line).items() if k == name or k.startswith(name + "@")]
    return (min if lower else max)(scores) if scores else None


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
@reported
def main(cfg: DictConfig) -> float | None:
    if not dist.launched():
        cfg, run_dir, ckpt = prepare(cfg)
        if cfg.trainer.devices > 1:  # gentrain trainer.devices=N: torchrun N workers of this same command
            dist.torchrun(cfg.trainer.devices, [*HydraConfig.get().overrides.task,
                                                f"hydra.run.dir={quote(str(run_dir))}", "hydra.output_subdir=null"])
            return objective(cfg, run_dir)
        device = pick_device(cfg.trainer.device)
    else:  # a torchrun worker: rank 0 decides what to run and every rank follows
        device = dist.init(pick_device(cfg.trainer.device))
        plan = None
        if dist.rank() == 0:
            cfg, run_dir, ckpt = prepare(cfg)
            plan = OmegaConf.to_container(cfg, resolve=True), run_dir
        plan = dist.share(plan)
        if dist.rank() != 0:
            cfg, run_dir = OmegaConf.create(plan[0]), plan[1]
            ckpt = checkpoint.load(cfg.resume) if cfg.resume else None
    try:
        run(cfg, run_dir, device, ckpt)
        dist.barrier()  # every rank is done, rank 0's last checkpoint written, before the group goes away
    finally:
        dist.shutdown()
    return objective(cfg, run_dir)


def run(cfg: DictConfig, run_dir: Path, device: torch.device, ckpt: checkpoint.Checkpoint | None) -> None:
    """Build the data, model, optimizers, batches and evaluator the config describes, and run the loop."""
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
    evaluate = best_by = None
    if t.eval_every and main_rank:
        evaluate = Evaluator(cfg.metrics, d, model.capabilities, t.eval_n, cfg.seed, device, nll_n=t.eval_n)
        best_by = evaluate.key(t.eval_metric)

    amp = pick_precision(t.precision, device)
    use_fast_kernels(device)
    if t.get("sync_bn"):  # batch-norm statistics over the global batch, not each rank's rows
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = fast.channels_last(t.channels_last, device, facts.points)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).train()
    make_optimizer = optimizer_factory(cfg.optim, device, capturable=t.cuda_graphs)
    optimizers = {o: make_optimizer(o, model.phase_parameters(o), lazy_ratio(model.phases, o))
                  for o in model.optimizers}
    batches = data.Batches(train_data, t.batch_size, cfg.seed, device, data.on_device_setting(d),
                           d.get("hflip", False), d.get("workers", 4), channels_last=channels_last)

    size = f"{len(train_data)} points" if facts.points else \
        f"{len(train_data)} images, {facts.image_size}x{facts.image_size}"
    loop.train(model, batches, optimizers, t, run_dir, device=device, amp=amp,
               meta=checkpoint.meta(OmegaConf.to_container(cfg, resolve=True), facts), seed=cfg.seed,
               what=f"{cfg.model.family} on {d.name} ({size}, {batches.where})", resume=ckpt,
               evaluate=evaluate, best_by=best_by, reference=train_data.images[:t.n_samples] if facts.points else None)
