"""Where the configs live, and the checks of a training config that Hydra's schema cannot express: the
trainer's and optimizer's values here, the model's by its family (models.check), the dataset's by the
dataset table (data.facts). Nothing in it knows one family from another."""

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from gentrain import data, dist, models
from gentrain.checks import at_least, one_of, positive
from gentrain.device import pick_device, pick_precision
from gentrain.errors import GentrainError, unset

# The config groups: on resume these cannot change, only keys inside them.
GROUPS = ("model", "dataset", "optim", "trainer", "experiment")


def config_dir() -> Path:
    """configs/ ships inside the wheel as gentrain/configs; an editable install uses the checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parents[1] / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise GentrainError(f"gentrain's configs are missing (looked in {here / 'configs'}); reinstall gentrain")


def check_fast(cfg: DictConfig, device, amp, processes: int) -> None:
    """The data path's and the fast step's switches (gentrain.data, gentrain.fast)."""
    t = cfg.trainer
    one_of("trainer.channels_last", t.channels_last, ("auto", True, False))
    one_of("trainer.compile", t.compile)
    one_of("trainer.cuda_graphs", t.cuda_graphs)
    if "on_device" in cfg.dataset:  # image datasets
        one_of("dataset.on_device", cfg.dataset.on_device, ("auto", True, False))
        one_of("dataset.hflip", cfg.dataset.hflip)
    at_least("dataset.workers", cfg.dataset.get("workers", 0), 0)
    if not t.cuda_graphs:
        return
    # A captured step replays the same kernels on the same shapes, and nothing in it may wait for the host.
    if device.type != "cuda":
        raise GentrainError("trainer.cuda_graphs=true needs a CUDA GPU; leave it off on the CPU")
    if amp is torch.float16:
        raise GentrainError("trainer.cuda_graphs=true cannot capture fp16's GradScaler, which checks for overflow "
                            "on the host; use trainer.precision=bf16 or fp32")
    if processes > 1:
        raise GentrainError("trainer.cuda_graphs=true runs in one process; with trainer.devices > 1 leave it off")


def check_train(cfg: DictConfig) -> None:
    """Reject values that would fail later, or silently train something else, with one clear line."""
    missing = [f"{g}.{k}" for g in ("dataset", "model", "trainer", "optim")
               for k in cfg[g] if OmegaConf.is_missing(cfg[g], k)]
    if missing:
        raise unset(missing[0])
    t = cfg.trainer
    for key in ("steps", "batch_size", "log_every", "sample_every", "ckpt_every", "n_samples", "devices"):
        positive(f"trainer.{key}", t[key])
    positive("optim.lr", cfg.optim.lr, integer=False)
    if t.get("max_minutes") is not None:
        positive("trainer.max_minutes", t.max_minutes, integer=False)
    if not isinstance(t.eval_every, int) or isinstance(t.eval_every, bool) or t.eval_every < 0:
        raise GentrainError(f"trainer.eval_every must be 0 (off) or a positive integer, got {t.eval_every!r}")
    if t.eval_every:
        positive("trainer.eval_n", t.eval_n)
        positive("metrics.k", cfg.metrics.k)

    # The model, by its family, against the dataset's facts; then the optimizers it has.
    models.check(cfg.model, data.facts(cfg.dataset))
    optimizers = models.family(cfg.model.family).optimizers
    for key in (k for k in cfg.optim if str(k).startswith("lr_")):
        if key[len("lr_"):] not in optimizers:
            raise GentrainError(f"optim.{key}: {cfg.model.family} has no phase {key[len('lr_'):]!r}; "
                                f"per-phase learning rates are {', '.join('optim.lr_' + p for p in optimizers)}")
        if cfg.optim[key] is not None:
            positive(f"optim.{key}", cfg.optim[key], integer=False)
    target = str(cfg.optim.get("_target_", ""))
    if not target.startswith("torch.optim."):
        # The optimizer is built with hydra.utils.instantiate, also when resuming from a
        # checkpoint's stored config: only torch's own optimizers may be named there.
        raise GentrainError(f"optim._target_ must name a torch.optim optimizer, got {target!r}")

    # Where it runs.
    device = pick_device(t.device)  # also: cuda asked for where torch sees none
    amp = pick_precision(t.precision, device)
    processes = max(t.devices, dist.world_size())
    if t.batch_size % processes:
        raise GentrainError(f"trainer.batch_size={t.batch_size} must split evenly over {processes} "
                            f"processes (it is the global batch)")
    if t.sync_bn and processes > 1 and device.type != "cuda":
        raise GentrainError("trainer.sync_bn=true needs GPUs (torch's SyncBatchNorm runs on CUDA only); "
                            "on CPU each process normalises its own rows")
    check_fast(cfg, device, amp, processes)
