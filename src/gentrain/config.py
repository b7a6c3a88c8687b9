"""Where the configs live, and the checks on config values that Hydra's schema cannot express."""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gentrain import GentrainError

IMAGE_SIZES = (28, 32, 64)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def config_dir() -> Path:
    """configs/ ships inside the wheel as gentrain/configs; an editable install uses the checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parents[1] / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise GentrainError(f"gentrain's configs are missing (looked in {here / 'configs'}); reinstall gentrain")


def _positive(cfg, key, kind=int):
    value = cfg
    for part in key.split("."):
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
        what = "a positive integer" if kind is int else "a positive number"
        raise GentrainError(f"{key} must be {what}, got {value!r}")


def check_train(cfg: DictConfig) -> None:
    """Reject values that would fail later, or silently train something else, with one clear line."""
    missing = [f"{g}.{k}" for g in ("dataset", "model", "trainer", "optim")
               for k in cfg[g] if OmegaConf.is_missing(cfg[g], k)]
    if missing:
        raise GentrainError(f"{missing[0]} has no value; set it on the command line: {missing[0]}=...")
    for key in ("trainer.steps", "trainer.batch_size", "trainer.log_every", "trainer.sample_every",
                "trainer.ckpt_every", "trainer.n_samples", "model.z_dim", "model.ch"):
        _positive(cfg, key)
    _positive(cfg, "optim.lr", float)
    if cfg.dataset.image_size not in IMAGE_SIZES:
        raise GentrainError(f"dataset.image_size must be one of {', '.join(map(str, IMAGE_SIZES))}, "
                            f"got {cfg.dataset.image_size!r}")
    from gentrain.loop import pick_device

    pick_device(cfg.trainer.device)  # also: cuda asked for where torch sees none
    if cfg.trainer.precision not in PRECISIONS:
        raise GentrainError(f"trainer.precision must be one of {'|'.join(PRECISIONS)}, "
                            f"got {cfg.trainer.precision!r}")
    target = str(cfg.optim.get("_target_", ""))
    if not target.startswith("torch.optim."):
        # The optimizer is built with hydra.utils.instantiate, also when resuming from a
        # checkpoint's stored config: only torch's own optimizers may be named there.
        raise GentrainError(f"optim._target_ must name a torch.optim optimizer, got {target!r}")


GROUPS = ("model", "dataset", "optim", "trainer", "experiment")
