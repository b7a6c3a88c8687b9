"""`gentrain [overrides]`: build the objects a run needs from its config, then hand them to the loop."""

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

from gentrain import GentrainError, checkpoint, data, dist, loop, models
from gentrain.cli import quote, reported
from gentrain.config import GROUPS, check_train, config_dir

log = logging.getLogger("gentrain")


def resumed_config(cfg: DictConfig, ckpt: dict) -> DictConfig:
    """The checkpoint's own config, with the key overrides given on this command line on top."""
    merged = OmegaConf.create(ckpt["config"])
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
    """make_optimizer(phase, params): one optimizer per phase from the `optim` partial. A key
    optim.lr_<phase> (lr_D, lr_G) gives that phase its own learning rate: the two time-scale update
    rule (TTUR, Heusel et al. 2017, Sec. 2), e.g. lr_D=4e-4 lr_G=1e-4 as in SAGAN (Zhang et al. 2019).

    On a GPU, an optimizer that has torch's fused kernel (Adam, AdamW, SGD) uses it, one launch for all
    of a phase's parameters, unless optim.fused says otherwise; `capturable` (trainer.cuda_graphs) keeps
    its state on the device, as a captured step needs."""
    cfg = OmegaConf.to_container(optim_cfg, resolve=True)
    per_phase = {k[len("lr_"):]: cfg.pop(k) for k in list(cfg) if k.startswith("lr_")}
    make = instantiate(cfg, _convert_="all")
    accepts = inspect.signature(make.func).parameters
    if device.type == "cuda" and "fused" in accepts and "fused" not in cfg:
        make = functools.partial(make, fused=True)
    if capturable and "capturable" in accepts:
        make = functools.partial(make, capturable=True)

    def make_optimizer(phase: str, params):
        return make(params) if per_phase.get(phase) is None else make(params, lr=per_phase[phase])

    return make_optimizer


def prepare(cfg: DictConfig) -> tuple[DictConfig, Path, dict | None]:
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
        if ckpt is None or not (ckpt.get("preempted") or int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0):
            raise GentrainError(f"{run_dir} already holds a run; continue it with resume={run_dir} "
                                f"or pick another hydra.run.dir")
        log.info("%s was stopped by its scheduler at step %d: resuming it", run_dir, ckpt["step"])
        cfg = with_defaults(OmegaConf.create(ckpt["config"]), cfg)
        cfg.resume = str(run_dir)
    check_train(cfg)
    return cfg, run_dir, ckpt


def objective(cfg: DictConfig, run_dir: Path) -> float | None:
    """The run's best trainer.eval_metric score, as a Hydra sweeper (Optuna) optimises it; None without
    evaluation."""
    if not cfg.trainer.eval_every or not (run_dir / "metrics.jsonl").exists():
        return None
    from gentrain.evaluate import SCORES

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
        device = loop.pick_device(cfg.trainer.device)
    else:  # a torchrun worker: rank 0 decides what to run and every rank follows
        device = dist.init(loop.pick_device(cfg.trainer.device))
        plan = None
        if dist.rank() == 0:
            cfg, run_dir, ckpt = prepare(cfg)
            plan = OmegaConf.to_container(cfg, resolve=True), run_dir
        plan = dist.share(plan)
        if dist.rank() != 0:
            cfg, run_dir = OmegaConf.create(plan[0]), plan[1]
            ckpt = checkpoint.load(cfg.resume) if cfg.resume else None
    try:
        train(cfg, run_dir, device, ckpt)
        dist.barrier()  # every rank is done, rank 0's last checkpoint written, before the group goes away
    finally:
        dist.shutdown()
    return objective(cfg, run_dir)


def train(cfg: DictConfig, run_dir: Path, device: torch.device, ckpt: dict | None) -> None:
    """Build the data, model, optimizers and evaluator the config describes, and run the loop."""
    torch.manual_seed(cfg.seed)
    main_rank = dist.rank() == 0
    if main_rank:  # rank 0 first: a dataset it downloads is there for the others
        train_data = data.load(cfg.dataset, split="train", streamable=True)
    dist.barrier()
    if not main_rank:
        train_data = data.load(cfg.dataset, split="train", streamable=True)
    model = models.build(cfg.model, train_data.channels, train_data.image_size, train_data.num_classes)
    evaluate = best_by = None
    if cfg.trainer.eval_every and main_rank:
        from gentrain.evaluate import Evaluator

        evaluate = Evaluator(cfg.metrics, cfg.dataset, cfg.model.family, cfg.trainer.eval_n, cfg.seed,
                             device, nll_n=cfg.trainer.eval_n)
        best_by = evaluate.key(cfg.trainer.eval_metric)
    make_optimizer = optimizer_factory(cfg.optim, device, capturable=cfg.trainer.cuda_graphs)
    loop.train(cfg, model, train_data, make_optimizer, run_dir, device, ckpt, evaluate, best_by)
