"""Decoder likelihoods p(x|z) of the VAE: log p(x|z) per image from the decoder's output, and the image
the output stands for. Pixels arrive in [0, 1]; `model.likelihood=` picks one.

bernoulli  out: logits, one per pixel. On binarised pixels (model.binarize=true) a true likelihood of
           {0, 1} images, the standard MNIST NLL protocol. On grey pixels it is the cross-entropy of the
           classic example, a training objective rather than a normalised density.
gaussian   out: the mean (model.sigma fixed) or the mean and log sigma (model.sigma=null, learned per
           pixel). A density of continuous pixels in [0, 1]: its nats are not comparable to a discrete
           likelihood's.
dlogistic  out: the mean and log scale of a logistic per sub-pixel, discretised to the 256 values an
           8-bit image can take (Salimans et al. 2017, PixelCNN++, Eq. 2; Kingma et al. 2016, IAF): a
           true likelihood of 8-bit images, reported in bits per dimension.
"""

import math

import torch
import torch.nn.functional as F

LIKELIHOODS = ("bernoulli", "gaussian", "dlogistic")


def out_channels(likelihood: str, channels: int, sigma: float | None) -> int:
    """How many decoder output channels the likelihood reads per image channel."""
    two = likelihood == "dlogistic" or (likelihood == "gaussian" and sigma is None)
    return 2 * channels if two else channels


def log_prob(out: torch.Tensor, x01: torch.Tensor, likelihood: str, sigma: float | None = None) -> torch.Tensor:
    """log p(x|z) per image, in nats, summed over every pixel and channel."""
    if likelihood == "bernoulli":
        logp = -F.binary_cross_entropy_with_logits(out, x01, reduction="none")
    elif likelihood == "gaussian":
        # log N(x; mu, s^2) = -(x - mu)^2 / (2 s^2) - log s - log(2 pi) / 2
        mu, log_s = (out, torch.full_like(out, math.log(sigma))) if sigma is not None else out.chunk(2, 1)
        logp = -0.5 * ((x01 - mu) * torch.exp(-log_s)) ** 2 - log_s - 0.5 * math.log(2 * math.pi)
    else:
        logp = discretized_logistic(out, x01)
    return logp.flatten(1).sum(1)


def discretized_logistic(out: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
    """log P(x) of 8-bit pixels under a logistic(mu, s) discretised into 256 bins (PixelCNN++, Eq. 2):
        P(x) = sigmoid((x + 1/255 - mu) / s) - sigmoid((x - 1/255 - mu) / s)
    with x rescaled to [-1, 1] (bin width 2/255), the lowest bin taking all mass below it and the highest
    all mass above it. `out` holds mu and log s for every sub-pixel."""
    mu, log_s = out.chunk(2, 1)
    log_s = log_s.clamp(min=-7.0)
    x = x01 * 2 - 1
    inv_s = torch.exp(-log_s)
    plus, minus = inv_s * (x - mu + 1 / 255), inv_s * (x - mu - 1 / 255)
    log_cdf_plus = F.logsigmoid(plus)              # log sigmoid(plus), for the lowest bin
    log_one_minus_cdf_minus = -F.softplus(minus)   # log (1 - sigmoid(minus)), for the highest bin
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    # Where a bin is so narrow against s that the difference underflows, use the density at its centre
    # times the bin width: log pdf(x) + log(2/255).
    mid = inv_s * (x - mu)
    log_pdf_mid = mid - log_s - 2 * F.softplus(mid)
    inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid + math.log(2 / 255))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, inner))


def mean(out: torch.Tensor, likelihood: str, sigma: float | None = None) -> torch.Tensor:
    """The image the output stands for, in [0, 1]: the mean of p(x|z) (the logistic's location for
    dlogistic, the mode of its bins)."""
    if likelihood == "bernoulli":
        return torch.sigmoid(out)
    if likelihood == "dlogistic" or sigma is None:
        out = out.chunk(2, 1)[0]
        return ((out + 1) / 2).clamp(0, 1) if likelihood == "dlogistic" else out.clamp(0, 1)
    return out.clamp(0, 1)


def protocol(likelihood: str, binarize: bool) -> dict:
    """What a model's likelihood numbers mean, for eval.json."""
    if likelihood == "bernoulli" and binarize:
        what = "log-likelihood of dynamically binarised images (the test split binarised once, by the seed)"
    elif likelihood == "dlogistic":
        what = "log-likelihood of the 8-bit images (discretised logistic)"
    elif likelihood == "bernoulli":
        what = "Bernoulli cross-entropy of grey pixels: not a normalised likelihood, not comparable"
    else:
        what = "density of continuous pixels in [0, 1]: not comparable to discrete likelihoods"
    return {"likelihood": likelihood, "binarize": binarize, "meaning": what}
