"""The .gtc bitstream: a VQ-VAE's codes arithmetic-coded under its PixelCNN prior decode bit-exactly, the
file costs what the prior says they cost, and a damaged or mismatched file is one clear error."""

import hashlib
import json
import math
import os
import struct
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
from gentrain.models.vqvae import VQVAE

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
    try:  # other codes, or words left over where the decoder went astray
        assert not torch.equal(entropy.decompress(prior, words, 50, [5, 5], 20, torch.device("cpu")), codes)
    except GentrainError as e:
        assert "the stream holds more than the 50 code grids its header counts" in str(e)


def test_gtc_files_round_trip_through_the_cli(gentrain, tmp_path, data_root):
    ckpt = fake_checkpoint(tmp_path / "vq.pt", TINY_VQVAE)
    gtc, pt = tmp_path / "codes.gtc", tmp_path / "codes.pt"
    proc = gentrain("encode", f"ckpt={ckpt}", "input=test", "n=30", "batch_size=16", f"out={gtc}",
                    f"data_root={data_root}", env=ONE_THREAD)
    assert "bits per image:" in proc.stdout and "in the file" in proc.stdout
    encode_images(config("encode", ckpt=ckpt, input="test", n=30, out=pt, data_root=data_root))
    header, words = bitstream.read(gtc)
    assert header["n"] == 30 and header["code_shape"] == [7, 7] and header["batch_size"] == 16
    assert header["version"] == 2 and header["torch"] == torch.__version__  # where it was made, and with what
    assert header["machine"]["device_name"] == entropy.cpu_name() and header["machine"]["cuda"] is None
    assert header["machine"]["flags"]["deterministic_algorithms"] is False
    assert gtc.stat().st_size < 8 + 800 + words.nbytes  # the header is small beside the stream
    gentrain("decode", f"input={gtc}", f"out={tmp_path / 'from_gtc'}/", env=ONE_THREAD)  # the ckpt from the header
    decode_codes(config("decode", input=pt, out=tmp_path / "from_pt"))
    assert torch.equal(pngs(tmp_path / "from_gtc"), pngs(tmp_path / "from_pt"))
    # a version-1 file, as gentrain wrote them before: decoded all the same, with a note that nothing checks it
    write_v1(tmp_path / "old.gtc", {**header, "torch": "2.3.0"}, words)
    proc = gentrain("decode", f"input={tmp_path / 'old.gtc'}", f"out={tmp_path / 'from_old'}/", env=ONE_THREAD, process=True)
    notes = [line for line in (proc.stdout + proc.stderr).splitlines() if "version-1 .gtc file" in line]
    assert len(notes) == 1 and "carries no check of its decoded codes" in notes[0] and "torch 2.3.0" in notes[0]
    assert torch.equal(pngs(tmp_path / "from_old"), pngs(tmp_path / "from_pt"))


def write_v1(path, header, words):
    """A .gtc file as version 1 wrote it: its SHA-256 covers the words only, and no digest of the grids."""
    payload = words.astype("<u4").tobytes()
    v1 = {k: v for k, v in header.items() if k not in ("version", "sha256", *bitstream.HEADER_2)}
    head = json.dumps({"version": 1, **v1, "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    path.write_bytes(bitstream.MAGIC + struct.pack("<I", len(head)) + head + payload)


def forge(path, header, words):
    """A version-2 file with this header, whatever it says, under a valid signature: what only the checks
    of the fields against each other and against the checkpoint can refuse."""
    payload = words.astype("<u4").tobytes()
    head = bitstream.canonical({**header, "sha256": bitstream.signature(header, payload)})
    path.write_bytes(bitstream.MAGIC + struct.pack("<I", len(head)) + head + payload)


@pytest.fixture
def one_thread():
    """Tiny tensors decoded in this process: a second thread only waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def coded(tmp_path, data_root, n=3, batch_size=2):
    """A tiny VQ-VAE (seeded), a .gtc file of n test images coded in batches, and its decoded PNGs."""
    torch.manual_seed(0)
    ckpt = fake_checkpoint(tmp_path / "vq.pt", TINY_VQVAE)
    gtc = tmp_path / "c.gtc"
    encode_images(config("encode", ckpt=ckpt, input="test", n=n, batch_size=batch_size, out=gtc, data_root=data_root))
    decode_codes(config("decode", input=gtc, out=tmp_path / "ref"))
    return ckpt, gtc, pngs(tmp_path / "ref")


def outcome(cfg, path, out):
    """Decode `path` into the fresh folder `out`: its images, or the one-line error (and no image written)."""
    cfg.input, cfg.out = str(path), str(out)
    try:
        decode_codes(cfg)
    except GentrainError as e:
        assert "\n" not in str(e) and not (out.exists() and any(out.iterdir())), str(e)
        return str(e)
    return pngs(out)


def test_every_changed_byte_or_field_of_a_gtc_header_is_refused_or_decodes_the_same(tmp_path, data_root, one_thread):
    ckpt, gtc, images = coded(tmp_path, data_root)
    other = fake_checkpoint(tmp_path / "other.pt", TINY_VQVAE)
    data = gtc.read_bytes()
    (size,) = struct.unpack("<I", data[4:8])
    header, words = bitstream.read(gtc)
    cfg = config("decode", input=gtc, out=tmp_path / "o")
    refused, same, tried = 0, 0, 0

    def judge(path):
        nonlocal refused, same, tried
        tried += 1
        result = outcome(cfg, path, tmp_path / f"o{tried}")
        if isinstance(result, str):
            refused += 1
        else:
            assert torch.equal(result, images), path
            same += 1

    for at in range(8 + size):  # every byte of the magic, the length and the header, flipped two ways
        for bit in (0x01, 0x80):
            (tmp_path / "flip.gtc").write_bytes(data[:at] + bytes([data[at] ^ bit]) + data[at + 1:])
            judge(tmp_path / "flip.gtc")
    assert refused == tried == 2 * (8 + size)  # the digest covers the header: none gets through
    # each field changed (and dropped) under a valid signature
    changes = {"n": [0, -1, 2, 4, 10 ** 12, "3", True, 3.0, None], "batch_size": [0, -1, 1, 3, 500, "2", None],
               "code_shape": [[7, 8], [8, 7], [49], [0, 7], [7, 7, 1], "7x7", [7.0, 7]],
               "num_codes": [63, 65, 0, 1, "64"], "device": ["cuda", "mps", 5],
               "weights": ["0" * 16, 7], "ckpt": [str(tmp_path / "nowhere.pt"), str(other), 3],
               "codes_sha256": ["0" * 64, None], "machine": ["x", None, {"flags": 1}, {"device_name": "another CPU"}],
               "torch": ["1.0", None], "step": [5, None], "source": ["elsewhere"], "version": [0, 1, 3, "2", None]}
    for key, values in changes.items():
        for value in [*values, "drop"]:
            changed = {k: v for k, v in header.items() if k != "sha256"}
            if value == "drop":
                del changed[key]
            else:
                changed[key] = value
            forge(tmp_path / "field.gtc", changed, words)
            judge(tmp_path / "field.gtc")
    assert same >= 5 and refused > 80  # step, source, torch and the machine's name are notes; the rest is checked


def test_a_desynchronised_decode_is_refused_in_one_line_and_writes_nothing(gentrain, tmp_path, data_root, monkeypatch,
                                                                            one_thread):
    """The prior's logits one step off at decode time, as another GPU or library version may give them: the
    range decoder goes astray, and the grids' digest says so before any image is written."""
    ckpt, gtc, images = coded(tmp_path, data_root)
    code_logits = VQVAE.code_logits
    monkeypatch.setattr(VQVAE, "code_logits", lambda self, codes: torch.nextafter(
        code_logits(self, codes), torch.tensor(math.inf)) * 1.01)
    proc = gentrain("decode", f"input={gtc}", f"out={tmp_path / 'out'}/", check=False)
    line = assert_one_line_error(proc, "decoded to other codes than it was coded from", "nothing was written")
    here = bitstream.where({"device": "cpu", "torch": torch.__version__, "machine": entropy.machine(torch.device("cpu"))})
    assert f"made on {entropy.cpu_name()} (cpu), torch {torch.__version__}" in line and f"decoded on {here}" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # made elsewhere: the line names both
    header, words = bitstream.read(gtc)
    forge(tmp_path / "cuda.gtc", {**{k: v for k, v in header.items() if k != "sha256"},
                                   "machine": {**header["machine"], "device_name": "NVIDIA H100 80GB HBM3", "cuda": "12.8",
                                               "cudnn": 91002}}, words)
    line = assert_one_line_error(gentrain("decode", f"input={tmp_path / 'cuda.gtc'}", f"out={tmp_path / 'out'}/",
                                          check=False), "made on NVIDIA H100 80GB HBM3 (cpu)", "CUDA 12.8, cuDNN 91002")
    assert f"decoded on {here}" in line
    monkeypatch.undo()  # the same file, the same probabilities: it decodes
    gentrain("decode", f"input={tmp_path / 'cuda.gtc'}", f"out={tmp_path / 'out'}/")
    assert torch.equal(pngs(tmp_path / "out"), images)


def test_a_version_1_header_is_checked_as_far_as_it_can_be(gentrain, tmp_path, data_root, one_thread):
    ckpt, gtc, images = coded(tmp_path, data_root)
    header, words = bitstream.read(gtc)
    cfg = config("decode", input=gtc, out=tmp_path / "o")
    for i, (key, value, fragment) in enumerate([
            ("n", 0, "n=0 is not an integer of at least 1"), ("batch_size", 0, "batch_size=0 is not an integer"),
            ("n", 10 ** 9, "more 7x7 code grids than its"), ("n", 2, "holds more than the 2 code grids"),
            ("code_shape", [8, 8], "makes [7, 7] over 64"), ("num_codes", 65, "grids over 65 codes")]):
        write_v1(tmp_path / "v1.gtc", {**header, key: value}, words)
        assert fragment in outcome(cfg, tmp_path / "v1.gtc", tmp_path / f"o{i}")
    write_v1(tmp_path / "v1.gtc", {**header, "batch_size": 0}, words)
    assert_one_line_error(gentrain("decode", f"input={tmp_path / 'v1.gtc'}", f"out={tmp_path / 'o'}/", check=False),
                          "damaged .gtc file: its header's batch_size=0")
    write_v1(tmp_path / "v1.gtc", header, words)
    assert torch.equal(outcome(cfg, tmp_path / "v1.gtc", tmp_path / "v1"), images)


def test_damaged_and_forged_gtc_files_are_one_line_on_the_command_line(gentrain, tmp_path, data_root, one_thread):
    """The .gtc cases of the bad-input corpus (tests/test_fuzz.py has no VQ-VAE): each one line, no image."""
    ckpt, gtc, images = coded(tmp_path, data_root)
    header, words = bitstream.read(gtc)
    data, fields = gtc.read_bytes(), {k: v for k, v in header.items() if k != "sha256"}
    at = data.index(b'"n":3') + 4
    cases = {
        "count.gtc": (data[:at] + b"9" + data[at + 1:], "damaged .gtc file (truncated or changed"),
        "stream.gtc": (data[:-1] + bytes([data[-1] ^ 1]), "damaged .gtc file (truncated or changed"),
        "length.gtc": (data[:4] + (int.from_bytes(data[4:8], "little") + 1).to_bytes(4, "little") + data[8:],
                       "damaged .gtc file"),
        "magic.gtc": (b"GTC0" + data[4:], "is not a gentrain codes file"),  # read as a .pt codes file
        "newer.gtc": ({**fields, "version": 3}, "written by a newer gentrain (.gtc version 3)"),
        "zero.gtc": ({**fields, "n": 0}, "its header's n=0 is not an integer of at least 1"),
        "batch.gtc": ({**fields, "batch_size": 0}, "its header's batch_size=0 is not an integer of at least 1"),
        "more.gtc": ({**fields, "n": 10 ** 9}, "more 7x7 code grids than its"),
        "grid.gtc": ({**fields, "code_shape": [8, 8]}, "its header says [8, 8] grids over 64 codes"),
        "codes.gtc": ({**fields, "num_codes": 128}, "makes [7, 7] over 64"),
        "raised.gtc": ({**fields, "n": 4}, "decoded to other codes than it was coded from"),
        "check.gtc": ({**fields, "codes_sha256": "0" * 64}, "decoded to other codes than it was coded from"),
    }
    for name, (content, fragment) in cases.items():
        if isinstance(content, dict):
            forge(tmp_path / name, content, words)
        else:
            (tmp_path / name).write_bytes(content)
        out = tmp_path / "out" / name
        assert_one_line_error(gentrain("decode", f"input={tmp_path / name}", f"out={out}/", check=False), fragment)
        assert not out.exists() or not any(out.iterdir())


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
    assert gtc.stat().st_size - words.nbytes < 800  # and the header adds a few hundred bytes to the file

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
