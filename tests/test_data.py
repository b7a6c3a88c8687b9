"""Datasets load from the shared data offline, folders decode and resize, batches are deterministic."""

import shutil

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from gentrain import GentrainError
from gentrain.data import Batches, ImageData, load
from gentrain.images import to_signed


def dataset_cfg(**kw):
    base = {"name": "mnist", "root": "/nowhere", "image_size": 28, "download": True,
            "channels": 3, "background": "white", "skip_bad": False}
    return OmegaConf.create({**base, **kw})


@pytest.mark.parametrize("name, n_train, n_test", [("mnist", 60000, 10000), ("fashion_mnist", 60000, 10000)])
def test_torchvision_datasets_load_offline(data_root, name, n_train, n_test):
    train = load(dataset_cfg(name=name, root=str(data_root)))
    test = load(dataset_cfg(name=name, root=str(data_root)), split="test")
    assert train.images.shape == (n_train, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(test.images) == n_test and train.num_classes == 10
    assert set(train.labels.unique().tolist()) == set(range(10))


def test_resize_to_32_and_64(data_root):
    for size in (32, 64):
        data = load(dataset_cfg(root=str(data_root), image_size=size), split="test")
        assert data.images.shape[1:] == (1, size, size)
    # resizing keeps the content: the mean intensity barely moves
    small = load(dataset_cfg(root=str(data_root)), split="test").images.float().mean()
    big = load(dataset_cfg(root=str(data_root), image_size=64), split="test").images.float().mean()
    assert abs(small - big) < 2.0


def test_missing_dataset_offline_names_folder_and_files(tmp_path):
    with pytest.raises(GentrainError) as e:
        load(dataset_cfg(name="fashion_mnist", root=str(tmp_path), download=False))
    msg = str(e.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg
    assert "\n" not in msg


def test_folder_is_searched_recursively_and_transparency_composited(tmp_path, emoji_dir):
    files = sorted(emoji_dir.glob("*.png"))[:12]
    for i, f in enumerate(files):
        (tmp_path / f"sub{i % 3}" / "deeper").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / f"sub{i % 3}" / "deeper" / f.name)
    white = load(dataset_cfg(name="folder", root=str(tmp_path), image_size=32))
    black = load(dataset_cfg(name="folder", root=str(tmp_path), image_size=32, background="black"))
    grey = load(dataset_cfg(name="folder", root=str(tmp_path), image_size=64, channels=1))
    assert white.images.shape == (12, 3, 32, 32) and grey.images.shape == (12, 1, 64, 64)
    assert white.labels is None
    # emoji corners are transparent: they take the chosen background colour
    assert (white.images[:, :, 0, 0] == 255).all() and (black.images[:, :, 0, 0] == 0).all()


def test_non_square_images_are_centre_cropped(tmp_path):
    img = Image.new("RGB", (90, 30), (0, 0, 0))
    img.paste((255, 0, 0), (30, 0, 60, 30))  # a red middle third
    img.save(tmp_path / "wide.png")
    data = load(dataset_cfg(name="folder", root=str(tmp_path), image_size=28))
    assert data.images.shape == (1, 3, 28, 28)
    assert (data.images[0, 0] > 200).float().mean() > 0.9  # the crop is the red centre


def test_empty_and_undecodable_folders_are_user_errors(tmp_path):
    with pytest.raises(GentrainError, match="no images under"):
        load(dataset_cfg(name="folder", root=str(tmp_path)))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "fine.png")
    with pytest.raises(GentrainError, match=r"1 of 2 image files .* cannot be decoded .*broken.png.*skip_bad=true"):
        load(dataset_cfg(name="folder", root=str(tmp_path)))
    assert len(load(dataset_cfg(name="folder", root=str(tmp_path), skip_bad=True)).images) == 1
    with pytest.raises(GentrainError, match="is not a folder"):
        load(dataset_cfg(name="folder", root=str(tmp_path / "missing")))


def test_batches_visit_every_example_once_per_epoch_and_repeat_exactly():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    data = ImageData(images, torch.arange(10) * 10, num_classes=100)
    batches = Batches(data, batch_size=3, seed=7, device=torch.device("cpu"))
    to_ids = lambda batch: ((batch[0][:, 0, 0, 0] + 1) * 127.5).round().long().tolist()
    epoch0 = sum((to_ids(batches(s)) for s in range(3)), [])
    assert len(set(epoch0)) == 9  # 3 full batches of distinct images, the partial one dropped
    epoch1 = sum((to_ids(batches(s)) for s in range(3, 6)), [])
    assert epoch0 != epoch1  # reshuffled every epoch
    again = Batches(data, batch_size=3, seed=7, device=torch.device("cpu"))
    assert to_ids(again(4)) == to_ids(batches(4))  # a pure function of (seed, step): resume draws the same
    x, y = batches(0)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert (y == torch.tensor(to_ids((x, y))) * 10).all()  # each image keeps its own label


def test_toy_datasets_are_seeded_mixtures_of_their_modes():
    from omegaconf import OmegaConf

    from gentrain.data import toy_modes

    for name, modes, std in (("ring8", 8, 0.02), ("grid25", 25, 0.05)):
        cfg = OmegaConf.create({"name": name, "n": 5000, "seed": 0})
        train, test = load(cfg, "train"), load(cfg, "test")
        means, s = toy_modes(name)
        assert train.points and train.images.shape == (5000, 2) and s == std and len(means) == modes
        dist = torch.cdist(train.images, means).min(1)
        assert (dist.values < 5 * std).all()  # every point sits on one of the modes
        assert torch.bincount(dist.indices, minlength=modes).min() > 5000 / modes / 2  # all modes, about evenly
        assert torch.equal(train.images, load(cfg, "train").images) and not torch.equal(train.images, test.images)
        x, y = Batches(train, 64, 0, torch.device("cpu"))(0)
        assert x.dtype == torch.float32 and y is None


def test_batch_larger_than_dataset_is_a_user_error():
    with pytest.raises(GentrainError, match="larger than the dataset"):
        Batches(ImageData(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), None), 8, 0, torch.device("cpu"))


def test_batches_match_the_classic_torchvision_pipeline(data_root):
    """A GPU-resident batch is what a DataLoader with the classic PIL transforms (Resize, ToTensor,
    Normalize(0.5, 0.5)) would give for the same images, at the native size and resized."""
    import torchvision
    from torchvision import transforms

    for size in (28, 64):
        data = load(dataset_cfg(root=str(data_root), image_size=size))
        batches = Batches(data, batch_size=32, seed=3, device=torch.device("cpu"))
        x, y = batches(5)
        tf = ([transforms.Resize(size)] if size != 28 else []) + [transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]
        classic = torchvision.datasets.MNIST(str(data_root), train=True, transform=transforms.Compose(tf))
        items = [classic[i] for i in batches.order(5).tolist()]
        assert torch.allclose(x, torch.stack([im for im, _ in items]), atol=1e-6)
        assert y.tolist() == [label for _, label in items]


def emoji_folder(tmp_path, emoji_dir, n=24):
    for f in sorted(emoji_dir.glob("*.png"))[:n]:
        shutil.copy(f, tmp_path / f.name)
    return dataset_cfg(name="folder", root=str(tmp_path), image_size=32)


def test_a_streamed_folder_gives_the_batches_of_the_decoded_one(tmp_path, emoji_dir):
    from gentrain.data import ImageFiles

    cfg = emoji_folder(tmp_path, emoji_dir)
    held = load(cfg, streamable=True)  # small: decoded into memory
    streamed = load(OmegaConf.merge(cfg, {"on_device": False}), streamable=True)
    assert isinstance(held, ImageData) and isinstance(streamed, ImageFiles) and len(streamed) == 24
    a = Batches(held, batch_size=5, seed=1, device=torch.device("cpu"))
    b = Batches(streamed, batch_size=5, seed=1, device=torch.device("cpu"), workers=2)
    assert b.where.startswith("streamed")
    for step in [0, 0, 1, 2, 3, 4, 5, 9, 10, 3]:  # repeats, two epochs, and a jump back (a resume)
        assert torch.equal(a(step)[0], b(step)[0]), step
    seen = torch.cat([b.order(s) for s in range(4)])  # one epoch: 4 batches of 5 from 24 images
    assert len(set(seen.tolist())) == 20
    # two D runs and G in each step (d_steps=2): batches 2s, 2s+1, then 2s again, with no loader restart
    c = Batches(streamed, batch_size=5, seed=1, device=torch.device("cpu"), workers=0)
    loaders = []
    for step in [0, 1, 0, 2, 3, 2, 4, 5, 4]:
        assert torch.equal(a(step)[0], c(step)[0]), step
        loaders.append(c._it)
    assert len({id(it) for it in loaders}) == 1


@pytest.mark.slow
def test_a_broken_file_in_a_streamed_folder_is_named_or_skipped(tmp_path, emoji_dir):
    cfg = OmegaConf.merge(emoji_folder(tmp_path, emoji_dir, n=6), {"on_device": False})
    (tmp_path / "0000-broken.png").write_bytes(b"not a png")
    for workers in (0, 2):
        batches = Batches(load(cfg, streamable=True), batch_size=7, seed=0, device=torch.device("cpu"), workers=workers)
        with pytest.raises(GentrainError) as e:
            batches(0)  # one batch of all 7 files
        assert str(e.value).startswith(f"{tmp_path / '0000-broken.png'} cannot be decoded") and "\n" not in str(e.value)
    skipping = load(OmegaConf.merge(cfg, {"skip_bad": True}), streamable=True)
    x, _ = Batches(skipping, batch_size=7, seed=0, device=torch.device("cpu"), workers=2)(0)
    assert x.shape == (7, 3, 32, 32)


def test_hflip_mirrors_about_half_of_the_images():
    images = torch.arange(16, dtype=torch.uint8).view(1, 1, 1, 16).repeat(64, 1, 2, 1)
    torch.manual_seed(0)
    x, _ = Batches(ImageData(images, None), batch_size=64, seed=0, device=torch.device("cpu"), hflip=True)(0)
    plain = to_signed(images[:1])
    mirrored = (x == plain.flip(-1)).flatten(1).all(1)
    assert ((x == plain).flatten(1).all(1) | mirrored).all()  # each image is itself or its mirror
    assert 16 < mirrored.sum() < 48


def test_bad_data_path_settings_are_one_line_errors(gentrain):
    from conftest import assert_one_line_error

    assert_one_line_error(gentrain("dataset.on_device=maybe", check=False), "dataset.on_device must be one of auto|true|false")
    assert_one_line_error(gentrain("dataset=folder", "dataset.root=.", "dataset.workers=-1", check=False),
                          "dataset.workers must be an integer from 0 to 256")


def test_a_huge_image_decodes_without_pils_warning(tmp_path):
    """A 90-megapixel image is over PIL's decompression-bomb warning threshold (89.5 MP) and under its
    refusal (twice that): it decodes like any other, and no warning reaches the terminal."""
    import warnings

    from PIL import Image

    from gentrain.data import decode_file

    Image.new("L", (9000, 10000), 128).save(tmp_path / "huge.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = decode_file(tmp_path / "huge.png", 1, "white", 28)
    assert x.shape == (1, 28, 28) and (x == 128).all()


def test_without_the_shared_data_the_tests_download_mnist_and_fashion_mnist_once(tmp_path, tmp_path_factory, monkeypatch):
    """The data fixture outside this repository's setup: no shared data, so torchvision downloads both
    datasets (mocked here: the call is what is checked) into the cache; offline, the tests skip saying why."""
    import urllib.error

    import torchvision

    import conftest

    calls = []

    def dataset(name):
        def download(root, train, download):
            calls.append((name, root, train, download))
        return download

    for name in ("MNIST", "FashionMNIST"):
        monkeypatch.setattr(torchvision.datasets, name, dataset(name))
    cache = tmp_path / "cache"
    assert conftest.find_data(tmp_path_factory, tmp_path / "no-shared-data", cache) == cache
    assert calls == [(n, str(cache), train, True) for n in ("MNIST", "FashionMNIST") for train in (True, False)]

    def offline(root, train, download):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(pytest.skip.Exception, match="MNIST could not be downloaded into .*Name or service not known"):
        conftest.find_data(tmp_path_factory, tmp_path / "no-shared-data", cache)
