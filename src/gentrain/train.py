"""`gentrain [overrides]`: build the objects a run needs from its config, then hand them to the loop."""

from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gentrain import GentrainError, checkpoint, data, loop, models
from gentrain.cli import reported
from gentrain.config import GROUPS, check_train, config_dir


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
    # A run from before a config node or key existed takes today's defaults for it.
    if "metrics" not in merged:
        merged.metrics = cfg.metrics
    for key, value in cfg.trainer.items():
        if key not in merged.trainer:
            merged.trainer[key] = value
    return merged


def optimizer_factory(optim_cfg: DictConfig):
    """make_optimizer(phase, params): one optimizer per phase from the `optim` partial. A key
    optim.lr_<phase> (lr_D, lr_G) gives that phase its own learning rate: the two time-scale update
    rule (TTUR, Heusel et al. 2017, Sec. 2), e.g. lr_D=4e-4 lr_G=1e-4 as in SAGAN (Zhang et al. 2019)."""
    cfg = OmegaConf.to_container(optim_cfg, resolve=True)
    per_phase = {k[len("lr_"):]: cfg.pop(k) for k in list(cfg) if k.startswith("lr_")}
    make = instantiate(cfg, _convert_="all")

    def make_optimizer(phase: str, params):
        return make(params) if per_phase.get(phase) is None else make(params, lr=per_phase[phase])

    return make_optimizer


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
@reported
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ckpt = None
    if cfg.resume:
        ckpt = checkpoint.load(cfg.resume)
        cfg = resumed_config(cfg, ckpt)
        run_dir = checkpoint.run_dir_of(checkpoint.resolve(cfg.resume))
    elif (run_dir / "checkpoints" / "last.pt").exists() or (run_dir / "metrics.jsonl").exists():
        raise GentrainError(f"{run_dir} already holds a run; continue it with resume={run_dir} "
                            f"or pick another hydra.run.dir")
    check_train(cfg)
    torch.manual_seed(cfg.seed)
    train_data = data.load(cfg.dataset, split="train")
    model = models.build(cfg.model, train_data.channels, train_data.image_size, train_data.num_classes)
    evaluate = best_by = None
    if cfg.trainer.eval_every:
        from gentrain.evaluate import Evaluator

        evaluate = Evaluator(cfg.metrics, cfg.dataset, cfg.model.family, cfg.trainer.eval_n, cfg.seed,
                             loop.pick_device(cfg.trainer.device), nll_n=cfg.trainer.eval_n)
        best_by = evaluate.key(cfg.trainer.eval_metric)
    loop.train(cfg, model, train_data, optimizer_factory(cfg.optim), run_dir, ckpt, evaluate, best_by)
