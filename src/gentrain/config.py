"""Where the configs live, and the checks on config values that Hydra's schema cannot express."""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gentrain import GentrainError, dist
from gentrain.data import TORCHVISION, TOY
from gentrain.loop import pick_device, pick_precision
from gentrain.models.nets import PLANS

# The config groups: on resume these cannot change, only keys inside them.
GROUPS = ("model", "dataset", "optim", "trainer", "experiment")
# Each family's phases, which name its per-phase learning rates optim.lr_<phase>.
PHASES = {"gan": ("D", "G"), "vae": ("vae",), "vqvae": ("vqvae", "prior")}


def config_dir() -> Path:
    """configs/ ships inside the wheel as gentrain/configs; an editable install uses the checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parents[1] / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise GentrainError(f"gentrain's configs are missing (looked in {here / 'configs'}); reinstall gentrain")


def unset(key: str) -> GentrainError:
    """A mandatory key (`???` in its YAML) that the command line did not set."""
    return GentrainError(f"{key} has no value; set it on the command line: {key}=...")


def _positive(cfg: DictConfig, key: str, integer: bool = True) -> None:
    value = OmegaConf.select(cfg, key)
    number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not number or value <= 0:
        raise GentrainError(f"{key} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def _one_of(cfg: DictConfig, key: str, choices: tuple = (True, False)) -> None:
    value = OmegaConf.select(cfg, key)
    if not any(value is c if isinstance(c, bool) else value == c for c in choices):
        raise GentrainError(f"{key} must be one of {'|'.join(str(c).lower() for c in choices)}, got {value!r}")


def check_fast(cfg: DictConfig, device, processes: int) -> None:
    """The data path's and the fast step's switches (gentrain.data, gentrain.fast)."""
    t = cfg.trainer
    _one_of(cfg, "trainer.channels_last", ("auto", True, False))
    _one_of(cfg, "trainer.compile")
    _one_of(cfg, "trainer.cuda_graphs")
    if "on_device" in cfg.dataset:  # image datasets
        _one_of(cfg, "dataset.on_device", ("auto", True, False))
        _one_of(cfg, "dataset.hflip")
    workers = cfg.dataset.get("workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise GentrainError(f"dataset.workers must be an integer >= 0, got {workers!r}")
    if not t.cuda_graphs:
        return
    # A captured step replays the same kernels on the same shapes, and nothing in it may wait for the host.
    if device.type != "cuda":
        raise GentrainError("trainer.cuda_graphs=true needs a CUDA GPU; leave it off on the CPU")
    if t.precision == "fp16":
        raise GentrainError("trainer.cuda_graphs=true cannot capture fp16's GradScaler, which checks for overflow "
                            "on the host; use trainer.precision=bf16 or fp32")
    if processes > 1:
        raise GentrainError("trainer.cuda_graphs=true runs in one process; with trainer.devices > 1 leave it off")
    if cfg.model.family == "gan" and cfg.model.get("r1", 0) > 0 and cfg.model.get("r1_every", 1) > 1:
        raise GentrainError(f"trainer.cuda_graphs=true replays the same step every step, and lazy R1 "
                            f"(model.r1_every={cfg.model.r1_every}) differs between steps; set model.r1_every=1")


def check_train(cfg: DictConfig) -> None:
    """Reject values that would fail later, or silently train something else, with one clear line."""
    missing = [f"{g}.{k}" for g in ("dataset", "model", "trainer", "optim")
               for k in cfg[g] if OmegaConf.is_missing(cfg[g], k)]
    if missing:
        raise unset(missing[0])
    for key in ("trainer.steps", "trainer.batch_size", "trainer.log_every", "trainer.sample_every",
                "trainer.ckpt_every", "trainer.n_samples", "model.z_dim", "model.ch"):
        _positive(cfg, key)
    _positive(cfg, "optim.lr", integer=False)
    phases = PHASES.get(cfg.model.family, ())
    for key in (k for k in cfg.optim if str(k).startswith("lr_")):
        if key[len("lr_"):] not in phases:
            raise GentrainError(f"optim.{key}: {cfg.model.family} has no phase {key[len('lr_'):]!r}; "
                                f"per-phase learning rates are {', '.join('optim.lr_' + p for p in phases)}")
        if cfg.optim[key] is not None:
            _positive(cfg, f"optim.{key}", integer=False)
    if cfg.trainer.get("max_minutes") is not None:
        _positive(cfg, "trainer.max_minutes", integer=False)
    every = cfg.trainer.eval_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise GentrainError(f"trainer.eval_every must be 0 (off) or a positive integer, got {every!r}")
    if every:
        _positive(cfg, "trainer.eval_n")
        _positive(cfg, "metrics.k")
    if cfg.model.get("conditional") and cfg.dataset.name not in TORCHVISION:  # before loading any data
        raise GentrainError(f"model.conditional=true needs a labelled dataset ({', '.join(TORCHVISION)}); "
                            f"dataset={cfg.dataset.name} has no labels")
    if cfg.dataset.name in TOY:
        if cfg.model.family != "gan" or cfg.model.get("arch") not in ("auto", "mlp"):
            raise GentrainError(f"dataset={cfg.dataset.name} holds 2-D points: train it with model=gan and "
                                f"model.arch=auto or mlp (or experiment=toy dataset={cfg.dataset.name})")
    elif cfg.dataset.image_size not in PLANS:
        raise GentrainError(f"dataset.image_size must be one of {', '.join(map(str, PLANS))}, "
                            f"got {cfg.dataset.image_size!r}")
    device = pick_device(cfg.trainer.device)  # also: cuda asked for where torch sees none
    pick_precision(cfg.trainer.precision, device)
    _positive(cfg, "trainer.devices")
    processes = max(cfg.trainer.devices, dist.world_size())
    if cfg.trainer.batch_size % processes:
        raise GentrainError(f"trainer.batch_size={cfg.trainer.batch_size} must split evenly over {processes} "
                            f"processes (it is the global batch)")
    if cfg.trainer.sync_bn and processes > 1 and device.type != "cuda":
        raise GentrainError("trainer.sync_bn=true needs GPUs (torch's SyncBatchNorm runs on CUDA only); "
                            "on CPU each process normalises its own rows")

    check_fast(cfg, device, processes)

    target = str(cfg.optim.get("_target_", ""))
    if not target.startswith("torch.optim."):
        # The optimizer is built with hydra.utils.instantiate, also when resuming from a
        # checkpoint's stored config: only torch's own optimizers may be named there.
        raise GentrainError(f"optim._target_ must name a torch.optim optimizer, got {target!r}")
