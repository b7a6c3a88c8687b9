"""The metric maths on feature sets. FID, KID and precision/recall come from torch-fidelity (the
reference implementations ported from TTUR and the papers' code), not from code written here."""

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric


def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean and covariance of a feature set, in float64 (FID's Gaussian fit)."""
    f = features.double().numpy()
    return {"mu": f.mean(0), "sigma": np.atleast_2d(np.cov(f, rowvar=False))}


def fid(stats_1: dict, stats_2: dict) -> float:
    """Frechet distance between Gaussian fits (Heusel et al. 2017, Eq. 6):
        FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))."""
    return fid_statistics_to_metric(stats_1, stats_2, verbose=False)["frechet_inception_distance"]


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, seed: int) -> tuple[float, float]:
    """Kernel distance (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3, averaged over random subsets; returns (mean, std over subsets)."""
    out = kid_features_to_metric(real, fake, kid_subsets=subsets, kid_subset_size=min(subset_size, len(real), len(fake)),
                                 rng_seed=seed, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eqs. 1-3): precision is the share of
    fakes inside the real manifold (the union of balls reaching each real point's k-th nearest real
    neighbour), recall the share of reals inside the fake manifold."""
    out = prc_features_to_metric(fake, real, prc_neighborhood=k, verbose=False)
    return out["precision"], out["recall"]


def class_histogram(predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(predicted, minlength=num_classes).double() / len(predicted)


def classes_covered(hist: torch.Tensor) -> int:
    """Classes that receive at least a quarter of a uniform share, 1 / (4 * classes), of the samples:
    a collapsed generator leaves some classes (nearly) empty."""
    return int((hist >= 1 / (4 * len(hist))).sum())


def class_kl(fake_hist: torch.Tensor, real_hist: torch.Tensor, eps: float = 1e-12) -> float:
    """KL(p_fake || p_real) of the predicted-class histograms, in nats (0 when the class mix matches).
    This direction stays finite when a class is missing from the samples."""
    p, q = fake_hist, real_hist.clamp_min(eps)
    return float((p * (p.clamp_min(eps) / q).log()).sum())


def class_accuracy(predicted: torch.Tensor, requested: torch.Tensor) -> float:
    """Share of a conditional model's samples that the classifier puts in the class they were drawn for."""
    return float((predicted == requested).double().mean())


def modes_covered(points: torch.Tensor, means: torch.Tensor, std: float) -> tuple[int, float]:
    """The mode-collapse scores of VEEGAN (Srivastava et al. 2017, Sec. 5.1) and PacGAN (Lin et al. 2018):
    a sample is high quality when it lies within 3 standard deviations of its nearest mode, and a mode
    is covered when it is the nearest mode of at least one high-quality sample. Returns (modes covered,
    share of high-quality samples)."""
    dist = torch.cdist(points.double(), means.double())
    nearest, hq = dist.argmin(1), dist.min(1).values <= 3 * std
    return int(nearest[hq].unique().numel()), float(hq.double().mean())


def stacked_modes(digits: torch.Tensor, modes: int = 1000) -> tuple[int, float]:
    """Stacked MNIST's scores (Srivastava et al. 2017, VEEGAN, Sec. 5.2 and Table 2; Lin et al. 2018, PacGAN,
    Table 2): the digits (N, 3) the classifier reads in each channel name one of the 1,000 modes; returns the
    modes that at least one sample falls in, and the reverse KL of the samples' mode histogram p to the
    uniform data distribution, KL(p || U) = sum_m p_m log(1000 p_m) in nats, as PacGAN's code computes it
    (0 for a perfectly even spread; log 1000 = 6.9 when every sample is one mode)."""
    mode = digits[:, 0] * 100 + digits[:, 1] * 10 + digits[:, 2]
    p = torch.bincount(mode, minlength=modes).double() / len(mode)
    seen = p[p > 0]
    return int(len(seen)), float((seen * (seen * modes).log()).sum())
