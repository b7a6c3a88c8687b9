"""`gentrain encode` and `gentrain decode`: a trained VAE or VQ-VAE as a learned compressor, from images
to a codes file and back.

A codes file (.pt) is a plain dict of tensors, strings and numbers, read with torch.load(weights_only=True):
the codes (a VAE's posterior means, or a VQ-VAE's code indices in the smallest integer type that holds
them), the labels a conditional VAE decodes with, and what made them: family, checkpoint, step, the
source's file names, the image and code shapes. A .gtc file holds a VQ-VAE's code indices arithmetic-coded
under its PixelCNN prior (gentrain.bitstream): its size is what the codes cost.
"""

import logging
import math
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gentrain import bitstream, checkpoint, data, entropy, files
from gentrain.config import check, config_dir
from gentrain.device import pick_device
from gentrain.errors import GentrainError, reported
from gentrain.images import save_pngs, to_signed
from gentrain.models.family import BITSTREAM, CODEC

log = logging.getLogger("gentrain")

FORMAT, VERSION = "gentrain-codes", 1
SPLITS = ("test", "train")


def read_images(cfg: DictConfig, ckpt: checkpoint.Checkpoint) -> tuple[torch.Tensor, torch.Tensor | None, list[str], str]:
    """input= as uint8 images at the model's size and channels, their labels (None for a folder), a name
    for each and a description of the source. `test` and `train` are the checkpoint's dataset splits; a
    folder of that name is ./test."""
    source = str(cfg.input)
    dataset_cfg, facts = ckpt.dataset_config(cfg.data_root), ckpt.facts
    if source in SPLITS:
        if dataset_cfg.name == "folder":
            raise GentrainError(f"input={source}: this model was trained on an image folder, which has no "
                                f"{source} split; give input=FOLDER (./{source} for a folder of that name)")
        split = data.load(dataset_cfg, split=source)
        n = len(split.images) if cfg.n is None else min(cfg.n, len(split.images))
        return split.images[:n], None if split.labels is None else split.labels[:n], \
            [f"{dataset_cfg.name}/{source}/{i}" for i in range(n)], f"{dataset_cfg.name} {source} split"
    root = Path(source).expanduser()
    if not root.is_dir():
        raise GentrainError(f"input={source} is neither a folder of images nor a split ({', '.join(SPLITS)})")
    files = data.image_files(root)[:cfg.n]
    background = cfg.background or dataset_cfg.get("background") or "white"
    images = []
    for path in files:
        try:  # the folder dataset's own decoding: resized, centre-cropped, the model's channels
            images.append(data.decode_file(path, facts.channels, background, facts.image_size))
        except Exception as e:  # PIL raises many types for broken files
            raise GentrainError(f"cannot decode {path} ({type(e).__name__}); fix or remove it") from None
    return torch.stack(images), None, [str(p.relative_to(root)) for p in files], f"folder {root}"


def load_codes(path) -> dict:
    """Read and check a codes file; every way it can be wrong ends in one GentrainError."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise GentrainError(f"codes file not found: {path}")
    codes = checkpoint.read(path, "gentrain codes file")
    if isinstance(codes, dict) and codes.get("format") == checkpoint.FORMAT:
        raise GentrainError(f"{path} is a checkpoint, not a codes file: pass it as ckpt=, and codes from "
                            f"`gentrain encode` as input=")
    if not isinstance(codes, dict) or codes.get("format") != FORMAT:
        raise GentrainError(f"{path} is not a gentrain codes file (make one with gentrain encode)")
    if codes.get("version", 0) > VERSION:
        raise GentrainError(f"{path} was written by a newer gentrain (codes format {codes['version']}); "
                            f"upgrade gentrain")
    missing = [k for k in ("family", "ckpt", "codes", "labels", "code_shape", "num_codes") if k not in codes]
    if missing or not torch.is_tensor(codes["codes"]):
        raise GentrainError(f"{path} is an incomplete codes file (missing {', '.join(missing) or 'its codes'}); "
                            f"encode the images again")
    return codes


def load_coder(ckpt_path, device) -> tuple[torch.nn.Module, checkpoint.Checkpoint]:
    """The model of a checkpoint that can code images (a VAE or VQ-VAE), in eval mode."""
    model, ckpt = checkpoint.load_model(ckpt_path, device)
    if CODEC not in model.capabilities:
        raise GentrainError(f"{ckpt.path} is a {ckpt.family} checkpoint; encode and decode need a VAE or VQ-VAE "
                            f"(model=vae or vqvae), which have an encoder")
    return model, ckpt


@torch.no_grad()
def encode_images(cfg: DictConfig) -> None:
    """Encode cfg.input with the checkpoint cfg.ckpt into the codes file cfg.out, and print what the codes cost."""
    check("encode", cfg)
    device = pick_device(cfg.device, key="device")
    model, ckpt = load_coder(cfg.ckpt, device)
    out = Path(str(cfg.out)).expanduser()
    coded = out.suffix == ".gtc"
    if coded and BITSTREAM not in model.capabilities:
        raise GentrainError(f"out={out}: a .gtc file arithmetic-codes discrete codes under a prior, which a "
                            f"{ckpt.family} does not have (model=vqvae does); write a .pt codes file")
    files.check_writable(out)
    images, labels, names, source = read_images(cfg, ckpt)
    if model.num_classes and labels is None:
        raise GentrainError("a conditional VAE's code is read with the image's class, which a folder does not "
                            "have; encode a labelled split (input=test)")
    codes, rates = [], []
    for i in range(0, len(images), cfg.batch_size):
        x = to_signed(images[i:i + cfg.batch_size].to(device))
        y = None if not model.num_classes else labels[i:i + cfg.batch_size].to(device)
        code, rate = model.encode_codes(x, y)  # the codes as stored, and what each costs in nats
        codes.append(code.cpu())
        rates.append(rate.double().cpu())
    codes = torch.cat(codes)
    rate_bits = torch.cat(rates).mean().item() / math.log(2)
    stored_bits = codes[0].numel() * codes.element_size() * 8
    bits = {"stored": stored_bits, "rate": rate_bits}
    if model.num_codes:  # discrete codes: each cell costs log2(K) bits at a fixed length
        bits["fixed_length"] = math.prod(model.code_shape) * math.log2(model.num_codes)
    if coded:
        return write_stream(model, ckpt, codes, rate_bits, source, out, cfg.batch_size, device)
    result = {"format": FORMAT, "version": VERSION, "family": ckpt.family, "ckpt": str(ckpt.path.resolve()),
              "step": ckpt.step, "source": source, "files": names, "codes": codes,
              "labels": labels if model.num_classes else None,
              "image_shape": list(images.shape[1:]), "code_shape": model.code_shape,
              "num_codes": model.num_codes, "bits_per_image": bits}
    checkpoint.save(result, out, kind="codes file")
    print(f"encoded {len(codes)} images ({source}) with {ckpt.describe()} into {out}")
    print(model.describe_codes(codes.dtype, rate_bits, stored_bits))


def write_stream(model, ckpt: checkpoint.Checkpoint, codes: torch.Tensor, rate_bits: float, source: str,
                 out: Path, batch_size: int, device: torch.device) -> None:
    """The code grids arithmetic-coded under the model's prior into the .gtc file `out`."""
    words = entropy.compress(model.code_logits, codes.to(device), batch_size)
    header = {"ckpt": str(ckpt.path.resolve()), "step": ckpt.step, "source": source,
              "weights": bitstream.fingerprint(model), "n": len(codes), "code_shape": model.code_shape,
              "num_codes": model.num_codes, "batch_size": batch_size, "device": device.type,
              "torch": torch.__version__, "machine": entropy.machine(device), "codes_sha256": entropy.digest(codes)}
    size = bitstream.write(out, header, words)
    print(f"encoded {len(codes)} images ({source}) with {ckpt.describe()} into {out}")
    print(f"bits per image: {size * 8 / len(codes):.1f} in the file ({size} bytes, header included), "
          f"{words.nbytes * 8 / len(codes):.1f} in its stream; the prior's -log2 p(codes): {rate_bits:.1f}")


def read_stream(cfg: DictConfig, device: torch.device) -> tuple[torch.Tensor, torch.nn.Module, checkpoint.Checkpoint]:
    """The code grids of the .gtc file cfg.input, decoded with the model that wrote them and checked against
    the digest of the grids it was coded from."""
    path = Path(str(cfg.input)).expanduser()
    header, words = bitstream.read(path)
    model, ckpt = load_coder(cfg.ckpt or header["ckpt"], device)
    made_by = f"{path} was coded with {header['ckpt']} (step {header.get('step')})"
    if BITSTREAM not in model.capabilities or bitstream.fingerprint(model) != header["weights"]:
        raise GentrainError(f"{made_by}; {ckpt.path} has other weights, which would decode it wrongly: decode "
                            f"with the checkpoint that coded it")
    if [header["code_shape"], header["num_codes"]] != [model.code_shape, model.num_codes]:
        raise GentrainError(f"{made_by}; its header says {header['code_shape']} grids over {header['num_codes']} "
                            f"codes and {ckpt.path} makes {model.code_shape} over {model.num_codes}: the header is "
                            f"damaged; encode the images again")
    if device.type != header["device"]:
        raise GentrainError(f"{made_by} on {header['device']}; decode it there too (device={header['device']}): "
                            f"the prior's probabilities must match bit for bit")
    check = header.get("codes_sha256")
    if check is None:  # version 1
        log.warning("note: %s is a version-1 .gtc file, which carries no check of its decoded codes; if the "
                    "images come out garbled, decode where it was coded (%s)", path, bitstream.where(header))
    try:
        codes = entropy.decompress(model.code_logits, words, header["n"], header["code_shape"], header["batch_size"],
                                   device, name=str(path))
    except entropy.LeftOver:  # the words are signed: a decoder that did not end where the encoder did went astray
        if check is None:
            raise
        codes = None
    if check is not None and (codes is None or entropy.digest(codes) != check):
        here = bitstream.where({"device": device.type, "torch": torch.__version__, "machine": entropy.machine(device)})
        raise GentrainError(f"{path} decoded to other codes than it was coded from: the prior's probabilities differ "
                            f"here; it was made on {bitstream.where(header)} and is being decoded on {here}; decode it "
                            f"where it was made (nothing was written)")
    return codes, model, ckpt


@torch.no_grad()
def decode_codes(cfg: DictConfig) -> None:
    """Decode the codes file cfg.input with the checkpoint cfg.ckpt into one PNG per code in cfg.out."""
    check("decode", cfg)
    out = Path(str(cfg.out)).expanduser()
    if out.exists() and not out.is_dir():
        raise GentrainError(f"out={out} is a file; decode writes one PNG per code into a folder (out=DIR/)")
    device = pick_device(cfg.device, key="device")
    if bitstream.is_stream(Path(str(cfg.input)).expanduser()):
        files.check_writable(out, folder=True)  # before the decoding, which takes a while
        codes, model, ckpt = read_stream(cfg, device)
        return write_images(model, ckpt, codes, None, cfg, out)
    stored = load_codes(cfg.input)
    model, ckpt = load_coder(cfg.ckpt or stored["ckpt"], device)
    path = ckpt.path
    made_by = f"made by {stored['ckpt']} ({stored['family']})"
    if stored["family"] != ckpt.family:
        raise GentrainError(f"{cfg.input} holds {stored['family']} codes, {made_by}; {path} is a {ckpt.family} "
                            f"checkpoint: decode with the checkpoint that made them")
    shape = (stored["code_shape"], stored["num_codes"])
    if shape != (model.code_shape, model.num_codes):
        raise GentrainError(f"{cfg.input} holds codes of shape {stored['code_shape']}"
                            f"{' over %d codes' % stored['num_codes'] if stored['num_codes'] else ''}, {made_by}; "
                            f"{path} makes another shape: decode with the checkpoint that made them")
    codes, labels = stored["codes"], stored["labels"]
    if model.num_classes and labels is None:
        raise GentrainError(f"{path} is a conditional VAE and {cfg.input} holds no labels to decode with")
    write_images(model, ckpt, codes, labels, cfg, out)


def write_images(model, ckpt: checkpoint.Checkpoint, codes: torch.Tensor, labels: torch.Tensor | None,
                 cfg: DictConfig, out: Path) -> None:
    """The codes decoded into one PNG each in the folder `out`."""
    device = next(model.parameters()).device
    files.check_writable(out, folder=True)
    i = 0
    for start in range(0, len(codes), cfg.batch_size):
        batch = codes[start:start + cfg.batch_size].to(device)
        y = None if not model.num_classes else labels[start:start + cfg.batch_size].to(device)
        i = save_pngs(model.decode_codes(batch, y), out, start=i)  # as `gentrain sample out=DIR/`
    print(f"decoded {i} images from {cfg.input} with {ckpt.describe()} into {out}/")


@hydra.main(config_path=str(config_dir()), config_name="encode", version_base="1.3")
@reported
def encode(cfg: DictConfig) -> None:
    encode_images(cfg)


@hydra.main(config_path=str(config_dir()), config_name="decode", version_base="1.3")
@reported
def decode(cfg: DictConfig) -> None:
    decode_codes(cfg)
