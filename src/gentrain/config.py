"""Where the configs live, and every verb's config checked before any work, by one mechanism: a table of
each key's type, range or choices (SCHEMAS), then the rules that join keys. A model's settings are its
family's (typed by the family's own signature, models.settings, and checked by its `check`), a dataset's
facts come from the dataset table; nothing here knows one family from another.

A key the table does not know is refused with the nearest known keys ("did you mean"), so a misspelt
`+trainer.stpes=100` never trains with the key silently ignored.
"""

import difflib
import inspect
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from gentrain import data, dist, fast, models
from gentrain.checks import anything, boolean, choice, integer, list_of, number, positive, text
from gentrain.device import PRECISIONS, pick_device
from gentrain.errors import GentrainError, unset
from gentrain.loggers import LOGGERS
from gentrain.metrics import METRICS, SCORES, skipped_metrics
from gentrain.models.prior import KINDS as PRIOR_KINDS

# The config groups: on resume these cannot change, only keys inside them.
GROUPS = ("model", "dataset", "optim", "optim/scheduler", "trainer", "baseline", "experiment")


def config_dir() -> Path:
    """configs/ ships inside the wheel as gentrain/configs; an editable install uses the checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parents[1] / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise GentrainError(f"gentrain's configs are missing (looked in {here / 'configs'}); reinstall gentrain")


DEVICE = choice("auto", "cpu", "cuda")
PRIOR = choice(*PRIOR_KINDS)
SEED = integer(0, 2 ** 63 - 1)

TRAINER = {
    "steps": integer(1), "max_minutes": positive(optional=True), "batch_size": integer(1), "device": DEVICE,
    "devices": integer(1, 1024), "sync_bn": boolean, "precision": choice("auto", *PRECISIONS),
    "channels_last": choice("auto", True, False), "compile": boolean,
    "cuda_graphs": choice("auto", True, False),
    "log_every": integer(1), "sample_every": integer(1), "ckpt_every": integer(1), "keep_every": integer(0),
    "n_samples": integer(1, 10_000), "loggers": list_of(choice(*LOGGERS), min_len=1), "wandb_project": text(),
    "eval_every": integer(0), "eval_n": integer(2), "eval_metric": choice(*SCORES),
}
DATASET = {
    "name": choice(*data.DATASETS), "root": text(), "image_size": integer(1, 65536), "download": boolean,
    "on_device": choice("auto", True, False), "hflip": boolean, "workers": integer(0, 256),
    "channels": choice(1, 3), "background": choice("white", "black"), "skip_bad": boolean,
    "n": integer(1, 100_000_000), "seed": SEED,
}
METRICS_KEYS = {
    "compute": list_of(choice(*METRICS), min_len=1), "features": choice("auto", "classifier", "inception"),
    "inception_weights": text(optional=True), "split": choice("train", "test"), "ref_n": integer(2, optional=True),
    "k": integer(1), "nll_n": integer(1, optional=True), "kid_subsets": integer(1), "kid_subset_size": integer(2),
    "pr_k": integer(1), "cache_dir": text(optional=True),
}
OPTIM = {"_target_": text(), "_partial_": choice(True), "lr": positive(), "betas": list_of(number(0, 1, below=True), 2, 2),
         "eps": positive(), "weight_decay": number(0), "momentum": number(0), "lr_*": positive(optional=True)}

SCHEMAS = {
    "train": {"seed": SEED, "resume": text(optional=True), "rollback": boolean, "trainer": TRAINER, "dataset": DATASET,
              "metrics": METRICS_KEYS, "optim": OPTIM, "model": None, "baseline": anything,
              "experiment": anything, "hparams_search": anything},
    "sample": {"ckpt": text(), "n": integer(1, 1_000_000), "seed": SEED, "out": text(optional=True),
               "mode": choice("grid", "interpolate", "reconstruct"), "device": DEVICE, "batch_size": integer(1),
               "data_root": text(optional=True), "nrow": integer(1, optional=True),
               "class": integer(0, optional=True), "ema": boolean, "prior": PRIOR, "prior_components": integer(1, 1000)},
    "eval": {"ckpt": text(optional=True), "n": integer(2, 1_000_000), "seed": SEED, "out": text(optional=True),
             "device": DEVICE, "precision": choice("auto", *PRECISIONS), "batch_size": integer(1),
             "data_root": text(optional=True), "ema": boolean, "prior": PRIOR, "prior_components": integer(1, 1000),
             "metrics": METRICS_KEYS, "dataset": DATASET},
    "encode": {"ckpt": text(), "input": text(), "out": text(), "n": integer(1, optional=True), "device": DEVICE,
               "batch_size": integer(1), "data_root": text(optional=True),
               "background": choice("white", "black", optional=True)},
    "decode": {"ckpt": text(optional=True), "input": text(), "out": text(), "device": DEVICE, "batch_size": integer(1)},
    "classifier": {"dataset": DATASET, "metrics": METRICS_KEYS, "epochs": integer(1, 1000), "batch_size": integer(1),
                   "lr": positive(), "seed": SEED, "device": DEVICE, "retrain": boolean},
}


def known_keys(verb: str) -> list[str]:
    out = []
    for key, rule in SCHEMAS[verb].items():
        out += [f"{key}.{k}" for k in rule] if isinstance(rule, dict) else [key]
    return out


def unknown(key: str, verb: str, extra: list[str] = ()) -> GentrainError:
    """A key no config of `verb` has, with the nearest known ones."""
    known = [k for k in dict.fromkeys([*known_keys(verb), *extra]) if "*" not in k]
    group = key.split(".")[0]
    if key in known and "." in key:  # e.g. `gentrain eval dataset.root=...` with no dataset picked
        where = "; a checkpoint's own data: dataset.root=PATH" if "data_root" in known else ""
        return GentrainError(f"{key} needs a {group}: add {group}=NAME{where}")
    near = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(near)}?" if near else f"; `gentrain {verb if verb != 'train' else ''} --help` lists the keys"
    return GentrainError(f"{key} is not a key of gentrain{'' if verb == 'train' else ' ' + verb}{hint.replace('  ', ' ')}")


def _check_node(verb: str, prefix: str, node, table: dict) -> None:
    for key in node:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            raise unset(full)
        rule = table.get(key) or (table.get("lr_*") if str(key).startswith("lr_") else None)
        if rule is None and key not in table:
            raise unknown(full, verb)
        if isinstance(rule, dict):
            _check_node(verb, f"{full}.", node[key], rule)
        elif rule is not None:
            rule(full, node[key])


def torch_class(target: str, module) -> type | None:
    """The class a _target_ names inside torch `module` (torch.optim, torch.optim.lr_scheduler), or None."""
    prefix = module.__name__ + "."
    cls = getattr(module, target[len(prefix):], None) if target.startswith(prefix) else None
    return cls if isinstance(cls, type) else None


def _check_optim(verb: str, optim) -> None:
    """optim: the table's keys, and any other a torch.optim optimizer's constructor takes (+optim.amsgrad=true)."""
    target = str(optim.get("_target_", ""))
    cls = torch_class(target, torch.optim)
    if cls is None:
        # The optimizer is built with hydra.utils.instantiate, also when resuming from a
        # checkpoint's stored config: only torch's own optimizers may be named there.
        raise GentrainError(f"optim._target_ must name a torch.optim optimizer, got {target!r}")
    accepts = inspect.signature(cls).parameters
    for key in optim:
        if key == "scheduler":
            _check_scheduler(verb, optim.scheduler)
            continue
        rule = OPTIM.get(key) or (OPTIM["lr_*"] if str(key).startswith("lr_") else None)
        if rule is None and key not in accepts:
            raise unknown(f"optim.{key}", verb, [f"optim.{k}" for k in accepts if k != "params"])
        if OmegaConf.is_missing(optim, key):
            raise unset(f"optim.{key}")
        if rule is not None:
            rule(f"optim.{key}", optim[key])


UNSTEPPABLE = ("LRScheduler", "ReduceLROnPlateau", "LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler")


def _check_scheduler(verb: str, scheduler) -> None:
    """optim.scheduler (optim/scheduler=linear|cosine): a torch.optim.lr_scheduler partial and the keys its
    constructor takes; null: a constant learning rate."""
    if scheduler is None:
        return
    if not isinstance(scheduler, DictConfig):
        raise GentrainError(f"optim.scheduler must be a schedule (optim/scheduler=linear|cosine) or null, got {scheduler!r}")
    target = str(scheduler.get("_target_", ""))
    cls = torch_class(target, torch.optim.lr_scheduler)
    # Instantiated from a checkpoint's stored config too: torch's own schedulers only, and those the loop
    # can step once per step with nothing else (not ReduceLROnPlateau's metric, nor the ones made of others).
    if cls is None or not issubclass(cls, torch.optim.lr_scheduler.LRScheduler) or cls.__name__ in UNSTEPPABLE:
        raise GentrainError(f"optim.scheduler._target_ must name a torch.optim.lr_scheduler schedule that steps on "
                            f"its own (LinearLR, CosineAnnealingLR, StepLR, ExponentialLR, ...), got {target!r}")
    accepts = [k for k in inspect.signature(cls).parameters if k not in ("optimizer", "last_epoch", "verbose")]
    for key in scheduler:
        if key not in ("_target_", "_partial_") and key not in accepts:
            raise unknown(f"optim.scheduler.{key}", verb, [f"optim.scheduler.{k}" for k in accepts])
        if OmegaConf.is_missing(scheduler, key):
            raise unset(f"optim.scheduler.{key}")
        if key in ("total_iters", "T_max", "step_size", "T_0"):  # a horizon or period of steps
            integer(1)(f"optim.scheduler.{key}", scheduler[key])
    choice(True)("optim.scheduler._partial_", scheduler.get("_partial_"))


def check(verb: str, cfg: DictConfig) -> None:
    """Every key of a verb's config against the table (the model's against its family), before any work."""
    table = SCHEMAS[verb]
    for key in cfg:
        if key == "hydra":
            continue
        if key not in table:
            raise unknown(str(key), verb)
        if OmegaConf.is_missing(cfg, key):
            raise unset(str(key))
        value, rule = cfg[key], table[key]
        if key == "model":
            models.check_types(value)
        elif key == "optim":
            _check_optim(verb, value)
        elif isinstance(rule, dict):
            if value is not None:
                _check_node(verb, f"{key}.", value, rule)
        else:
            rule(str(key), value)


def check_train(cfg: DictConfig) -> None:
    """A training config: every key (check), then the rules that join keys, with one clear line."""
    check("train", cfg)
    t = cfg.trainer
    # The model, by its family, against the dataset's facts; then the optimizers it has.
    facts = data.facts(cfg.dataset)
    models.check(cfg.model, facts)
    family = models.family(cfg.model.family)
    for key in (k for k in cfg.optim if str(k).startswith("lr_")):
        if key[len("lr_"):] not in family.optimizers:
            raise GentrainError(f"optim.{key}: {cfg.model.family} has no phase {key[len('lr_'):]!r}; per-phase "
                                f"learning rates are {', '.join('optim.lr_' + p for p in family.optimizers)}")
    if t.eval_every:  # the score that picks best.pt must be one evaluation computes for this model and data
        metric = SCORES[t.eval_metric][0]
        skipped = skipped_metrics([metric], family.capabilities, data.dataset(cfg.dataset.name))
        if metric not in cfg.metrics.compute or skipped:
            why = skipped.get(metric) or f"metrics.compute={list(cfg.metrics.compute)} does not compute {metric}"
            raise GentrainError(f"trainer.eval_metric={t.eval_metric} is not computed here ({why}); choose a score "
                                f"of metrics.compute, or add {metric} to it")

    if "jsonl" not in t.loggers:
        raise GentrainError(f"trainer.loggers must keep jsonl (metrics.jsonl is what a resume continues from), "
                            f"got {list(t.loggers)}")

    # Where it runs.
    device = pick_device(t.device)  # also: cuda asked for where torch sees none
    processes = max(t.devices, dist.world_size())
    if t.batch_size % processes:
        raise GentrainError(f"trainer.batch_size={t.batch_size} must split evenly over {processes} "
                            f"processes (it is the global batch)")
    if t.sync_bn and processes > 1 and device.type != "cuda":
        raise GentrainError("trainer.sync_bn=true needs GPUs (torch's SyncBatchNorm runs on CUDA only); "
                            "on CPU each process normalises its own rows")
    # A fast-path switch set to true that cannot work here:
    fast.plan(t, device, processes, facts.points, scheduled=cfg.optim.get("scheduler") is not None)
