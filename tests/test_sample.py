"""`gentrain sample` rebuilds the model from the checkpoint alone and writes every kind of output."""

import pytest
import torch
from PIL import Image

from conftest import FAST, assert_one_line_error
from gentrain import checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """One short GAN run and one short VAE run, trained once for all the tests here."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("runs")
    for family in ("gan", "vae"):
        subprocess.run([sys.executable, "-m", "gentrain", f"model={family}", "trainer.steps=2", *FAST,
                        f"hydra.run.dir={root / family}"], check=True, capture_output=True,
                       env={**os.environ, "GENTRAIN_DATA": str(data_root)}, cwd=root)
    return root


def png(path):
    with Image.open(path) as img:
        return img.size, img.mode


@pytest.mark.parametrize("family", ["gan", "vae"])
def test_grid_from_checkpoint_alone(gentrain, runs, tmp_path, family):
    out = tmp_path / "grid.png"
    # run from an unrelated folder, with no config and no data root: the checkpoint is enough
    proc = gentrain("sample", f"ckpt={runs / family / 'checkpoints' / 'last.pt'}", "n=16", f"out={out}",
                    env={"GENTRAIN_DATA": "/nonexistent"})
    assert str(out) in proc.stdout and "wrote a grid of 16 images" in proc.stdout
    assert list(tmp_path.glob("*.log")) == []  # the verb logs to the console only, no sample.log where it ran
    size, _ = png(out)
    assert size == (2 + 4 * 30, 2 + 4 * 30)  # 4x4 tiles of 28 px with torchvision's 2 px padding


def test_default_output_lands_in_the_run_and_seed_is_reproducible(gentrain, runs, tmp_path):
    gentrain("sample", f"ckpt={runs / 'gan'}", "n=9", "seed=3")
    first = (runs / "gan" / "samples" / "last_grid_seed3.png").read_bytes()
    gentrain("sample", f"ckpt={runs / 'gan'}", "n=9", "seed=3")
    assert (runs / "gan" / "samples" / "last_grid_seed3.png").read_bytes() == first
    gentrain("sample", f"ckpt={runs / 'gan'}", "n=9", "seed=4")
    assert (runs / "gan" / "samples" / "last_grid_seed4.png").read_bytes() != first


def test_folder_of_single_images(gentrain, runs, tmp_path):
    out = tmp_path / "many"
    gentrain("sample", f"ckpt={runs / 'vae'}", "n=25", "batch_size=10", f"out={out}/")
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(25)]
    assert png(files[0]) == ((28, 28), "L")


def test_interpolation_grid(gentrain, runs, tmp_path):
    out = tmp_path / "interp.png"
    gentrain("sample", f"ckpt={runs / 'gan'}", "mode=interpolate", "n=30", f"out={out}")
    assert png(out)[0] == (2 + 10 * 30, 2 + 3 * 30)  # 3 rows of 10 steps


def test_slerp_ends_at_its_endpoints():
    from gentrain.commands.sample import slerp

    a, b = torch.randn(4, 1, 8), torch.randn(4, 1, 8)
    path = slerp(a, b, torch.linspace(0, 1, 5)[None, :, None])
    assert torch.allclose(path[:, 0], a[:, 0], atol=1e-5) and torch.allclose(path[:, -1], b[:, 0], atol=1e-5)


def test_vae_reconstructions_from_the_test_split(gentrain, runs, tmp_path, data_root):
    out = tmp_path / "recon.png"
    gentrain("sample", f"ckpt={runs / 'vae'}", "mode=reconstruct", "n=16", f"out={out}", f"dataset.root={data_root}")
    assert png(out)[0] == (2 + 8 * 30, 2 + 4 * 30)  # 2 rows of inputs, each above its reconstructions


def test_reconstruct_needs_a_vae(gentrain, runs):
    assert_one_line_error(gentrain("sample", f"ckpt={runs / 'gan'}", "mode=reconstruct", check=False),
                          "needs a VAE checkpoint")


@pytest.mark.parametrize("args, fragment", [
    (["mode=dream"], "mode must be one of grid|interpolate|reconstruct, got 'dream'"),
    (["n=0"], "n must be an integer from 1 to 1000000, got 0"),
    (["bogus=1"], "bogus is not a key of gentrain sample"),
])
def test_bad_sample_options(gentrain, runs, args, fragment):
    assert_one_line_error(gentrain("sample", f"ckpt={runs / 'gan'}", *args, check=False), fragment)


def test_bad_checkpoints_through_the_cli(gentrain, runs, tmp_path):
    assert_one_line_error(gentrain("sample", check=False), "ckpt has no value")
    assert_one_line_error(gentrain("sample", f"ckpt={tmp_path / 'none.pt'}", check=False), "checkpoint not found")
    good = (runs / "gan" / "checkpoints" / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 3])
    assert_one_line_error(gentrain("sample", f"ckpt={tmp_path / 'cut.pt'}", check=False), "truncated or corrupt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    assert_one_line_error(gentrain("sample", f"ckpt={tmp_path / 'foreign.pt'}", check=False), "not a gentrain checkpoint")
    assert_one_line_error(gentrain(f"resume={tmp_path / 'cut.pt'}", check=False), "truncated or corrupt")
    ckpt = torch.load(runs / "gan" / "checkpoints" / "last.pt", weights_only=True)
    ckpt["config"]["model"]["ch"] *= 2  # a config that no longer describes the stored weights
    checkpoint.save({k: v for k, v in ckpt.items() if k not in ("format", "version", "digest")}, tmp_path / "mismatch.pt")
    assert_one_line_error(gentrain("sample", f"ckpt={tmp_path / 'mismatch.pt'}", check=False), "do not fit")
    assert_one_line_error(gentrain(f"resume={tmp_path / 'mismatch.pt'}", check=False), "do not fit")
