"""The prior a VAE's samples are drawn from, `gentrain sample|eval prior=...`: N(0, I), the prior it was
trained with, or a Gaussian mixture fitted to the posterior means of its training images
(models/prior.py), fitted once per checkpoint and kept in it."""

import time

import torch
from tqdm import tqdm

from gentrain import checkpoint, data
from gentrain.errors import GentrainError
from gentrain.images import to_signed
from gentrain.models.family import LATENT_PRIOR
from gentrain.models.prior import GaussianMixture


def use(model, ckpt: checkpoint.Checkpoint, kind: str, components: int, device: torch.device,
        data_root=None, batch_size: int = 500) -> str:
    """Set `model`'s sampling prior to `kind`, fitting it first if the checkpoint holds none with
    `components` components; returns a line that says what the samples are drawn from."""
    if kind == "gaussian":
        return "N(0, I), the prior the model was trained with"
    if LATENT_PRIOR not in model.capabilities:
        raise GentrainError(f"prior={kind} is fitted to a VAE's continuous codes; {ckpt.path} is a {ckpt.family} "
                            f"(leave prior=gaussian)")
    stored = ckpt.sampling_prior(kind)
    if stored is not None and stored["components"] == components:
        mixture = GaussianMixture.from_state(stored)
        model.latent_prior = mixture
        return f"{mixture.describe()} fitted to {stored['fitted_to']} (kept in {ckpt.path})"
    started = time.perf_counter()
    train = data.load(ckpt.dataset_config(data_root), split="train")
    z = posterior_means(model, train.images, train.labels if model.num_classes else None, device, batch_size)
    mixture, loglik = GaussianMixture.fit(z, components)
    fitted_to = f"the posterior means of {len(z):,} training images"
    state = {**mixture.state_dict(), "components": components, "fitted_to": fitted_to, "loglik": loglik}
    try:
        checkpoint.store_sampling_prior(ckpt, kind, state)
        kept = f"kept in {ckpt.path} for the next call"
    except GentrainError as e:
        kept = f"not kept: {e}"
    model.latent_prior = mixture
    return (f"{mixture.describe()} fitted to {fitted_to} (mean log-likelihood {loglik:.2f} nats, "
            f"{time.perf_counter() - started:.0f} s; {kept})")


@torch.inference_mode()
def posterior_means(model, images: torch.Tensor, labels: torch.Tensor | None, device: torch.device,
                    batch_size: int) -> torch.Tensor:
    """The means of q(z|x) of uint8 images, flat, on the CPU."""
    out, xs = [], images.split(batch_size)
    ys = labels.split(batch_size) if labels is not None else [None] * len(xs)
    for x, y in tqdm(list(zip(xs, ys)), desc="encoding", unit="batch", leave=False, disable=None):
        x = to_signed(x).to(device)
        out.append(model.posterior_means(x, None if y is None else y.to(device)).double().cpu())
    return torch.cat(out)
