"""Model families. Each exposes `phases`, `phase_parameters(phase)`, `loss(phase, x)`, `noise(n)`
and `sample(z)`; the training loop knows nothing else about them."""

from torch import nn

from gentrain import GentrainError
from gentrain.models.gan import GAN
from gentrain.models.vae import VAE

# A checkpoint names its family by one of these keys; rebuilding a model never imports a
# class path read from a file.
FAMILIES = {"gan": GAN, "vae": VAE}


def build(model_cfg: dict, channels: int, image_size: int) -> nn.Module:
    """The model described by a `model` config, sized for the dataset's channels and image size."""
    kwargs = dict(model_cfg)
    family = kwargs.pop("family", None)
    if family not in FAMILIES:
        raise GentrainError(f"model.family={family!r} is unknown; choose from {', '.join(FAMILIES)}")
    try:
        return FAMILIES[family](channels=channels, image_size=image_size, **kwargs)
    except TypeError as e:  # an unknown key such as +model.foo=1
        raise GentrainError(f"model={family}: {e}") from None
