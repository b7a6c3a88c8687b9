"""`gentrain eval ckpt=PATH`: sample-quality and likelihood metrics, also run by training's eval_every.

An Evaluator is built once (feature network, cached reference statistics, test images) and then
scores a model, or a set of real images for the real-data floor, as a flat dict whose keys name the
feature space: fid@classifier, precision@inception, ... ; nelbo and nll are in nats per image.
"""

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from gentrain import GentrainError, checkpoint, data
from gentrain.cli import reported
from gentrain.config import config_dir
from gentrain.loop import pick_device
from gentrain.metrics import features, scores
from gentrain.sample import generate, load_model

log = logging.getLogger("gentrain")

METRICS = ("fid", "kid", "pr", "classes", "nll", "modes")
IMAGE_METRICS = ("fid", "kid", "pr", "classes")
# Every score that can pick best.pt: the metric that computes it, and whether lower is better.
SCORES = {"fid": ("fid", True), "kid": ("kid", True), "precision": ("pr", False), "recall": ("pr", False),
          "classes": ("classes", False), "class_kl": ("classes", True), "class_acc": ("classes", False),
          "nelbo": ("nll", True), "nll": ("nll", True), "nelbo_bpd": ("nll", True), "nll_bpd": ("nll", True),
          "distortion": ("nll", True),
          "modes": ("modes", False), "hq": ("modes", False)}


def cache_dir_for(metrics_cfg, dataset_cfg) -> Path:
    """metrics.cache_dir, else beside the dataset's files; never inside a user's own image folder."""
    default = Path("~/.cache/gentrain") if dataset_cfg.name == "folder" else Path(str(dataset_cfg.root))
    path = Path(str(metrics_cfg.cache_dir or default.expanduser() / "gentrain-cache")).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError("not writable")
    except OSError as e:
        raise GentrainError(f"cannot use {path} for the metrics cache ({getattr(e, 'strerror', None) or e}); "
                            f"set metrics.cache_dir to a writable folder") from None
    return path


def draw(model, n: int, seed: int, device: torch.device, batch_size: int = 500):
    """n samples on the CPU from seeded noise (the same seed gives the same samples): uint8 images, or
    a toy model's points; and the classes they were drawn for (each in turn), None if unconditional."""
    z = model.noise(n, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(n) % model.num_classes if model.num_classes else None
    samples = generate(model, z, device, batch_size, y)
    return (samples if samples.ndim == 2 else data.to_uint8(samples)), y


class Evaluator:
    """Everything metrics need that does not depend on the model, loaded once."""

    def __init__(self, metrics_cfg, dataset_cfg, family: str | None, n: int, seed: int, device: torch.device,
                 nll_n: int | None = None):
        compute = list(metrics_cfg.compute)
        unknown = [m for m in compute if m not in METRICS]
        if unknown or not compute:
            raise GentrainError(f"metrics: {unknown[0] if unknown else 'the list is empty'} is not a metric; "
                                f"choose from {', '.join(METRICS)}")
        if metrics_cfg.split not in ("train", "test"):
            raise GentrainError(f"metrics.split must be train or test, got {metrics_cfg.split!r}")
        labelled = dataset_cfg.name in data.TORCHVISION
        toy = dataset_cfg.name in data.TOY
        self.skipped = {}
        if "nll" in compute and family not in ("vae", "vqvae"):
            self.skipped["nll"] = "needs a VAE" if family else "real images have no model likelihood"
        if "classes" in compute and not labelled and not toy:
            self.skipped["classes"] = f"{dataset_cfg.name} data has no labels"
        for m in compute:
            if toy and m in IMAGE_METRICS:
                self.skipped[m] = f"{dataset_cfg.name} holds 2-D points, not images"
            if m == "modes" and not toy:
                self.skipped[m] = "needs a 2-D toy dataset (ring8, grid25)"
        self.compute = [m for m in compute if m not in self.skipped]
        if "nll" in self.compute and family == "vqvae":  # its rate and distortion are still measured
            self.skipped["nll"] = ("a VQ-VAE's q(z|x) is one code per cell, not a distribution to importance-sample, "
                                   "so there is no IWAE estimate; its bound is -log p(x) <= distortion + rate")
        self.cfg, self.dataset_cfg, self.n, self.seed, self.device = metrics_cfg, dataset_cfg, n, seed, device
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
            if "modes" in self.compute:
                self.modes = data.toy_modes(dataset_cfg.name)
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
            scored = self.score_images(*draw(model, self.n, self.seed, self.device))
        if "nll" in self.compute:
            scored |= self.likelihood(model)
        return scored

    def score_images(self, images: torch.Tensor, requested: torch.Tensor | None = None) -> dict[str, float]:
        """Scores of a sample set (uint8 images, or 2-D points); `requested` are the classes a
        conditional model drew them for."""
        if "modes" in self.compute:
            means, std = self.modes
            modes, hq = scores.modes_covered(images, means, std)
            return {"modes": modes, "hq": hq}
        out = {}
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
        iwae = hasattr(model, "log_weights")
        sums = {"elbo": [], "iwae": [], "rate": [], "distortion": []} if iwae else {"rate": [], "distortion": []}
        images = self.test_images.split(batch_size)
        labels = self.test_labels.split(batch_size) if model.num_classes else [None] * len(images)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed)  # the same seed gives the same estimate; training's RNG is untouched
            for xb, yb in tqdm(list(zip(images, labels)), desc=f"NLL, k={k}", unit="batch", leave=False,
                               disable=None):
                yb = None if yb is None else yb.to(self.device)
                x = model.observe(data.to_signed(xb.to(self.device)))
                values = {}
                if iwae:
                    log_w = model.log_weights(x, k, y=yb)
                    values = {"elbo": log_w.mean(1), "iwae": log_w.logsumexp(1) - math.log(k)}
                values["rate"], values["distortion"] = model.rate_distortion(x, yb)
                for key, v in values.items():
                    sums[key].append(v.double().cpu())
        mean = {key: torch.cat(v).mean().item() for key, v in sums.items()}
        if not iwae:
            return {"rate_bits": mean["rate"] / math.log(2), "rate_uniform_bits": model.code_bits(),
                    "distortion": mean["distortion"]}
        nelbo, nll = -mean["elbo"], -mean["iwae"]
        bpd = 1 / (dims * math.log(2))
        return {"nelbo": nelbo, "nll": nll, "nelbo_bpd": nelbo * bpd, "nll_bpd": nll * bpd,
                "rate_bits": mean["rate"] / math.log(2), "distortion": mean["distortion"]}


def protocol(model_cfg: dict) -> dict:
    """What a VAE's likelihood numbers mean, for eval.json."""
    likelihood, binarize = model_cfg.get("likelihood"), model_cfg.get("binarize", False)
    if likelihood == "bernoulli" and binarize:
        what = "log-likelihood of dynamically binarised images (the test split binarised once, by the seed)"
    elif likelihood == "dlogistic":
        what = "log-likelihood of the 8-bit images (discretised logistic)"
    elif likelihood == "bernoulli":
        what = "Bernoulli cross-entropy of grey pixels: not a normalised likelihood, not comparable"
    else:
        what = "density of continuous pixels in [0, 1]: not comparable to discrete likelihoods"
    return {"likelihood": likelihood, "binarize": binarize, "meaning": what}


def table(result: dict) -> str:
    lines = [f"{k:<24} {v:.6g}" if isinstance(v, float) else f"{k:<24} {v}" for k, v in result["metrics"].items()]
    lines += [f"{k:<24} skipped: {why}" for k, why in result["skipped"].items()]
    head = [f"{result['what']}, n={result['n']}, seed={result['seed']}"]
    head += [f"{name}: {text}" for name, text in result["spaces"].items()]
    return "\n".join(head + [f"{'metric':<24} value"] + lines)


@hydra.main(config_path=str(config_dir()), config_name="eval", version_base="1.3")
@reported
def main(cfg: DictConfig) -> None:
    if isinstance(cfg.n, bool) or not isinstance(cfg.n, int) or cfg.n < 2:
        raise GentrainError(f"n must be an integer of at least 2, got {cfg.n!r}")
    device = pick_device(cfg.device, key="device")
    if cfg.ckpt is not None and cfg.get("dataset") is not None:
        raise GentrainError("a checkpoint brings its own dataset: drop dataset= (data_root=PATH points at its files "
                            "elsewhere), or drop ckpt= to score the real data")
    if cfg.ckpt is not None:
        path = checkpoint.resolve(cfg.ckpt)
        model, ckpt = load_model(path, device, cfg.ema)
        dataset_cfg = OmegaConf.create(ckpt["config"]["dataset"])
        family, what = ckpt["family"], f"{path} ({ckpt['family']}, step {ckpt['step']})"
        out = Path(str(cfg.out)).expanduser() if cfg.out else path.parent / "eval.json"
    elif cfg.get("dataset") is not None:  # the floor: real test images scored as if they were samples
        model, dataset_cfg, family = None, cfg.dataset.copy(), None
        what = f"real {dataset_cfg.name} test images"
        out = Path(str(cfg.out)).expanduser() if cfg.out else Path(f"eval-{dataset_cfg.name}-test.json")
    else:
        raise GentrainError("set ckpt=PATH (a checkpoint or run folder), or dataset=NAME for the real-data floor")
    if cfg.data_root is not None:
        dataset_cfg.root = cfg.data_root
    evaluator = Evaluator(cfg.metrics, dataset_cfg, family, cfg.n, cfg.seed, device)
    if model is None:
        test = data.load(dataset_cfg, split="test").images
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))
        metrics = evaluator.score_images(test[order[:cfg.n]])
    else:
        metrics = evaluator(model)
    result = {"what": what, "ckpt": None if model is None else str(path), "family": family,
              "step": None if model is None else ckpt["step"], "dataset": dataset_cfg.name, "n": cfg.n,
              "seed": cfg.seed, "spaces": evaluator.describe(), "metrics": metrics, "skipped": evaluator.skipped}
    if "distortion" in metrics:
        result["nll_setup"] = {**({"k": cfg.metrics.k} if "nll" in metrics else {}),
                               "test_images": len(evaluator.test_images), **protocol(ckpt["config"]["model"])}
    print(table(result))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as e:
        raise GentrainError(f"could not write {out} ({e.strerror}); the table above has the numbers") from None
    print(f"wrote {out}")
