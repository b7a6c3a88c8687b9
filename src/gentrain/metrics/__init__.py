"""Sample-quality metrics: their names, which of them apply to a model and a dataset, and (in the modules
here) the feature spaces, the domain classifier, the scores computed in them and the Evaluator."""

from gentrain.models.family import IWAE, LIKELIHOOD

METRICS = ("fid", "kid", "pr", "classes", "nll", "modes")
IMAGE_METRICS = ("fid", "kid", "pr", "classes")
# Every score that can pick best.pt: the metric that computes it, and whether lower is better.
SCORES = {"fid": ("fid", True), "kid": ("kid", True), "precision": ("pr", False), "recall": ("pr", False),
          "classes": ("classes", False), "class_kl": ("classes", True), "class_acc": ("classes", False),
          "nelbo": ("nll", True), "nll": ("nll", True), "nelbo_bpd": ("nll", True), "nll_bpd": ("nll", True),
          "distortion": ("nll", True),
          "modes": ("modes", False), "hq": ("modes", False), "mode_kl": ("modes", True)}


def skipped_metrics(compute, capabilities: frozenset | None, dataset) -> dict[str, str]:
    """The metrics of `compute` that do not apply, and why: to a model with these capabilities (None: real
    images, the floor) on a dataset with this row of the dataset table."""
    skipped = {}
    for m in compute:
        if m == "nll" and (capabilities is None or LIKELIHOOD not in capabilities):
            skipped[m] = "needs a VAE" if capabilities is not None else "real images have no model likelihood"
        elif m == "classes" and not dataset.labelled and not dataset.points:
            skipped[m] = "this dataset has no labels"
        elif m in IMAGE_METRICS and dataset.points:
            skipped[m] = "this dataset holds 2-D points, not images"
        elif m == "modes" and not dataset.modes:
            skipped[m] = "needs a dataset of known modes (ring8, grid25, stacked_mnist)"
    return skipped


def no_iwae_reason(capabilities: frozenset) -> str | None:
    """Why a likelihood model's nll has no IWAE estimate (its rate and distortion are still measured)."""
    if IWAE in capabilities:
        return None
    return ("this model's q(z|x) is not a distribution to importance-sample (a VQ-VAE's is one code per cell), "
            "so there is no IWAE estimate; its bound is -log p(x) <= distortion + rate")
