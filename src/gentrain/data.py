"""Datasets: the table of those gentrain knows, each decoded once into uint8 image tensors (or drawn as 2-D
points for the toy benchmarks), image folders too large to hold streamed from disk, and the deterministic
batch order the loop draws from."""

import contextlib
import functools
import io
import itertools
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image

from gentrain import dist
from gentrain.errors import GentrainError
from gentrain.images import to_signed

log = logging.getLogger("gentrain")


class DataFacts(NamedTuple):
    """What a model is sized from: image channels (a point's dimension), image side (0 for points), and the
    number of classes (0 when unlabelled). A checkpoint stores them, so a model is rebuilt without data."""

    channels: int
    image_size: int
    num_classes: int = 0

    @property
    def points(self) -> bool:
        return self.image_size == 0

# torchvision class, folder under root, and the files it needs there (any one archive form will do)
TORCHVISION = {
    "mnist": (torchvision.datasets.MNIST, "MNIST/raw",
              "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (or their .gz)"),
    "fashion_mnist": (torchvision.datasets.FashionMNIST, "FashionMNIST/raw",
                      "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (or their .gz)"),
    "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py",
                "data_batch_1..5 and test_batch (or cifar-10-python.tar.gz in the root)"),
}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def toy_modes(name: str) -> tuple[torch.Tensor, float]:
    """The mixture components of a 2-D toy dataset: the means (M, 2) and the per-coordinate std.

    ring8:  8 Gaussians on a circle of radius 2, std 0.02 (the ring of Metz et al. 2017 and VEEGAN,
            Srivastava et al. 2017).
    grid25: 25 Gaussians at (-4 + 2i, -4 + 2j), i, j = 0..4, std 0.05 (variance 0.0025, as PacGAN,
            Lin et al. 2018).
    """
    if name == "ring8":
        angle = torch.arange(8) * (2 * math.pi / 8)
        return torch.stack([2 * angle.cos(), 2 * angle.sin()], 1), 0.02
    grid = torch.arange(5) * 2.0 - 4
    return torch.cartesian_prod(grid, grid), 0.05


def _load_toy(cfg, split: str, streamable: bool = False) -> "ImageData":
    """dataset.n points drawn once from the mixture, each component equally likely; the test split is a
    second draw. Seeded by dataset.seed, so every run trains on the same points."""
    means, std = toy_modes(cfg.name)
    g = torch.Generator().manual_seed(cfg.seed * 2 + (split == "test"))
    which = torch.randint(len(means), (cfg.n,), generator=g)
    return ImageData(means[which] + std * torch.randn(cfg.n, 2, generator=g), None)


@dataclass
class ImageData:
    images: torch.Tensor          # (N, C, H, W) uint8, or (N, 2) float points of a toy dataset
    labels: torch.Tensor | None   # (N,) int64, or None for an unlabelled folder
    num_classes: int = 0

    def __len__(self) -> int:
        return len(self.images)

    @property
    def points(self) -> bool:
        return self.images.ndim == 2

    @property
    def channels(self) -> int:
        """Image channels, or the dimension of a point."""
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        """The image side; 0 for points."""
        return 0 if self.points else self.images.shape[-1]

    @property
    def facts(self) -> DataFacts:
        return DataFacts(self.channels, self.image_size, self.num_classes)


@dataclass
class ImageFiles(torch.utils.data.Dataset):
    """An image folder read from disk batch by batch, by DataLoader workers: for folders too large to hold
    decoded in memory (or dataset.on_device=false). Item i is file i decoded exactly as an in-memory
    folder decodes it; with skip_bad, a file that cannot be decoded is replaced by the next one that can."""

    files: list[Path]
    channels: int
    image_size: int
    background: str
    skip_bad: bool
    labels = None
    num_classes = 0
    points = False

    def __len__(self) -> int:
        return len(self.files)

    @property
    def facts(self) -> DataFacts:
        return DataFacts(self.channels, self.image_size)

    def __getitem__(self, i: int) -> torch.Tensor:
        for j in range(i, i + (len(self.files) if self.skip_bad else 1)):
            path = self.files[j % len(self.files)]
            try:
                return decode_file(path, self.channels, self.background, self.image_size)
            except Exception as e:  # PIL raises many types for broken files
                error = GentrainError(f"{path} cannot be decoded ({type(e).__name__}); fix or remove it, "
                                      f"or set dataset.skip_bad=true")
        raise error


def load(dataset_cfg, split: str = "train", streamable: bool = False) -> ImageData | ImageFiles:
    """The images (or points) of a dataset config's split. With `streamable` (training), an image folder that
    dataset.on_device keeps off the device, or that is too large to hold decoded in memory, comes back as
    ImageFiles to stream from disk."""
    return dataset(dataset_cfg.name).load(dataset_cfg, split, streamable)


def _load_torchvision(name: str, dataset_cfg, split: str, streamable: bool = False) -> ImageData:
    """A torchvision dataset's split, resized to dataset.image_size."""
    cls, folder, files = TORCHVISION[name]
    root, download = Path(str(dataset_cfg.root)).expanduser(), dataset_cfg.get("download", True)
    log.info("loading %s from %s", name, root)
    printed = io.StringIO()
    # A download that fails leaves no folders behind: a mistyped dataset.root must not sprout MNIST/raw.
    new_dirs = [p for p in (root / folder, *(root / folder).parents) if not p.exists()]
    try:
        # torchvision prints every mirror it tries; the exception below says what failed, in one line.
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            ds = cls(str(root), train=split == "train", download=download)
    except Exception as e:
        for p in new_dirs:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()  # only if empty
        reason = "downloads are off (dataset.download=false)" if not download else "and it could not be downloaded"
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise GentrainError(f"{name} not found in {root / folder} (expected {files}) {reason}: {detail}. "
                            f"Put the files there or set dataset.root to a folder that has them") from None
    images = torch.as_tensor(ds.data)
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)  # CIFAR is NHWC
    data = ImageData(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long), num_classes=len(ds.classes))
    if data.image_size != dataset_cfg.image_size:
        data.images = resize(data.images, dataset_cfg.image_size)
    return data


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) resized to size x size (antialiased), 4,096 at a time."""
    return torch.cat([TF.resize(chunk, [size, size], antialias=True) for chunk in images.split(4096)])


def _load_stacked(cfg, split: str, streamable: bool = False) -> ImageData:
    """Stacked MNIST (Metz et al. 2017; Srivastava et al. 2017, VEEGAN, Sec. 5.2; Lin et al. 2018, PacGAN):
    dataset.n images, each three MNIST digits drawn independently and uniformly from the split, one per
    colour channel, so the data has 10^3 = 1,000 equally likely modes. Drawn once from dataset.seed (the
    test split from the MNIST test digits, a second draw); the modes metric tells the digits apart with
    gentrain's MNIST classifier. Unlabelled, as in the papers: the mode is what the metric finds."""
    digits = _load_torchvision("mnist", cfg, split).images  # (M, 1, size, size), resized to dataset.image_size
    g = torch.Generator().manual_seed(cfg.seed * 2 + (split == "test"))
    which = torch.randint(len(digits), (cfg.n, 3), generator=g)
    return ImageData(digits[which.flatten(), 0].view(cfg.n, 3, *digits.shape[-2:]), None)


def stacked_digits(images: torch.Tensor) -> torch.Tensor:
    """The channels of Stacked MNIST images (N, 3, H, W) as single digits (3N, 1, H, W), image by image."""
    return images.reshape(-1, 1, *images.shape[-2:])


def decode_file(path: Path, channels: int, background: str, size: int) -> torch.Tensor:
    """One image file as uint8 (channels, size, size), resized on the shorter side and centre-cropped. PIL
    decodes it: torchvision 0.29 deprecates its own decoders, and PIL reads every format listed above."""
    with warnings.catch_warnings():
        # PIL warns above 89 megapixels and refuses above twice that: the refusal is the one-line error
        # of an undecodable file, the warning would be two stray lines, and the image is resized anyway.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                # Composite transparency explicitly: converting RGBA to RGB would expose whatever colour
                # the transparent pixels happen to store.
                rgba = img.convert("RGBA")
                img = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if background == "white" else (0, 0, 0, 255))
                img.alpha_composite(rgba)
            img = img.convert("L" if channels == 1 else "RGB")
            return TF.pil_to_tensor(TF.center_crop(TF.resize(img, size, antialias=True), size))


def host_budget() -> int:
    """Bytes of decoded images gentrain holds in host memory: half of what the system has available."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = 8 * 2**30
    return available // 2


def image_files(root: Path) -> list[Path]:
    """Every image file under root, searched recursively, in sorted order; none is an error."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise GentrainError(f"no images under {root} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def _load_folder(cfg, split: str = "train", streamable: bool = False) -> ImageData | ImageFiles:
    """Every image under dataset.root (a folder has no splits: `split` is ignored)."""
    if cfg.root is None or not Path(str(cfg.root)).expanduser().is_dir():
        raise GentrainError(f"dataset.root={cfg.root} is not a folder; point it at a folder of images")
    root = Path(str(cfg.root)).expanduser()
    if cfg.channels not in (1, 3) or cfg.background not in ("white", "black"):
        raise GentrainError(f"dataset.channels must be 1 or 3 and dataset.background white or black, "
                            f"got {cfg.channels!r} and {cfg.background!r}")
    files = image_files(root)
    decoded = len(files) * cfg.channels * cfg.image_size ** 2
    on_device = on_device_setting(cfg)
    if streamable and (on_device is False or (on_device == "auto" and decoded > host_budget())):
        log.info("streaming %d image files under %s from disk (%.1f GiB decoded; dataset.on_device=%s)",
                 len(files), root, decoded / 2**30, str(on_device).lower())
        return ImageFiles(files, cfg.channels, cfg.image_size, cfg.background, cfg.skip_bad)
    log.info("decoding %d image files under %s", len(files), root)
    images, bad = [], []
    for path in files:
        try:
            images.append(decode_file(path, cfg.channels, cfg.background, cfg.image_size))
        except Exception as e:  # PIL raises many types for broken files
            bad.append((path, e))
    if bad and (not cfg.skip_bad or not images):
        path, e = bad[0]
        raise GentrainError(f"{len(bad)} of {len(files)} image files under {root} cannot be decoded "
                            f"(first: {path}: {type(e).__name__}); fix or remove them, or set dataset.skip_bad=true")
    return ImageData(torch.stack(images), None)


@dataclass(frozen=True)
class Dataset:
    """A row of the dataset table: how to load a split, and what a model and the metrics need to know
    before loading it."""

    load: Callable                # (dataset_cfg, split, streamable) -> ImageData | ImageFiles
    num_classes: int = 0          # 0: unlabelled
    channels: int | None = None   # None: the config says (dataset.channels of an image folder)
    points: bool = False          # 2-D points of a toy mixture, not images
    modes: int = 0                # the equally likely modes that the modes metric counts (0: none known)

    @property
    def labelled(self) -> bool:
        return self.num_classes > 0


DATASETS = {
    "mnist": Dataset(functools.partial(_load_torchvision, "mnist"), num_classes=10, channels=1),
    "fashion_mnist": Dataset(functools.partial(_load_torchvision, "fashion_mnist"), num_classes=10, channels=1),
    "cifar10": Dataset(functools.partial(_load_torchvision, "cifar10"), num_classes=10, channels=3),
    "folder": Dataset(_load_folder),
    "stacked_mnist": Dataset(_load_stacked, channels=3, modes=1000),
    "ring8": Dataset(_load_toy, channels=2, points=True, modes=8),
    "grid25": Dataset(_load_toy, channels=2, points=True, modes=25),
}
LABELLED = tuple(name for name, d in DATASETS.items() if d.labelled)
TOY = tuple(name for name, d in DATASETS.items() if d.points)


def dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise GentrainError(f"dataset.name={name!r} is unknown; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def facts(dataset_cfg) -> DataFacts:
    """The DataFacts of a dataset config, known without loading it."""
    d = dataset(dataset_cfg.name)
    if d.points:
        return DataFacts(d.channels, 0)
    return DataFacts(d.channels or dataset_cfg.channels, dataset_cfg.image_size, d.num_classes)


def on_device_setting(cfg) -> str | bool:
    """dataset.on_device: auto | true | false (checked by config.check_train; configs from before the key: auto)."""
    return cfg.get("on_device", "auto")


def hold(images: torch.Tensor, device: torch.device, on_device: str | bool) -> torch.Tensor:
    """Where a decoded dataset sits while training: on the GPU when dataset.on_device=true, or (auto) when it
    takes at most a quarter of the GPU's free memory; otherwise in pinned host memory, so a batch's copy
    does not block. On a CPU the images stay where they are."""
    if device.type != "cuda":
        return images
    free = torch.cuda.mem_get_info(device)[0]
    if on_device is True and images.nbytes > free:
        raise GentrainError(f"dataset.on_device=true: the decoded images take {images.nbytes / 2**30:.1f} GiB and the "
                            f"GPU has {free / 2**30:.1f} GiB free; use dataset.on_device=auto or false")
    if on_device is True or (on_device == "auto" and images.nbytes <= free // 4):
        return images.to(device)
    return images.pin_memory()


class Batches:
    """Shuffled batches, one epoch after another, dropping the last partial batch.

    Batch `step` is a pure function of (seed, step), so a resumed run draws exactly the batches the
    uninterrupted run would have, whichever way the images arrive (see `hold`):
    - held on the GPU as uint8: a batch is one gather and one conversion there, with no loader workers;
    - held in pinned host memory: gathered there and copied to the GPU without blocking;
    - streamed (ImageFiles): DataLoader workers decode the files of the coming steps ahead of the loop.
    A batch is (x, y): images in [-1, 1] (or points), each mirrored left-right with probability 1/2 under
    dataset.hflip, in the networks' memory layout (channels_last on CUDA), and their labels, None for
    unlabelled data. Under torchrun, batch_size is the global
    batch and each rank gets its own rows of it (gentrain.dist).
    """

    def __init__(self, data: ImageData | ImageFiles, batch_size: int, seed: int, device: torch.device,
                 on_device: str | bool = "auto", hflip: bool = False, workers: int = 4, channels_last: bool = False):
        n = len(data)
        if batch_size > n:
            raise GentrainError(f"trainer.batch_size={batch_size} is larger than the dataset ({n} images); "
                                f"set trainer.batch_size={n} or less")
        self.n, self.batch_size, self.seed, self.device, self.hflip = n, batch_size, seed, device, hflip
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.rows = dist.local_rows(batch_size)
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None
        if isinstance(data, ImageFiles):
            self.files, self.workers, self.images, self.labels = data, workers, None, None
            self._recent, self._next, self._it = {}, None, None
            self.where = f"streamed from disk by {workers} DataLoader workers"
        else:
            self.images = hold(data.images, device, on_device)
            self.labels = None if data.labels is None else data.labels.to(self.images.device)
            self.where = "in pinned host memory" if self.images.is_pinned() else f"in {self.images.device} memory"

    def order(self, step: int) -> torch.Tensor:
        """The dataset indices of this rank's rows of batch `step`."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            if self.images is not None and self.images.is_cuda:
                perm = perm.pin_memory().to(self.images.device, non_blocking=True)
            self._epoch, self._perm = epoch, perm
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size][self.rows]

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.images is None:
            x, y = self._streamed(step), None
        else:
            idx = self.order(step)
            x, y = self.images[idx], None if self.labels is None else self.labels[idx]
            if self.images.is_pinned():
                x, y = x.pin_memory(), None if y is None else y.pin_memory()
        x = x.to(self.device, non_blocking=True)
        y = None if y is None else y.to(self.device, non_blocking=True)
        if x.dtype != torch.uint8:  # 2-D points
            return x, y
        x = to_signed(x)
        if self.hflip:
            flip = dist.per_example(lambda m: torch.rand(m, device=x.device) < 0.5, len(x))
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.contiguous(memory_format=self.layout), y

    def _streamed(self, step: int) -> torch.Tensor:
        """Batch `step` from the DataLoader, whose batch sampler walks the same order from the step asked for.
        The last few batches are kept: a step's phases read some of them more than once (reals.png and step
        0 read batch 0; with d_steps > 1, G reads the batch of D's first run), and the loader only restarts
        where the reading jumps."""
        if step in self._recent:
            return self._recent[step]
        if self._it is None or step != self._next:
            steps = (self.order(k).tolist() for k in itertools.count(step))
            loader = torch.utils.data.DataLoader(self.files, batch_sampler=steps, num_workers=self.workers,
                                                 pin_memory=self.device.type == "cuda",
                                                 prefetch_factor=4 if self.workers else None)
            self._it = iter(loader)
        try:
            x = next(self._it)
        except GentrainError as e:  # raised in a worker: its message is the last line of the report
            raise GentrainError(str(e).strip().splitlines()[-1].split("GentrainError: ", 1)[-1]) from None
        self._recent = {k: v for k, v in self._recent.items() if k > step - 8} | {step: x}
        self._next = step + 1
        return x
