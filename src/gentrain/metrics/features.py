"""Feature spaces for the sample-quality metrics, and the reference statistics of real data, cached.

`classifier`: the penultimate layer of gentrain's own domain classifier (labelled datasets, offline).
`inception`:  the 2048-d pool features of the TF-FID InceptionV3 (the pytorch-fid/TTUR weights) as
              torch-fidelity ships it, images resized to 299 px with TF1's bilinear resize.
Every number carries its space's name (`fid@classifier`), since FIDs from different spaces are not
comparable.
"""

import contextlib
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from gentrain import checkpoint, data
from gentrain.errors import GentrainError
from gentrain.images import to_signed
from gentrain.metrics import classifier, scores

log = logging.getLogger("gentrain")

KEPT = 10_000  # reference features kept for KID and precision/recall (FID uses the whole split)


@dataclass
class FeatureSpace:
    name: str         # classifier | inception
    description: str  # what a reader needs to judge the numbers, printed beside them
    key: str          # identifies the exact network and resize mode in cache file names
    # uint8 images (N, C, H, W) -> features (N, d) float32 and class logits (N, classes) or None
    extract: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    num_classes: int = 0
    test_accuracy: float | None = None


def _batched(fn, images: torch.Tensor, device: torch.device, batch_size: int):
    feats, logits = [], []
    with torch.no_grad():
        for chunk in tqdm(images.split(batch_size), desc="features", unit="batch", leave=False, disable=None):
            f, l = fn(chunk.to(device))
            feats.append(f.float().cpu())
            logits.append(None if l is None else l.float().cpu())
    return torch.cat(feats), (None if logits[0] is None else torch.cat(logits))


def classifier_space(dataset_cfg, cache_dir: Path, device: torch.device) -> FeatureSpace:
    model, info, path = classifier.ensure(dataset_cfg, cache_dir, device)
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:8]  # a retrained classifier is a new space

    def extract(images):
        return _batched(lambda x: model(to_signed(x)), images, device, 1000)

    acc = info["test_accuracy"]
    return FeatureSpace("classifier", f"classifier ({info['dataset']} {info['image_size']}px, "
                        f"test accuracy {100 * acc:.2f}%)", f"classifier-{info['dataset']}-{info['image_size']}px-{digest}",
                        extract, info["num_classes"], acc)


def digit_reader(dataset_cfg, cache_dir: Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The digit gentrain's MNIST classifier (28 px) reads in each single-channel uint8 image, resized to
    28 px first: how Stacked MNIST's modes are told apart (VEEGAN and PacGAN use an MNIST classifier too).
    The MNIST files are only read if the classifier has to be trained (it ships with gentrain)."""
    from omegaconf import OmegaConf

    mnist = OmegaConf.create({"name": "mnist", "root": str(dataset_cfg.root), "image_size": 28,
                              "download": dataset_cfg.get("download", True)})
    model, info, _ = classifier.ensure(mnist, cache_dir, device)
    log.info("modes: each channel read by the MNIST classifier (test accuracy %.2f%%)", 100 * info["test_accuracy"])

    def read(images):
        if images.shape[-1] != 28:
            images = data.resize(images, 28)
        return _batched(lambda x: model(to_signed(x)), images, device, 1000)[1].argmax(1)

    return read


def inception_space(weights: str | None, device: torch.device) -> FeatureSpace:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

    if weights is not None:
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise GentrainError(f"metrics.inception_weights={weights}: no such file")
        try:  # check the file is a plain state dict before torch-fidelity unpickles it
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise GentrainError(f"metrics.inception_weights={path} is not a PyTorch state dict of InceptionV3 weights "
                                f"(expected {URL_INCEPTION_V3.rsplit('/', 1)[1]})") from None
    said = io.StringIO()  # torch.hub announces a download on stderr; say it only if it worked
    try:
        with contextlib.redirect_stderr(said):
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=
                                              None if weights is None else str(path), verbose=False).to(device)
    except OSError as e:  # urllib's URLError is an OSError: offline, proxy, DNS, ...
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise GentrainError(f"the InceptionV3 weights are not cached and could not be downloaded ({getattr(e, 'reason', e)}); "
                            f"download {URL_INCEPTION_V3} into {cache}/ or pass metrics.inception_weights=PATH") from None
    except RuntimeError as e:  # load_state_dict: wrong keys or shapes
        raise GentrainError(f"metrics.inception_weights={weights} does not hold InceptionV3 weights "
                            f"({str(e).splitlines()[0]})") from None

    if said.getvalue().strip():
        log.info(said.getvalue().strip())

    def extract(images):
        rgb = lambda x: (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x,)  # greyscale -> 3 equal channels
        return _batched(lambda x: (net(*rgb(x))[0], None), images, device, 200)

    name = "2015-12-05" if weights is None else Path(str(weights)).stem
    return FeatureSpace("inception", f"inception (InceptionV3 pool3, weights {name}, TF1 bilinear resize to 299px)",
                        f"inception-{name}-tf1bilinear299", extract)


def space(metrics_cfg, dataset_cfg, labelled: bool, cache_dir: Path, device: torch.device) -> FeatureSpace:
    features = metrics_cfg.features
    if features == "auto":
        features = "classifier" if labelled else "inception"
    if features == "classifier":
        if not labelled:
            raise GentrainError(f"metrics.features=classifier needs a labelled dataset ({', '.join(data.LABELLED)}); "
                                f"{dataset_cfg.name} has no labels: use metrics.features=inception")
        return classifier_space(dataset_cfg, cache_dir, device)
    if features == "inception":
        return inception_space(metrics_cfg.inception_weights, device)
    raise GentrainError(f"metrics.features must be one of auto|classifier|inception, got {features!r}")


def reference(fs: FeatureSpace, images_of_split: Callable[[], torch.Tensor], dataset: str, split: str,
              image_size: int, ref_n: int | None, cache_dir: Path) -> dict:
    """Statistics of the real split in feature space `fs`, computed once and cached on disk:
    mean and covariance over ref_n images (all when None), KEPT of their features in a seeded random
    order for KID and precision/recall, and the predicted-class histogram."""
    path = cache_dir / f"reference-{dataset}-{split}-{image_size}px-{fs.key}-n{ref_n or 'all'}.pt"
    if path.is_file():
        try:
            return checkpoint.read(path, "reference statistics")
        except GentrainError as e:
            log.warning("%s; recomputing them", e)
    images = images_of_split()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images = images[order[:ref_n] if ref_n else order]
    log.info("computing reference statistics of %s %s (%d images) in the %s feature space (once; cached at %s)",
             dataset, split, len(images), fs.name, path)
    feats, logits = fs.extract(images)
    stats = scores.statistics(feats)
    ref = {"n": len(images), "mu": torch.from_numpy(stats["mu"]), "sigma": torch.from_numpy(stats["sigma"]),
           "features": feats[:KEPT].clone(),
           "class_hist": None if logits is None else scores.class_histogram(logits.argmax(1), fs.num_classes)}
    try:
        checkpoint.save(ref, path, kind="reference statistics")
    except GentrainError as e:
        raise GentrainError(f"{e}; set metrics.cache_dir to a writable folder") from None
    return ref
