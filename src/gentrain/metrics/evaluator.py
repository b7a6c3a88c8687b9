"""The Evaluator behind `gentrain eval` and training's eval_every: sample-quality and likelihood metrics.

An Evaluator is built once (feature network, cached reference statistics, test images) and then
scores a model, or a set of real images for the real-data floor, as a flat dict whose keys name the
feature space: fid@classifier, precision@inception, ... ; nelbo and nll are in nats per image. What it
scores follows the model's capabilities (models/family.py), not its family's name.
"""

import errno
import hashlib
import logging
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

from gentrain import data, files
from gentrain.errors import GentrainError
from gentrain.images import to_signed, to_uint8
from gentrain.metrics import IMAGE_METRICS, METRICS, SCORES, features, no_iwae_reason, scores, skipped_metrics
from gentrain.models import generate
from gentrain.models.family import CODEC, IWAE

log = logging.getLogger("gentrain")

def cache_dir_for(metrics_cfg, dataset_cfg) -> Path:
    """metrics.cache_dir, else beside the dataset's files; never inside a user's own image folder."""
    default = Path("~/.cache/gentrain") if dataset_cfg.name == "folder" else Path(str(dataset_cfg.root))
    path = Path(str(metrics_cfg.cache_dir or default.expanduser() / "gentrain-cache")).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as e:
        raise GentrainError(f"cannot use {path} for the metrics cache ({files.cause(e)}); "
                            f"set metrics.cache_dir to a writable folder") from None
    return path


def draw(model, n: int, seed: int, device: torch.device, batch_size: int = 500, amp: torch.dtype | None = None):
    """n samples on the CPU from seeded noise (the same seed gives the same samples), drawn under autocast
    to `amp`: uint8 images, or a toy model's points; and the classes they were drawn for (each in turn),
    None if unconditional."""
    z = model.noise(n, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(n) % model.num_classes if model.num_classes else None
    samples = generate(model, z, device, batch_size, y, amp)
    return (samples if samples.ndim == 2 else to_uint8(samples)), y


class Evaluator:
    """Everything metrics need that does not depend on the model, loaded once."""

    def __init__(self, metrics_cfg, dataset_cfg, capabilities: frozenset | None, n: int, seed: int,
                 device: torch.device, nll_n: int | None = None, amp: torch.dtype | None = None,
                 batch_size: int = 500):
        """`capabilities` are the model's (None: real images, the floor); samples are drawn batch_size at a
        time under autocast to `amp` (bf16 on a GPU: the model's forward passes are most of a GPU's eval)."""
        compute = list(metrics_cfg.compute)
        unknown = [m for m in compute if m not in METRICS]
        if unknown or not compute:
            raise GentrainError(f"metrics: {unknown[0] if unknown else 'the list is empty'} is not a metric; "
                                f"choose from {', '.join(METRICS)}")
        table = data.dataset(dataset_cfg.name)
        labelled = table.labelled
        self.skipped = skipped_metrics(compute, capabilities, table)
        self.compute = [m for m in compute if m not in self.skipped]
        if "nll" in self.compute and no_iwae_reason(capabilities):  # its rate and distortion are still measured
            self.skipped["nll"] = no_iwae_reason(capabilities)
        self.cfg, self.dataset_cfg, self.n, self.seed, self.device = metrics_cfg, dataset_cfg, n, seed, device
        self.amp, self.batch_size = amp, batch_size
        # Building the feature network (perhaps training it) must not move the global RNG of a
        # training run that is being watched.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.space = self.class_space = None
            if set(IMAGE_METRICS) & set(self.compute):
                cache = cache_dir_for(metrics_cfg, dataset_cfg)
            split_images = lambda: data.load(dataset_cfg, split=metrics_cfg.split).images
            if {"fid", "kid", "pr"} & set(self.compute):
                self.space = features.space(metrics_cfg, dataset_cfg, labelled, cache, device)
                self.ref = self._reference(self.space, split_images, cache)
            if "classes" in self.compute:
                self.class_space = self.space if self.space and self.space.name == "classifier" else \
                    features.classifier_space(dataset_cfg, cache, device)
                self.class_ref = self._reference(self.class_space, split_images, cache)
            if "modes" in self.compute and table.points:
                self.modes = data.toy_modes(dataset_cfg.name)
            elif "modes" in self.compute:  # Stacked MNIST: each channel is read by the MNIST classifier
                self.read_digits = features.digit_reader(dataset_cfg, cache_dir_for(metrics_cfg, dataset_cfg), device)
            if "nll" in self.compute:
                test = data.load(dataset_cfg, split="test")
                nll_n = nll_n or metrics_cfg.nll_n or len(test.images)
                self.test_images = test.images[:nll_n]
                self.test_labels = None if test.labels is None else test.labels[:nll_n]

    def _reference(self, fs, split_images, cache):
        d = self.dataset_cfg
        name = d.name
        if name == "folder":  # one cache serves many folders: name this one by its path
            where = str(Path(str(d.root)).expanduser().resolve())
            name = f"folder-{hashlib.sha1(where.encode()).hexdigest()[:8]}-{d.channels}ch"
        return features.reference(fs, split_images, name, self.cfg.split, d.image_size, self.cfg.ref_n, cache)

    def key(self, name: str) -> tuple[str, bool]:
        """A score's name as computed (fid -> fid@classifier) and whether lower is better; for best.pt."""
        metric, lower = SCORES.get(name, (None, None))
        if metric not in self.compute:
            computed = [n for n, (m, _) in SCORES.items() if m in self.compute]
            raise GentrainError(f"trainer.eval_metric={name} is not computed here; choose from {', '.join(computed)}")
        points = data.dataset(self.dataset_cfg.name).points
        if (name == "hq" and not points) or (name == "mode_kl" and points):
            raise GentrainError(f"trainer.eval_metric={name} is not computed on {self.dataset_cfg.name}; "
                                f"use {'modes or mode_kl' if not points else 'modes or hq'}")
        space = self.class_space if metric == "classes" else None if metric in ("nll", "modes") else self.space
        return (f"{name}@{space.name}" if space else name), lower

    def describe(self) -> dict:
        out = {"reference": f"{self.dataset_cfg.name} {self.cfg.split} split"}
        for fs in (self.space, self.class_space):
            if fs is not None:
                out[fs.name] = fs.description
        return out

    def __call__(self, model) -> dict[str, float]:
        """Scores of a model: its n seeded samples against the reference, and for a VAE the test ELBO/NLL
        (a VQ-VAE: its rate and distortion)."""
        scored = {}
        if self.space or self.class_space or "modes" in self.compute:
            scored = self.score_images(*draw(model, self.n, self.seed, self.device, self.batch_size, self.amp))
        if "nll" in self.compute:
            scored |= self.likelihood(model)
        return scored

    def score_images(self, images: torch.Tensor, requested: torch.Tensor | None = None) -> dict[str, float]:
        """Scores of a sample set (uint8 images, or 2-D points); `requested` are the classes a
        conditional model drew them for."""
        if "modes" in self.compute and images.ndim == 2:
            means, std = self.modes
            modes, hq = scores.modes_covered(images, means, std)
            return {"modes": modes, "hq": hq}
        out = {}
        if "modes" in self.compute:
            digits = self.read_digits(data.stacked_digits(images)).view(len(images), 3)
            out["modes"], out["mode_kl"] = scores.stacked_modes(digits)
        if self.space is not None:
            feats, logits = self.space.extract(images)
            at = "@" + self.space.name
            if "fid" in self.compute:
                ref_stats = {"mu": self.ref["mu"].numpy(), "sigma": self.ref["sigma"].numpy()}
                out["fid" + at] = scores.fid(scores.statistics(feats), ref_stats)
            # KID and precision/recall compare equal numbers of real and generated features.
            m = min(len(feats), len(self.ref["features"]))
            real, fake = self.ref["features"][:m], feats[:m]
            if "kid" in self.compute:
                out["kid" + at], out["kid_std" + at] = scores.kid(real, fake, self.cfg.kid_subsets,
                                                                  self.cfg.kid_subset_size, self.seed)
            if "pr" in self.compute:
                out["precision" + at], out["recall" + at] = scores.precision_recall(real, fake, self.cfg.pr_k)
        if self.class_space is not None:
            logits = logits if self.class_space is self.space else self.class_space.extract(images)[1]
            hist = scores.class_histogram(logits.argmax(1), self.class_space.num_classes)
            out["classes@classifier"] = scores.classes_covered(hist)
            out["class_kl@classifier"] = scores.class_kl(hist, self.class_ref["class_hist"])
            if requested is not None:
                out["class_acc@classifier"] = scores.class_accuracy(logits.argmax(1), requested)
        return out

    @torch.no_grad()
    def likelihood(self, model, batch_size: int = 100) -> dict[str, float]:
        """Test -ELBO and the IWAE estimate of -log p(x) (Burda et al. 2016, Eq. 8) with k samples, per
        image in nats and per dimension in bits; and the -ELBO's two parts (Alemi et al. 2018): the rate,
        what the code costs in bits per image, and the distortion in nats per image. A binarising model
        scores the test images binarised once, by the seed. A VQ-VAE has no samples of z to weigh: its
        rate is what its codes cost under its PixelCNN prior, beside rate_uniform_bits, their cost at a
        fixed length of log2(K) bits per cell."""
        k, dims = self.cfg.k, self.test_images[0].numel()
        iwae = IWAE in model.capabilities
        sums = {"elbo": [], "iwae": [], "rate": [], "distortion": []} if iwae else {"rate": [], "distortion": []}
        images = self.test_images.split(batch_size)
        labels = self.test_labels.split(batch_size) if model.num_classes else [None] * len(images)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed)  # the same seed gives the same estimate; training's RNG is untouched
            for xb, yb in tqdm(list(zip(images, labels)), desc=f"NLL, k={k}", unit="batch", leave=False,
                               disable=None):
                yb = None if yb is None else yb.to(self.device)
                x = model.observe(to_signed(xb.to(self.device)))
                values = {}
                if iwae:
                    log_w = model.log_weights(x, k, y=yb)
                    values = {"elbo": log_w.mean(1), "iwae": log_w.logsumexp(1) - math.log(k)}
                values["rate"], values["distortion"] = model.rate_distortion(x, yb)
                for key, v in values.items():
                    sums[key].append(v.double().cpu())
        mean = {key: torch.cat(v).mean().item() for key, v in sums.items()}
        if not iwae:
            out = {"rate_bits": mean["rate"] / math.log(2)}
            if CODEC in model.capabilities and model.num_codes:  # discrete codes at a fixed length
                out["rate_uniform_bits"] = math.prod(model.code_shape) * math.log2(model.num_codes)
            return out | {"distortion": mean["distortion"]}
        nelbo, nll = -mean["elbo"], -mean["iwae"]
        bpd = 1 / (dims * math.log(2))
        return {"nelbo": nelbo, "nll": nll, "nelbo_bpd": nelbo * bpd, "nll_bpd": nll * bpd,
                "rate_bits": mean["rate"] / math.log(2), "distortion": mean["distortion"]}
