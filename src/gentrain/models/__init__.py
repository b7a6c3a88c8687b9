"""Model families. Each exposes `phases` (the phase runs of one training step, in order),
`phase_parameters(phase)`, `loss(phase, x, y, step)`, `noise(n)`, `sample(z)`, `num_classes` (0 when
unconditional) and optionally `after_step(phase, step)`; the training loop knows nothing else about them."""

import torch
from torch import nn

from gentrain import GentrainError
from gentrain.models.gan import GAN
from gentrain.models.vae import VAE
from gentrain.models.vqvae import VQVAE

# A checkpoint names its family by one of these keys; rebuilding a model never imports a
# class path read from a file.
FAMILIES = {"gan": GAN, "vae": VAE, "vqvae": VQVAE}


def build(model_cfg: dict, channels: int, image_size: int, num_classes: int = 0) -> nn.Module:
    """The model described by a `model` config, sized for the dataset's channels and image size
    (for 2-D points: channels is the dimension and image_size 0); conditional models get the classes."""
    kwargs = dict(model_cfg)
    if kwargs.get("conditional"):
        kwargs["num_classes"] = num_classes
    family = kwargs.pop("family", None)
    if family not in FAMILIES:
        raise GentrainError(f"model.family={family!r} is unknown; choose from {', '.join(FAMILIES)}")
    try:
        return FAMILIES[family](channels=channels, image_size=image_size, **kwargs)
    except TypeError as e:  # an unknown key such as +model.foo=1
        raise GentrainError(f"model={family}: {e}") from None


def grid_codes(model, n: int, generator: torch.Generator | None = None, label: int | None = None):
    """Latents for a sample grid, with their class labels and row length: a conditional model gets one
    class per row (or every image of class `label`); an unconditional one about a square grid."""
    classes = model.num_classes
    if not classes:
        return model.noise(n, generator=generator), None, None
    if label is not None:
        return model.noise(n, generator=generator), torch.full((n,), label, dtype=torch.long), None
    cols = max(1, n // classes)
    return model.noise(classes * cols, generator=generator), torch.arange(classes).repeat_interleave(cols), cols
