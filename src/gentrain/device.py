"""Where a command runs and in what precision: decided once, from the config, by the verb that runs."""

import torch

from gentrain.errors import GentrainError

# The autocast dtype of each trainer.precision. fp32 and tf32 both keep fp32 weights and activations;
# tf32 lets CUDA's matrix multiplies and convolutions round their inputs to TF32 on tensor cores.
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str, key: str = "trainer.device") -> torch.device:
    """auto | cpu | cuda -> the device; cuda where torch sees none is an error naming `key`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GentrainError(f"{key}=cuda but torch sees no CUDA GPU; use {key}=cpu or auto")
    if name not in ("cpu", "cuda"):
        raise GentrainError(f"{key} must be one of auto|cpu|cuda, got {name!r}")
    return torch.device(name)


def pick_precision(name: str, device: torch.device, key: str = "trainer.precision") -> torch.dtype | None:
    """trainer.precision -> the autocast dtype, or None for plain fp32. auto: bf16 on a GPU that has it."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None
    if name not in PRECISIONS:
        raise GentrainError(f"{key} must be one of auto|{'|'.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def use_tf32(device: torch.device, precision: str) -> None:
    """On CUDA: TF32 tensor cores for fp32 matrix multiplies and convolutions everywhere but precision=fp32,
    which asks for IEEE fp32 (under bf16 or fp16 autocast they run in those; TF32 reaches what autocast keeps
    in fp32)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"

