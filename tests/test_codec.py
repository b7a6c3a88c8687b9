"""`gentrain encode` and `gentrain decode`: codes files round-trip, repeat exactly, decode to the model's
own reconstructions, and every input a user can get wrong is one clear error."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from conftest import FAST, assert_one_line_error
from gentrain import GentrainError, checkpoint, data
from gentrain.commands.codec import decode_codes, encode_images
from gentrain.config import config_dir
from gentrain.models import build
from gentrain.checkpoint import load_model
from gentrain.images import to_signed, to_uint8

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # small tensors: a second thread only waits on a busy machine


def config(verb, **keys):
    """The encode or decode config as the command line composes it, with these keys set."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose(verb, overrides=[f"{k}={v}" for k, v in keys.items()])


def mnist_test_images(data_root, n):
    cfg = OmegaConf.create({"name": "mnist", "root": str(data_root), "image_size": 28})
    return data.load(cfg, "test").images[:n]


def pngs(folder):
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(len(files))]
    return torch.stack([pil_to_tensor(Image.open(f)) for f in files])


def fake_checkpoint(path, model_cfg):
    """A checkpoint of an untrained model, as training writes one: enough for the family and shape checks."""
    model = build(model_cfg, 1, 28)
    checkpoint.save({"family": model_cfg["family"], "step": 0, "model": model.state_dict(),
                     "config": {"model": model_cfg, "dataset": {"name": "mnist", "image_size": 28}},
                     "data": {"channels": 1, "image_size": 28, "num_classes": 0}}, path)
    return path


@pytest.mark.slow
def test_vqvae_codes_round_trip_through_the_cli_and_decode_to_the_reconstructions(gentrain, vqvae_run, tmp_path,
                                                                                  data_root):
    proc = gentrain("encode", f"ckpt={vqvae_run}", "input=test", "n=40", f"out={tmp_path / 'a.pt'}", env=ONE_THREAD)
    assert "343 at a fixed length (49 cells x log2(128) = 7 bits)" in proc.stdout
    assert "entropy-coded with the PixelCNN prior" in proc.stdout and "392 as stored" in proc.stdout
    codes = torch.load(tmp_path / "a.pt", weights_only=True)
    assert codes["family"] == "vqvae" and codes["codes"].dtype == torch.uint8 and codes["codes"].shape == (40, 7, 7)
    assert codes["code_shape"] == [7, 7] and codes["num_codes"] == 128 and codes["image_shape"] == [1, 28, 28]
    assert len(codes["files"]) == 40 and codes["source"] == "mnist test split"
    assert 0 < codes["bits_per_image"]["rate"] < codes["bits_per_image"]["fixed_length"] == 343
    # deterministic: encoding again gives the same file contents
    encode_images(config("encode", ckpt=vqvae_run, input="test", n=40, out=tmp_path / "b.pt"))
    again = torch.load(tmp_path / "b.pt", weights_only=True)
    assert again.keys() == codes.keys() and torch.equal(again.pop("codes"), codes.pop("codes")) and again == codes

    gentrain("decode", f"ckpt={vqvae_run}", f"input={tmp_path / 'a.pt'}", f"out={tmp_path / 'out'}/", env=ONE_THREAD)
    decoded = pngs(tmp_path / "out")
    model, _ = load_model(checkpoint.resolve(vqvae_run), torch.device("cpu"))
    x = to_signed(mnist_test_images(data_root, 40))
    with torch.no_grad():
        assert torch.equal(model.codes(x).to(torch.uint8), torch.load(tmp_path / "a.pt", weights_only=True)["codes"])
        recon = to_uint8(model.reconstruct(x))
    assert decoded.shape == (40, 1, 28, 28) and (decoded.int() - recon.int()).abs().max() <= 1

    # a folder of images: the decoded PNGs themselves, found recursively, named by their paths under it
    (tmp_path / "out" / "sub").mkdir()
    (tmp_path / "out" / "000003.png").rename(tmp_path / "out" / "sub" / "x.png")
    encode_images(config("encode", ckpt=vqvae_run, input=tmp_path / "out", n=5, out=tmp_path / "f.pt"))
    folder = torch.load(tmp_path / "f.pt", weights_only=True)
    assert folder["files"] == ["000000.png", "000001.png", "000002.png", "000004.png", "000005.png"]
    with torch.no_grad():
        assert torch.equal(folder["codes"], model.codes(to_signed(decoded[[0, 1, 2, 4, 5]])).byte())
    assert folder["codes"].shape == (5, 7, 7) and folder["source"].startswith("folder ")
    # decode without ckpt= uses the checkpoint the codes file names
    decode_codes(config("decode", input=tmp_path / "f.pt", out=tmp_path / "again"))
    assert pngs(tmp_path / "again").shape == (5, 1, 28, 28)


def test_vae_codes_are_the_posterior_means(gentrain, tmp_path, data_root):
    run = tmp_path / "vae"
    gentrain("model=vae", *FAST, "trainer.steps=2", f"hydra.run.dir={run}")
    encode_images(config("encode", ckpt=run, input="test", n=12, out=tmp_path / "z.pt", data_root=data_root))
    codes = torch.load(tmp_path / "z.pt", weights_only=True)
    model, _ = load_model(checkpoint.resolve(run), torch.device("cpu"))
    x = to_signed(mnist_test_images(data_root, 12))
    with torch.no_grad():
        mu = model.encode(x)[0]
        assert codes["codes"].dtype == torch.float32 and torch.allclose(codes["codes"], mu, atol=1e-6)
        expected = to_uint8(model.decode(mu))
    assert codes["bits_per_image"]["stored"] == 16 * 32 and codes["bits_per_image"]["rate"] > 0
    decode_codes(config("decode", ckpt=run, input=tmp_path / "z.pt", out=tmp_path / "out"))
    assert (pngs(tmp_path / "out").int() - expected.int()).abs().max() <= 1


@pytest.mark.slow
def test_codec_mistakes_are_named(vqvae_run, tmp_path, data_root):
    gan = fake_checkpoint(tmp_path / "gan.pt", {"family": "gan", "z_dim": 4, "ch": 4})
    small = fake_checkpoint(tmp_path / "k64.pt", {"family": "vqvae", "num_codes": 64, "z_dim": 16, "ch": 8,
                                                  "prior_ch": 8, "prior_layers": 1})
    vae = fake_checkpoint(tmp_path / "vae.pt", {"family": "vae", "z_dim": 4, "ch": 4})
    (tmp_path / "empty").mkdir()
    encode_images(config("encode", ckpt=vqvae_run, input="test", n=3, out=tmp_path / "c.pt", data_root=data_root))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "note.txt").write_text("not codes")
    c, out = tmp_path / "c.pt", tmp_path / "o"
    for run, keys, fragment in [
        (encode_images, dict(ckpt=gan, input="test"), "encode and decode need a VAE or VQ-VAE"),
        (encode_images, dict(ckpt=vqvae_run, input=tmp_path / "nowhere"), "is neither a folder of images nor a split"),
        (encode_images, dict(ckpt=vqvae_run, input=tmp_path / "empty"), "no images under"),
        (encode_images, dict(ckpt=vqvae_run, input="test", n=0), r"n must be a positive integer \(or null\), got 0"),
        (decode_codes, dict(ckpt=vqvae_run, input=tmp_path / "none.pt", out=out), "codes file not found"),
        (decode_codes, dict(ckpt=vqvae_run, input=tmp_path / "foreign.pt", out=out), "not a gentrain codes file"),
        (decode_codes, dict(ckpt=vqvae_run, input=tmp_path / "note.txt", out=out), "not a PyTorch file"),
        (decode_codes, dict(ckpt=vqvae_run, input=gan, out=out), "is a checkpoint, not a codes file"),
        (decode_codes, dict(ckpt=vae, input=c, out=out), "holds vqvae codes"),
        (decode_codes, dict(ckpt=small, input=c, out=out), r"codes of shape \[7, 7\] over 128 codes"),
        (decode_codes, dict(ckpt=vqvae_run, input=c, out=c), "is a file"),
    ]:
        with pytest.raises(GentrainError, match=fragment):
            run(config("encode" if run is encode_images else "decode", **keys))


def test_codec_errors_on_the_command_line_are_one_line(gentrain, tmp_path):
    gan = fake_checkpoint(tmp_path / "gan.pt", {"family": "gan", "z_dim": 4, "ch": 4})
    assert_one_line_error(gentrain("encode", f"ckpt={gan}", "input=test", check=False),
                          "is a gan checkpoint; encode and decode need a VAE or VQ-VAE")
    assert_one_line_error(gentrain("decode", f"input={gan}", check=False), "out has no value")


@pytest.mark.parametrize("verb, texts", [
    ("encode", ["input              (required)", "input=test n=1000", "log2(K)", "KL(q(z|x) || p(z))"]),
    ("decode", ["input              (required)", "out=DIR/", "the family and code shape that made them"]),
])
def test_encode_and_decode_help(gentrain, verb, texts):
    out = gentrain(verb, "--help").stdout
    for text in texts:
        assert text in out, text


def test_a_conditional_vae_encodes_labelled_splits_and_decodes_with_their_labels(tmp_path, data_root):
    run = tmp_path / "cvae.pt"
    model = build({"family": "vae", "z_dim": 4, "ch": 4, "conditional": True}, 1, 28, num_classes=10)
    checkpoint.save({"family": "vae", "step": 0, "model": model.state_dict(),
                     "config": {"model": {"family": "vae", "z_dim": 4, "ch": 4, "conditional": True},
                                "dataset": {"name": "mnist", "image_size": 28, "root": str(data_root)}},
                     "data": {"channels": 1, "image_size": 28, "num_classes": 10}}, run)
    encode_images(config("encode", ckpt=run, input="test", n=6, out=tmp_path / "c.pt"))
    codes = torch.load(tmp_path / "c.pt", weights_only=True)
    labels = data.load(OmegaConf.create({"name": "mnist", "root": str(data_root), "image_size": 28}), "test").labels[:6]
    assert torch.equal(codes["labels"], labels)
    decode_codes(config("decode", input=tmp_path / "c.pt", out=tmp_path / "out"))
    with torch.no_grad():
        expected = to_uint8(model.decode(codes["codes"], labels))
    assert (pngs(tmp_path / "out").int() - expected.int()).abs().max() <= 1
    (tmp_path / "imgs").mkdir()
    (tmp_path / "out" / "000000.png").rename(tmp_path / "imgs" / "a.png")
    with pytest.raises(GentrainError, match="a conditional VAE's code is read with the image's class"):
        encode_images(config("encode", ckpt=run, input=tmp_path / "imgs"))
