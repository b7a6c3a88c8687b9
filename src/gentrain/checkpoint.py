"""Self-describing checkpoints: their layout (built and restored here, and nowhere else), written
atomically, read with torch.load(weights_only=True).

A checkpoint is a plain dict of tensors and Python scalars: the resolved config, the dataset facts
the model was sized from, the step, and every state needed to continue (model, optimizers, grad
scalers, RNG, the running log sums). Nothing in it is a class or a callable. Other modules read one
through `Checkpoint`, whose attributes name what it holds.
"""

import hashlib
import logging
import os
import pickle
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from gentrain import files, models
from gentrain.data import DataFacts
from gentrain.errors import GentrainError
from gentrain.models.family import EMA

log = logging.getLogger("gentrain")

# Format 2 (2026-12-04): a GAN's model.d_norm=auto keeps D's batch norm with R1; format 1 left it out
# (a format-1 checkpoint is read with that choice written out, as model.d_norm=none).
FORMAT, VERSION = "gentrain", 2
REQUIRED = ("family", "config", "data", "step", "model")


@dataclass
class Checkpoint:
    """A training checkpoint as read from `path`: what it describes, and (in `state`) what it holds."""

    path: Path
    state: dict

    @property
    def family(self) -> str:
        return self.state["family"]

    @property
    def config(self) -> DictConfig:
        """The run's resolved config."""
        return OmegaConf.create(self.state["config"])

    @property
    def model_config(self) -> dict:
        return self.state["config"]["model"]

    @property
    def facts(self) -> DataFacts:
        d = self.state["data"]
        return DataFacts(d["channels"], d["image_size"], d.get("num_classes", 0))

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def choices(self) -> dict:
        """The config group choices the run was started with; for a checkpoint from before they were kept,
        its run folder's .hydra/hydra.yaml, or what its config shows (model=<family>, dataset=<name>)."""
        if isinstance(self.state.get("choices"), dict):
            return self.state["choices"]
        hydra_yaml = run_dir_of(self.path) / ".hydra" / "hydra.yaml"
        try:
            return dict(OmegaConf.load(hydra_yaml).hydra.runtime.choices)
        except Exception:
            return {"model": self.family, "dataset": self.state["config"]["dataset"].get("name")}

    @property
    def preempted(self) -> bool:
        """Written on a scheduler's preemption signal: the requeued job resumes it by itself."""
        return bool(self.state.get("preempted"))

    def dataset_config(self, root=None) -> DictConfig:
        """The dataset config the model was trained on; `root` (data_root=) points at its files elsewhere."""
        cfg = OmegaConf.create(self.state["config"]["dataset"])
        if root is not None:
            cfg.root = root
        return cfg

    def describe(self) -> str:
        return f"{self.path} ({self.family}, step {self.step})"

    def sampling_prior(self, kind: str) -> dict | None:
        """The sampling prior of this kind fitted to these weights (gentrain sample|eval prior=KIND), if any."""
        return self.state.get("sampling_priors", {}).get(kind)


def store_sampling_prior(ckpt: Checkpoint, kind: str, prior: dict) -> None:
    """Keep a sampling prior fitted to a checkpoint's weights in the checkpoint itself, rewritten atomically
    with everything else unchanged. A run that resumes from it writes checkpoints without it: new
    weights need a prior of their own."""
    ckpt.state.setdefault("sampling_priors", {})[kind] = prior
    save({k: v for k, v in ckpt.state.items() if k not in ("format", "version", "digest")}, ckpt.path)


def meta(config: dict, facts: DataFacts, choices: dict | None = None, branched_from: dict | None = None) -> dict:
    """What every checkpoint of a run says about it: its family, resolved config and dataset facts, the
    config group choices it was started with (model=gan, experiment=smoke, ...), and the run and step it
    branched from when it continues an earlier checkpoint of another run."""
    out = {"family": config["model"]["family"], "config": config, "data": facts._asdict()}
    if choices:
        out["choices"] = choices
    if branched_from:
        out["branched_from"] = branched_from
    return out


@dataclass
class Resumed:
    """The loop's own state at a checkpoint, once the model, optimizers, scalers and RNG are restored."""

    step: int
    seconds: float
    log: dict             # the logged sums of the open interval (loop.Meter's state)
    best: dict | None     # the best evaluation so far: metric, value, step


def training_state(meta: dict, step: int, seconds: float, model, optimizers: dict, scalers: dict, schedulers: dict,
                   device, log: dict, best: dict | None, preempted: bool = False) -> dict:
    """Everything a run needs to continue from `step` exactly, as one checkpoint dict."""
    if EMA in model.capabilities:
        model.calibrate_ema()  # the batch-norm statistics the EMA samples with, saved beside its weights
    return {**meta, "step": step, "seconds": seconds,
            "model": model.state_dict(),
            "optim": {p: o.state_dict() for p, o in optimizers.items()},
            "scaler": {p: s.state_dict() for p, s in scalers.items()},
            "scheduler": {p: s.state_dict() for p, s in schedulers.items()},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []},
            "log": log, "best": best,
            "preempted": preempted}  # stopped by a scheduler's signal: a requeued job resumes by itself


def load_weights(ckpt: Checkpoint, model: torch.nn.Module) -> None:
    try:
        model.load_state_dict(ckpt.state["model"])
    except RuntimeError:
        raise GentrainError(f"{ckpt.path}: the stored weights do not fit the model its config describes") from None


def restore(ckpt: Checkpoint, model, optimizers: dict, scalers: dict, schedulers: dict,
            device: torch.device) -> Resumed:
    """Load a checkpoint's weights, optimizer, grad-scaler, learning-rate schedule and RNG states; the
    loop's own state back."""
    s = ckpt.state
    load_weights(ckpt, model)
    for p, opt in optimizers.items():
        # Hyperparameters follow the config (optim.lr=... on resume), and so do the implementation flags
        # (fused, capturable): torch places the loaded step counts by them, on the device for a step that
        # a CUDA graph captures, whichever way the checkpoint's run was stepped.
        saved = s["optim"][p]
        opt.load_state_dict({**saved, "param_groups": [g | opt.defaults for g in saved["param_groups"]]})
        scalers[p].load_state_dict(s["scaler"][p])
    for p, scheduler in schedulers.items():
        if p not in s.get("scheduler", {}):
            raise GentrainError(f"{ckpt.path} holds no learning-rate schedule for {p}")
        scheduler.load_state_dict(s["scheduler"][p])
        # As floats: a run stepped by a CUDA graph saved device tensors, which this run may not step on.
        scheduler.base_lrs = [float(lr) for lr in scheduler.base_lrs]
        scheduler._last_lr = [float(lr) for lr in scheduler.get_last_lr()]
        # The loaded param groups hold the config's learning rate: set the schedule's own at this step.
        for group, lr in zip(optimizers[p].param_groups, scheduler.get_last_lr()):
            group["initial_lr"] = float(group.get("initial_lr", lr))
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(float(lr))  # in place: a captured step reads it from there
            else:
                group["lr"] = float(lr)
    torch.set_rng_state(s["rng"]["torch"])
    if device.type == "cuda" and s["rng"]["cuda"]:  # the training GPU's state; all ranks share it
        torch.cuda.set_rng_state(s["rng"]["cuda"][0], device)
    return Resumed(s["step"], s["seconds"], s["log"], s.get("best"))


def load_model(path, device: torch.device, ema: bool = True) -> tuple[torch.nn.Module, Checkpoint]:
    """The model a checkpoint describes, rebuilt from its family name and config, with its weights, in
    eval mode; ema=False samples a GAN's raw G instead of the EMA of its weights."""
    ckpt = load(path)
    facts = ckpt.facts
    model = models.build(ckpt.model_config, facts.channels, facts.image_size, facts.num_classes)
    load_weights(ckpt, model)
    if EMA in model.capabilities:
        model.use_ema = ema
    return model.to(device).eval(), ckpt


def run_dir_of(path: Path) -> Path:
    """The run folder a checkpoint belongs to: RUN/checkpoints/last.pt -> RUN."""
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def resolve(path) -> Path:
    """A checkpoint file, or the last checkpoint of a run folder."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise GentrainError(f"no checkpoint in {path} (looked for checkpoints/last.pt)")
    if not path.is_file():
        raise GentrainError(f"checkpoint not found: {path}")
    return path


def digest(payload: dict) -> str:
    """SHA-256 of everything a file holds, tensors by their dtype, shape and bytes, walked in a fixed order:
    what torch.load returns hashes to the same digest exactly when nothing in it changed."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                walk(str(k))
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        elif torch.is_tensor(x):
            h.update(f"<{x.dtype} {tuple(x.shape)}>".encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(payload)
    return h.hexdigest()


def peek_step(path: Path) -> int:
    """A checkpoint's step, read without loading its tensors (-1 where it cannot be read)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:
        return -1


def branches(path: Path, rollback: bool = False) -> bool:
    """Does resuming from `path` continue in a new run folder? It does when `path` is an earlier checkpoint
    of a run whose last.pt has gone further, so that the later work is kept, unless rollback=true asks to
    continue in the run's own folder from there."""
    last = run_dir_of(path) / "checkpoints" / "last.pt"
    if rollback or not last.is_file() or Path(path).resolve() == last.resolve():
        return False
    return 0 <= peek_step(path) < peek_step(last)


def save(ckpt: dict, path: Path, also: Path | None = None, kind: str = "checkpoint") -> None:
    """Write `ckpt`, with gentrain's header and the digest of its payload, to `path` (and the same bytes to
    `also`) without ever leaving a partial file there (files.atomic)."""
    payload = {"format": FORMAT, "version": VERSION, **ckpt} if kind == "checkpoint" else ckpt
    path = Path(path)
    with files.atomic(path, note=f"the previous {kind} there is intact", what=kind) as tmp:
        with open(tmp, "wb") as f:  # through Python's file: a failed write keeps its errno (files.os_error)
            torch.save({**payload, "digest": digest(payload)}, f)
        if also is not None:
            also.unlink(missing_ok=True)
            try:
                os.link(tmp, also)  # a second name for the same bytes: no second write
            except OSError:  # a filesystem without hard links
                shutil.copyfile(tmp, also)


def read(path: Path, what: str = "gentrain checkpoint"):
    """torch.load(weights_only=True) of a file that should be a `what`, its digest checked: a file that is
    not a PyTorch file, is damaged (truncated, a zip record or pickle that does not hold together), carries
    a pickle payload (which is never run), or whose contents no longer match their digest (bit rot, a
    damaged copy) is one GentrainError."""
    return _read(path, what)[0]


def _read(path: Path, what: str) -> tuple[object, bool]:
    """read(), and whether the file carried a digest that was checked."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
                raise GentrainError(f"{path} is not a {what} (not a PyTorch file)")
    except OSError as e:
        raise GentrainError(f"cannot read {path} ({files.cause(e)})") from None
    try:
        with warnings.catch_warnings():  # a damaged pickle can make torch warn (an unknown protocol) first
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, EOF, a pickle that does not parse, a pickle payload, ...
        damaged = _failed_record(path)
        refused = isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e)
        if refused and damaged is None and re.search(r"unsupported global", str(e), re.IGNORECASE):
            # an intact file whose pickle names a class or function: what an attack, not damage, looks like
            raise GentrainError(f"{path} holds Python objects that a {what} never contains; "
                                f"refusing to load it (nothing in it was run)") from None
        lines = str(e).strip().splitlines() or [type(e).__name__]
        detail = damaged or ("its pickle does not parse" if refused else lines[0])
        raise GentrainError(f"cannot read {what} {path}: it is damaged, truncated or corrupt ({detail}); use "
                            f"another copy or an earlier checkpoint") from None
    verified = isinstance(obj, dict) and "digest" in obj
    if verified:
        stored = obj.pop("digest")
        if stored != digest(obj):
            raise GentrainError(f"{what} {path} is damaged: its contents do not match their digest (bit rot, or "
                                f"an incomplete copy); use another copy or an earlier checkpoint")
    return obj, verified


def _failed_record(path: Path) -> str | None:
    """What is damaged in a zip file: a record whose bytes fail their CRC-32 (which torch.load does not
    check), or its index; None for an intact archive."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception:  # a zip whose index is cut off or damaged
        return "its zip index is cut off or damaged"
    return None if bad is None else f"its record {bad} fails its CRC check"


def load(path) -> Checkpoint:
    """Read and check a gentrain checkpoint; every way it can be wrong ends in one GentrainError."""
    path = resolve(path)
    ckpt, verified = _read(path, "gentrain checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise GentrainError(f"{path} is not a gentrain checkpoint (a PyTorch file without gentrain's header)")
    if ckpt.get("version", 0) > VERSION:
        raise GentrainError(f"{path} was written by a newer gentrain (format {ckpt['version']}); upgrade gentrain")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise GentrainError(f"{path} is an incomplete gentrain checkpoint (missing {', '.join(missing)})")
    _check_facts(path, ckpt)
    if not verified and ckpt.get("version", 0) >= 2:  # every format-2 file was written with its digest
        raise GentrainError(f"gentrain checkpoint {path} is damaged: its digest is missing (a format-2 checkpoint "
                            f"carries one); use another copy or an earlier checkpoint")
    bad = nonfinite(ckpt["model"]) + [f"its fitted prior={k}" for k, prior in ckpt.get("sampling_priors", {}).items()
                                       if isinstance(prior, dict) and nonfinite(prior)]
    if bad:  # a diverged run's weights: every sample, score or code made from them would be noise or NaN
        raise GentrainError(f"{path} holds non-finite weights (NaN/inf in {', '.join(bad)}, at step {ckpt['step']}); "
                            f"{finite_alternative(path)}")
    if not verified:  # said once the file is known to be a whole checkpoint, which an old one is
        log.warning("note: %s was written before checkpoints carried a digest; loaded without verifying it", path)
    model = ckpt["config"]["model"]  # format 1: a D with R1 (a GAN's keys) left its batch norm out under auto
    if ckpt.get("version", 0) < 2 and model.get("d_norm") == "auto" and model.get("r1"):
        model["d_norm"] = "none"
    return Checkpoint(path, ckpt)


def nonfinite(weights: dict) -> list[str]:
    """The networks (a state dict key's first part: G, D, G_ema, encoder, ...) whose tensors hold a NaN or an
    inf, in order; one host sync for all of them."""
    floats = [(k, v) for k, v in weights.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in floats]).tolist()
    return list(dict.fromkeys(str(k).split(".")[0] for (k, _), ok in zip(floats, finite) if not ok))


def finite_alternative(path: Path) -> str:
    """Where to go from a checkpoint with non-finite weights: the newest checkpoint of its run whose weights
    are finite, and the command that continues the run from there."""
    run, step, newest = run_dir_of(path), -1, None
    for other in (run / "checkpoints").glob("*.pt"):
        if other.resolve() == Path(path).resolve():
            continue
        try:
            state = torch.load(other, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(state.get("step"), int) and state["step"] > step and not nonfinite(state["model"]):
                step, newest = state["step"], other
        except Exception:  # a damaged or foreign file is no way out
            continue
    if newest is None:
        return (f"no other checkpoint in {run} has finite weights: train again, with a lower optim.lr or "
                f"trainer.precision=fp32")
    return (f"the newest checkpoint of the run with finite weights is {newest} (step {step}); continue the run "
            f"from there with: gentrain resume={newest} rollback=true")


def _check_facts(path: Path, ckpt: dict) -> None:
    """What a checkpoint says about itself must hold together before anything is built from it."""
    config, facts = ckpt["config"], ckpt["data"]
    bad = None
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("model", "dataset")):
        bad = "its config is not a gentrain config"
    elif ckpt["family"] not in models.FAMILIES or config["model"].get("family") != ckpt["family"]:
        bad = f"its family {ckpt['family']!r} is not its config's model.family {config['model'].get('family')!r}"
    elif not isinstance(facts, dict) or not all(isinstance(facts.get(k), int) and not isinstance(facts.get(k), bool)
                                                 and facts[k] >= 0 for k in ("channels", "image_size")):
        bad = "its dataset facts are not the channels and image size it was sized for"
    elif not isinstance(ckpt["step"], int) or ckpt["step"] < 0 or not isinstance(ckpt["model"], dict):
        bad = "its step or weights are not a step and a state dict"
    if bad:
        raise GentrainError(f"{path} is not a consistent gentrain checkpoint: {bad}")
