"""gentrain: train GANs and VAEs on images with one command."""

from gentrain.errors import GentrainError, Interrupted

__version__ = "0.1.0"
__all__ = ["GentrainError", "Interrupted", "__version__"]
