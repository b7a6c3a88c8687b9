"""The .gtc bitstream: a VQ-VAE's codes arithmetic-coded under its PixelCNN prior decode bit-exactly, the
file costs what the prior says they cost, and a damaged or mismatched file is one clear error."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, assert_one_line_error
from test_codec import ONE_THREAD, config, fake_checkpoint, pngs

from gentrain import GentrainError, bitstream, checkpoint, entropy
from gentrain.checkpoint import load_model
from gentrain.commands.codec import decode_codes, encode_images
from gentrain.models.pixelcnn import PixelCNN

TINY_VQVAE = {"family": "vqvae", "num_codes": 64, "z_dim": 16, "ch": 8, "prior_ch": 8, "prior_layers": 2}


@torch.no_grad()
def test_a_range_coded_stream_decodes_exactly_and_costs_the_cross_entropy():
    torch.manual_seed(0)
    prior = PixelCNN(num_codes=16, width=16, layers=3).eval()
    prior.out[-1].weight.mul_(30)  # sharp distributions, as a trained prior's are
    codes = prior.sample(torch.rand(50, 5, 5))  # grids drawn from the prior: it models them
    words = entropy.compress(prior, codes, batch_size=20)
    assert torch.equal(entropy.decompress(prior, words, 50, [5, 5], 20, torch.device("cpu")), codes)
    cross_entropy = prior.nll(codes).sum().item() / math.log(2)
    assert cross_entropy < 50 * 25 * 4 * 0.9  # below the fixed length: there is something to gain
    assert cross_entropy <= words.nbytes * 8 <= cross_entropy * 1.02 + 64
    # one changed cell changes the stream; one changed word decodes to other codes
    other = codes.clone()
    other[7, 2, 3] = (other[7, 2, 3] + 1) % 16
    assert not (len(entropy.compress(prior, other, 20)) == len(words) and (entropy.compress(prior, other, 20) == words).all())
    words = words.copy()
    words[len(words) // 2] ^= 1 << 31
    assert not torch.equal(entropy.decompress(prior, words, 50, [5, 5], 20, torch.device("cpu")), codes)


def test_gtc_files_round_trip_through_the_cli(gentrain, tmp_path, data_root):
    ckpt = fake_checkpoint(tmp_path / "vq.pt", TINY_VQVAE)
    gtc, pt = tmp_path / "codes.gtc", tmp_path / "codes.pt"
    proc = gentrain("encode", f"ckpt={ckpt}", "input=test", "n=30", "batch_size=16", f"out={gtc}",
                    f"data_root={data_root}", env=ONE_THREAD)
    assert "bits per image:" in proc.stdout and "in the file" in proc.stdout
    encode_images(config("encode", ckpt=ckpt, input="test", n=30, out=pt, data_root=data_root))
    header, words = bitstream.read(gtc)
    assert header["n"] == 30 and header["code_shape"] == [7, 7] and header["batch_size"] == 16
    assert gtc.stat().st_size < 8 + 400 + words.nbytes  # the header is small beside the stream
    gentrain("decode", f"input={gtc}", f"out={tmp_path / 'from_gtc'}/", env=ONE_THREAD)  # the ckpt from the header
    decode_codes(config("decode", input=pt, out=tmp_path / "from_pt"))
    assert torch.equal(pngs(tmp_path / "from_gtc"), pngs(tmp_path / "from_pt"))
    # from another torch version: decoded all the same, with a note on the version
    bitstream.write(tmp_path / "old.gtc", {**header, "torch": "2.3.0"}, words)
    proc = gentrain("decode", f"input={tmp_path / 'old.gtc'}", f"out={tmp_path / 'from_old'}/", env=ONE_THREAD, process=True)
    assert "coded with torch 2.3.0" in proc.stdout + proc.stderr and torch.equal(pngs(tmp_path / "from_old"), pngs(tmp_path / "from_pt"))


def test_gtc_mistakes_are_named(gentrain, tmp_path, data_root):
    ckpt = fake_checkpoint(tmp_path / "vq.pt", TINY_VQVAE)
    other = fake_checkpoint(tmp_path / "other.pt", TINY_VQVAE)  # same shapes, other weights
    vae = fake_checkpoint(tmp_path / "vae.pt", {"family": "vae", "z_dim": 4, "ch": 4})
    gtc, out = tmp_path / "c.gtc", tmp_path / "out"
    encode_images(config("encode", ckpt=ckpt, input="test", n=4, out=gtc, data_root=data_root))
    data = gtc.read_bytes()
    (tmp_path / "cut.gtc").write_bytes(data[:-3])
    (tmp_path / "flip.gtc").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    header, words = bitstream.read(gtc)
    bitstream.write(tmp_path / "gpu.gtc", {**header, "device": "cuda"}, words)
    for run, keys, fragment in [
        (encode_images, {"ckpt": vae, "input": "test", "out": tmp_path / "v.gtc", "data_root": data_root}, "a vae does not have"),
        (decode_codes, {"ckpt": other, "input": gtc, "out": out}, "has other weights"),
        (decode_codes, {"input": tmp_path / "cut.gtc", "out": out}, "damaged .gtc file"),
        (decode_codes, {"input": tmp_path / "flip.gtc", "out": out}, "damaged .gtc file"),
        (decode_codes, {"input": tmp_path / "gpu.gtc", "out": out}, r"on cuda; decode it there too \(device=cuda\)"),
        (decode_codes, {"input": gtc, "out": gtc}, "is a file"),
    ]:
        with pytest.raises(GentrainError, match=fragment):
            run(config("encode" if run is encode_images else "decode", **keys))
    assert not out.exists() and not (tmp_path / "v.gtc").exists()
    assert_one_line_error(gentrain("decode", f"input={tmp_path / 'cut.gtc'}", f"out={out}", check=False),
                          "damaged .gtc file")


@pytest.mark.slow
def test_a_trained_vqvae_file_costs_what_its_prior_says(gentrain, vqvae_run, tmp_path):
    gtc = tmp_path / "test.gtc"
    proc = gentrain("encode", f"ckpt={vqvae_run}", "input=test", "n=100", f"out={gtc}", env=ONE_THREAD)
    header, words = bitstream.read(gtc)
    model, _ = load_model(checkpoint.resolve(vqvae_run), torch.device("cpu"))
    codes = entropy.decompress(model.code_logits, words, 100, [7, 7], header["batch_size"], torch.device("cpu"))
    encode_images(config("encode", ckpt=vqvae_run, input="test", n=100, out=tmp_path / "c.pt"))
    assert torch.equal(codes, torch.load(tmp_path / "c.pt", weights_only=True)["codes"].long())
    rate = float(proc.stdout.split("-log2 p(codes): ")[1].split()[0])  # bits per image, as encode prints it
    stream = words.nbytes * 8 / 100
    assert rate < 49 * 7 and rate <= stream <= rate * 1.01  # the stream is the rate, within 1%
    assert gtc.stat().st_size - words.nbytes < 500  # and the header adds a few hundred bytes to the file

def test_the_rate_distortion_script_compares_the_learned_codecs_with_png_jpeg_and_webp(tmp_path, data_root):
    vq = fake_checkpoint(tmp_path / "vq.pt", TINY_VQVAE)
    vae = fake_checkpoint(tmp_path / "vae.pt", {"family": "vae", "z_dim": 4, "ch": 4})
    ckpt = torch.load(vae, weights_only=True)
    del ckpt["digest"]
    ckpt["model"]["encoder.net.5.weight"] *= 30  # posterior means that vary from image to image: active
    checkpoint.save(ckpt, vae)
    out = tmp_path / "rd"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "rate_distortion.py"), "--dataset", "mnist",
                           "--data-root", str(data_root), "--n", "20", "--ckpt", str(vq), str(vae), "--name", "a", "b",
                           "--delta", "0.1", "1", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, **ONE_THREAD}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    points = json.loads((out / "rd.json").read_text())["points"]
    codecs = {p["codec"] for p in points}
    assert codecs == {f"{c}, {layout}" for c in ("PNG", "JPEG", "WebP") for layout in ("per image", "tiled")} | {
        "VQ-VAE a", "VAE b"}
    by = {(p["codec"], p["setting"]): p for p in points}
    jpeg = [p for p in points if p["codec"] == "JPEG, tiled"]
    assert all(a["bpp"] < b["bpp"] and a["psnr"] < b["psnr"] for a, b in zip(jpeg, jpeg[1:]))  # quality buys both
    assert by["PNG, tiled", "lossless"]["bpp"] < by["PNG, per image", "lossless"]["bpp"]  # headers shared
    vq_point = by["VQ-VAE a", "K=64, .gtc file"]
    assert vq_point["bpp"] > 49 * 0.5 / 784 and 0 < vq_point["ssim"] < 1
    vae_points = sorted((p for p in points if p["codec"] == "VAE b"), key=lambda p: p["setting"])
    assert [p["setting"].split(",")[0] for p in vae_points] == ["delta=0.1 x std", "delta=1.0 x std"]
    assert vae_points[1]["bpp"] < vae_points[0]["bpp"]  # a coarser grid costs fewer bits
    assert (out / "rd.png").stat().st_size > 10_000 and "| VQ-VAE a | K=64, .gtc file |" in (out / "rd.md").read_text()
