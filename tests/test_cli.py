"""The command line: help texts, and every bad override as one line with a non-zero exit."""

import re

import pytest

from conftest import assert_one_line_error


def test_help_lists_groups_choices_and_main_keys(gentrain):
    out = gentrain("--help").stdout
    for text in ("model: gan, vae", "dataset: cifar10, fashion_mnist, folder, grid25, mnist, ring8", "experiment:", "baseline:",
                 "trainer.steps", "auto (bf16 on GPUs that have it, else fp32) | fp32 | tf32 | bf16 | fp16", "optim.lr", "gentrain sample",
                 "ns | minimax | wgan | wgan_gp | hinge | lsgan | ragan", "optim.lr_D, optim.lr_G"):
        assert text in out, text
    assert out.rstrip().endswith("gentrain --hydra-help") and "gentrain --cfg job" in out
    assert "Resolved config" not in out and len(out.splitlines()) < 90  # the groups and keys, not the config
    own = gentrain("classifier", "--help").stdout
    assert own.startswith("gentrain classifier:") and "retrain=true" in own


def test_sample_help(gentrain):
    out = gentrain("sample", "--help").stdout
    for text in ("ckpt               (required)", "mode=interpolate", "mode=reconstruct", "out=DIR/", "class=3", "ema                (true)"):
        assert text in out, text


def test_eval_help(gentrain):
    out = gentrain("eval", "--help").stdout
    for text in ("metrics=[fid,pr]", "dataset=mnist", "fid@classifier", "metrics.features   (auto)", "replacing an earlier one"):
        assert text in out, text


def help_keys(text: str) -> dict[str, str]:
    """The keys a --help lists, each with its explanation: lines of `  KEY  (default) what it does`, and
    continuation lines indented further, after a line that starts the keys and up to a blank line."""
    keys, key, inside = {}, None, False
    for line in text.splitlines():
        if line.startswith(("Keys (default)", "Main keys (default)")):
            inside = True
        elif inside and not line.strip():
            break
        elif inside and re.match(r"^ {2}\S", line):
            key, _, what = re.split(r"(\s{2,})", line.strip(), maxsplit=1)
            keys[key] = what
        elif inside:
            assert key and line.startswith(" " * 10), line
            keys[key] += " " + line.strip()
    return keys


@pytest.mark.parametrize("verb", ["train", "sample", "eval", "encode", "decode", "classifier"])
def test_each_verbs_help_explains_each_key_it_lists(gentrain, verb, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gentrain.config import SCHEMAS, config_dir

    keys = help_keys(gentrain(*([] if verb == "train" else [verb]), "--help").stdout)
    assert len(keys) >= 5
    for key, what in keys.items():
        assert len(what.split()) >= 3, (key, what)  # an explanation, not a bare default
    listed = {k.strip() for key in keys for k in key.split(",")}
    if verb == "train":  # every key listed is a key of some family's composed config (or a group)
        real = set()
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            for family in ("gan", "vae", "vqvae"):
                cfg = OmegaConf.to_container(compose("train", overrides=[f"model={family}"]))
                real |= {f"{a}.{b}" for a, v in cfg.items() if isinstance(v, dict) for b in v} | set(cfg)
        assert {k for k in listed if "/" not in k} <= real, {k for k in listed if "/" not in k} - real
    else:  # every key of the verb is listed (data_root as dataset.root, its alias)
        want = {"dataset.root" if k == "data_root" else k for k in SCHEMAS[verb]}
        assert want <= {k.split(".")[0] if k.endswith(".*") else k for k in listed} | listed, want - listed


@pytest.mark.parametrize("args, fragments", [
    (["model=foo"], ["model=foo is not an option", "gan, vae"]),
    (["dataset=imagenet"], ["dataset=imagenet is not an option", "cifar10, fashion_mnist, folder, grid25, mnist, ring8"]),
    (["-m", "model=gan,diffusion"], ["model=diffusion is not an option"]),
    (["experiment=wgan_gp_fashion"], ["experiment=wgan_gp_fashion is not an option", "baseline=wgan_gp_fashion"]),
    (["baseline=toy"], ["baseline=toy is not an option", "experiment=toy"]),
    (["trainer.stpes=10"], ["trainer.stpes is not a key of gentrain; did you mean trainer.steps"]),
    (["+trainer.stpes=10"], ["trainer.stpes is not a key of gentrain; did you mean trainer.steps"]),
    (["model=gan,vae"], ["Ambiguous value", "--multirun"]),
    (["optim.lr=0"], ["optim.lr must be a positive number"]),
    (["seed=abc"], ["seed must be an integer from 0 to"]),
    (["-m", "optim.lr=1e-4,-1"], ["optim.lr must be a positive number, got -1"]),
    (["trainer.batch_size=0"], ["trainer.batch_size must be a positive integer"]),
    (["dataset.image_size=100"], ["dataset.image_size must be one of 16, 28, 32, 64, 128, 256, 512"]),
    (["trainer.steps=-5"], ["trainer.steps must be a positive integer"]),
    (["trainer.device=cuda"] , ["trainer.device=cuda but torch sees no CUDA GPU"]),
    (["dataset=folder"], ["dataset.root has no value"]),
    (["model.loss=wasserstein"], ["model.loss='wasserstein' is not a GAN loss"]),
    (["model.arch=vit"], ["model.arch='vit' is unknown; choose from dcgan, resnet, r3gan, lightweight, mlp"]),
    (["model.augment=[color,flip]"], ["model.augment: 'flip' is not a DiffAugment transform"]),
    (["model.arch=mlp"], ["model.arch=mlp is for 2-D points"]),
    (["dataset=ring8", "model=vae"], ["model=vae models images", "holds 2-D points"]),
    (["model.conditional=true", "dataset=folder", "dataset.root=."], ["needs a labelled dataset"]),
    (["trainer.steps=[1"], ["no viable alternative"]),
])
def test_bad_overrides_fail_in_one_line(gentrain, args, fragments):
    if args == ["trainer.device=cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present")
    # trainer.steps=2 keeps the run short should an override wrongly be accepted
    short = [] if any(a.startswith("trainer.steps") for a in args) else ["trainer.steps=2"]
    assert_one_line_error(gentrain(*args, *short, check=False), *fragments)


def test_missing_dataset_offline_is_one_line(gentrain, tmp_path):
    proc = gentrain("dataset=fashion_mnist", f"dataset.root={tmp_path}", "dataset.download=false", check=False)
    assert_one_line_error(proc, str(tmp_path / "FashionMNIST" / "raw"), "train-images-idx3-ubyte")


def test_image_folder_errors(gentrain, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(gentrain("dataset=folder", f"dataset.root={empty}", check=False), "no images under")
    (empty / "a.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    assert_one_line_error(gentrain("dataset=folder", f"dataset.root={empty}", check=False), "cannot be decoded")


def test_folder_dataset_trains_on_colour_images(gentrain, tmp_path, emoji_dir):
    import shutil

    import torch

    images = tmp_path / "emoji"
    images.mkdir()
    for f in sorted(emoji_dir.glob("*.png"))[:40]:
        shutil.copy(f, images / f.name)
    run = tmp_path / "run"
    gentrain("dataset=folder", f"dataset.root={images}", "dataset.image_size=32", "trainer.steps=2",
             "trainer.batch_size=16", "model.ch=8", f"hydra.run.dir={run}")
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["data"] == {"channels": 3, "image_size": 32, "num_classes": 0}


def test_a_torchvision_built_for_another_torch_is_one_line(tmp_path):
    """torchvision's import failing as it does beside a torch it was not built for: one line naming both
    versions and the install command of the tested pair, before anything else runs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import gentrain

    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    src = Path(gentrain.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(src)])}
    proc = subprocess.run([sys.executable, "-m", "gentrain", "trainer.steps=1", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    import torch

    line = assert_one_line_error(proc, "operator torchvision::nms does not exist", f"with torch {torch.__version__.split('+')[0]}",
                                 "pip install torch==2.14.1 torchvision==0.29.2")
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists(), line
