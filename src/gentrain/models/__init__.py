"""Model families, each a class that meets the contract in family.py, and how a `model` config becomes one.

A checkpoint names its family by one of the keys of FAMILIES; rebuilding a model never imports a class
path read from a file.
"""

import inspect
import math
import re
import types
import typing

import torch
from torch import nn

from gentrain.data import DataFacts
from gentrain.errors import GentrainError
from gentrain.models.family import Family, Phase
from gentrain.models.gan import GAN
from gentrain.models.vae import VAE
from gentrain.models.vqvae import VQVAE

FAMILIES: dict[str, type[Family]] = {"gan": GAN, "vae": VAE, "vqvae": VQVAE}

__all__ = ["FAMILIES", "Family", "Phase", "build", "check", "family", "generate", "grid_codes", "settings"]


def family(name) -> type[Family]:
    if name not in FAMILIES:
        raise GentrainError(f"model.family={name!r} is unknown; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name]


def settings(model_cfg) -> tuple[type[Family], dict]:
    """The family a `model` config names, and its settings: the config's keys over the family's defaults.
    A key the family does not have (+model.foo=1) is refused."""
    given = dict(model_cfg)
    cls = family(given.pop("family", None))
    params = inspect.signature(cls).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    unknown = [k for k in given if k not in defaults or k == "num_classes"]
    if unknown:
        keys = ", ".join(k for k in defaults if k != "num_classes")
        raise GentrainError(f"model.{unknown[0]} is not a setting of model={model_cfg['family']}; its settings are {keys}")
    defaults.pop("num_classes", None)
    return cls, {**defaults, **given}


def _fits(value, hint) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is list:
        return isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig"
    return isinstance(value, hint)


def _describe(hint) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a text", list: "a list",
            type(None): "null"}.get(hint, hint.__name__)


def check_types(model_cfg) -> tuple[type[Family], dict]:
    """The family and settings of a `model` config, each setting of the type the family's constructor
    declares for it (model.ema=maybe, model.ch=1.5 are refused here)."""
    cls, s = settings(model_cfg)
    hints = typing.get_type_hints(cls.__init__)
    for key, value in s.items():
        if key in hints and not _fits(value, hints[key]):
            raise GentrainError(f"model.{key} must be {_describe(hints[key])}, got {value!r}")
    return cls, s


def check(model_cfg, facts: DataFacts) -> None:
    """Refuse a `model` config that is wrong, or wrong for data with these facts, before any data loads."""
    cls, s = check_types(model_cfg)
    cls.check(s, facts)


def build(model_cfg, channels: int, image_size: int, num_classes: int = 0) -> nn.Module:
    """The model described by a `model` config, sized for the dataset's channels and image size
    (for 2-D points: channels is the dimension and image_size 0); conditional models get the classes."""
    cls, s = check_types(model_cfg)
    cls.check(s, DataFacts(channels, image_size, num_classes))
    if s.get("conditional"):
        s["num_classes"] = num_classes
    try:
        return cls(channels=channels, image_size=image_size, **s)
    except (RuntimeError, MemoryError) as e:  # the weights do not fit: ch=100000000
        if not isinstance(e, MemoryError) and "alloc" not in str(e):
            raise
        size = re.search(r"allocate (\d+) bytes", str(e))
        asked = f" (its weights would take {int(size.group(1)) / 2**30:,.1f} GiB)" if size else ""
        raise GentrainError(f"model={model_cfg['family']} with these settings is too large to build here{asked}; "
                            f"lower model.ch or model.z_dim") from None


def grid_codes(model: Family, n: int, generator: torch.Generator | None = None, label: int | None = None):
    """Latents for a sample grid, with their class labels and row length: a conditional model gets one
    class per row (or every image of class `label`); an unconditional one about a square grid."""
    classes = model.num_classes
    if not classes:
        return model.noise(n, generator=generator), None, None
    if label is not None:
        return model.noise(n, generator=generator), torch.full((n,), label, dtype=torch.long), None
    cols = max(1, n // classes)
    return model.noise(classes * cols, generator=generator), torch.arange(classes).repeat_interleave(cols), cols


def generate(model: Family, z: torch.Tensor, device, batch_size: int, y: torch.Tensor | None = None,
             amp: torch.dtype | None = None) -> torch.Tensor:
    """model.sample over the codes z (and class labels y), batch_size at a time on `device` under inference
    mode and autocast to `amp` (None: fp32); images in [-1, 1] (or points) on the CPU, in fp32, as an
    ordinary tensor (inference tensors refuse in-place use outside inference mode). A progress bar where
    there is a terminal and more than one batch."""
    from tqdm import tqdm

    zs = z.split(batch_size)
    ys = y.split(batch_size) if y is not None else [None] * len(zs)
    batches = tqdm(zip(zs, ys), total=len(zs), desc="sampling", unit="batch", leave=False,
                   disable=None if len(zs) > 1 else True)
    device = torch.device(device)
    out = []
    for zb, yb in batches:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            x = model.sample(zb.to(device)) if yb is None else model.sample(zb.to(device), yb.to(device))
            out.append(x.float().cpu())
    return torch.cat(out)  # outside inference mode: an ordinary tensor
