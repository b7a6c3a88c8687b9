"""The domain classifier: a small CNN trained on a labelled dataset's training split, stored with its
test accuracy, whose penultimate layer is the `classifier` feature space for FID/KID/PR.

For MNIST-like data an ImageNet Inception is a poor judge (its features barely separate digits), so
evaluations there customarily use a classifier trained on the domain itself, as in the "classifier
FID" of the MNIST/Fashion-MNIST literature and the mode counts of Srivastava et al. 2017 (VEEGAN).

The classifiers of MNIST and Fashion-MNIST at 28 px ship with gentrain (classifiers/, trained by `train`
below with its defaults), so their FIDs are in one fixed feature space for every user, as Inception's
fixed weights are; any other dataset or size is trained on first use and cached. A classifier trained
into the cache (`gentrain classifier retrain=true`) takes precedence over a shipped one.
"""

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from gentrain import checkpoint, data
from gentrain.data import ImageData
from gentrain.errors import GentrainError
from gentrain.images import to_signed

log = logging.getLogger("gentrain")

FORMAT, VERSION = "gentrain-classifier", 1
FEATURES = 128  # width of the penultimate layer, the feature space


class Classifier(nn.Module):
    """Three conv-BN-ReLU-pool stages, pooled to a 3x3 map (which keeps coarse position, which garments
    need) and one hidden layer; works at 28, 32 and 64 px."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        stages, c_in = [], channels
        for c_out in (width, 2 * width, 4 * width):
            stages += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.body = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(3), nn.Flatten(),
                                  nn.Linear(9 * c_in, FEATURES), nn.ReLU(True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURES, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images in [-1, 1] -> (features (N, FEATURES), logits (N, classes))."""
        h = self.body(x)
        return h, self.head(h)


SHIPPED = Path(__file__).parent / "classifiers"


def path_for(cache_dir: Path, dataset: str, image_size: int) -> Path:
    """Where a classifier trained here is cached."""
    return cache_dir / f"classifier-{dataset}-{image_size}px.pt"


def find(cache_dir: Path, dataset: str, image_size: int) -> Path | None:
    """The classifier file for a dataset and size: trained here, else shipped with gentrain, else None."""
    for path in (path_for(cache_dir, dataset, image_size), SHIPPED / f"{dataset}-{image_size}px.pt"):
        if path.is_file():
            return path
    return None


@torch.no_grad()
def accuracy(model: Classifier, data: ImageData, device: torch.device, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for x, y in zip(data.images.split(batch_size), data.labels.split(batch_size)):
        logits = model(to_signed(x.to(device)))[1]
        correct += int((logits.argmax(1).cpu() == y).sum())
    return correct / len(data.labels)


def train(train_data: ImageData, test_data: ImageData, device: torch.device, epochs: int = 5,
          batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> tuple[Classifier, float]:
    """Adam with a cosine learning-rate decay; random translations of up to 1 px as the only augmentation."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Classifier(train_data.channels, train_data.num_classes).to(device)
    images, labels = train_data.images.to(device), train_data.labels.to(device)
    per_epoch = len(images) // batch_size
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * per_epoch)
    model.train()
    bar = tqdm(total=epochs * per_epoch, desc="training the classifier", unit="step", leave=False, disable=None)
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g)[:per_epoch * batch_size].to(device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        for idx in order.view(per_epoch, batch_size):
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(to_signed(images[idx]), shifts=shift, dims=(2, 3))
            logits = model(x)[1]
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            correct += (logits.argmax(1) == labels[idx]).sum()
            bar.update(1)
        train_accuracy = correct.item() / (per_epoch * batch_size)
        bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", train_accuracy=f"{100 * train_accuracy:.2f}%")
        log.info("classifier epoch %d/%d: training accuracy %.2f%% (with dropout, over the epoch)", epoch + 1,
                 epochs, 100 * train_accuracy)
    bar.close()
    return model, accuracy(model, test_data, device)


def save(model: Classifier, path: Path, dataset: str, image_size: int, test_accuracy: float, seconds: float) -> None:
    checkpoint.save({"kind": FORMAT, "classifier_version": VERSION, "dataset": dataset, "image_size": image_size,
                     "channels": model.body[0].in_channels, "num_classes": model.head[1].out_features,
                     "test_accuracy": test_accuracy, "seconds": seconds, "model": model.state_dict()}, path,
                    kind="classifier")


def load(path: Path, device: torch.device) -> tuple[Classifier, dict]:
    stored = checkpoint.read(path, "classifier")
    try:
        model = Classifier(stored["channels"], stored["num_classes"])
        model.load_state_dict(stored["model"])
    except Exception as e:
        raise GentrainError(f"cannot read the classifier {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            f"delete it and it is retrained on next use") from None
    return model.to(device).eval(), stored


def ensure(dataset_cfg, cache_dir: Path, device: torch.device, retrain: bool = False,
           **train_kwargs) -> tuple[Classifier, dict, Path]:
    """The classifier for this dataset and image size (see find), trained and cached first if there is none
    or `retrain`; with its stored facts (dataset, test accuracy, ...) and its file."""
    path = None if retrain else find(cache_dir, dataset_cfg.name, dataset_cfg.image_size)
    if path is None:
        path = path_for(cache_dir, dataset_cfg.name, dataset_cfg.image_size)
        train_data = data.load(dataset_cfg, split="train")
        if train_data.labels is None:
            raise GentrainError(f"dataset {dataset_cfg.name} has no labels, so no classifier can be trained for it; "
                                f"use metrics.features=inception")
        test_data = data.load(dataset_cfg, split="test")
        log.info("training the %s classifier for the metrics' feature space (once; cached at %s)",
                 dataset_cfg.name, path)
        t0 = time.perf_counter()
        model, acc = train(train_data, test_data, device, **train_kwargs)
        save(model, path, dataset_cfg.name, dataset_cfg.image_size, acc, time.perf_counter() - t0)
        log.info("classifier test accuracy %.2f%% (%.0f s)", 100 * acc, time.perf_counter() - t0)
    return (*load(path, device), path)
