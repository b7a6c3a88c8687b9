"""The VQ-VAE's quantisation, straight-through gradient, codebook updates and PixelCNN prior on fixed
tensors; and a short MNIST run through the CLI: logs, samples, reconstructions and its distortion."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import FAST
from gentrain import GentrainError, checkpoint
from gentrain.models import build
from gentrain.models.pixelcnn import PixelCNN
from gentrain.models.vqvae import ema_update, nearest, perplexity, restart_dead, straight_through
from gentrain.checkpoint import load_model
from gentrain.models import generate

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # small tensors: a second thread only waits on a busy machine


def vqvae(**kw):
    torch.manual_seed(0)
    return build({"family": "vqvae", "num_codes": 16, "z_dim": 4, "ch": 8, "prior_ch": 8, "prior_layers": 2, **kw},
                 1, 28)


def test_straight_through_hands_the_gradient_at_z_q_to_z_e():
    g = torch.Generator().manual_seed(0)
    z_e = torch.randn(2, 3, 2, 2, generator=g, requires_grad=True)
    z_q = torch.randn(2, 3, 2, 2, generator=g)
    w = torch.randn(2, 3, 2, 2, generator=g)
    f = lambda z: (torch.sin(z) * w).sum()  # any downstream function: the decoder's loss stands here
    out = straight_through(z_e, z_q)
    assert torch.allclose(out, z_q, atol=1e-6)  # forward: the quantised value (up to rounding of z_e + (z_q - z_e))
    f(out).backward()
    at_q = z_q.clone().requires_grad_(True)
    f(at_q).backward()
    assert torch.allclose(z_e.grad, at_q.grad)  # backward: the gradient at z_q, copied to z_e


def test_quantisation_picks_the_nearest_code():
    g = torch.Generator().manual_seed(1)
    z, codebook = torch.randn(500, 8, generator=g), torch.randn(32, 8, generator=g)
    assert torch.equal(nearest(z, codebook), torch.cdist(z, codebook).argmin(1))
    model = vqvae()
    z_e = torch.randn(3, 4, 7, 7, generator=g)
    idx, z_q = model.quantize(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 4)
    assert idx.shape == (3, 7, 7) and torch.equal(idx.flatten(), torch.cdist(flat, model.codebook).argmin(1))
    assert torch.equal(z_q.permute(0, 2, 3, 1).reshape(-1, 4), model.codebook[idx.flatten()])


def test_ema_update_moves_codes_by_the_ema_formula():
    codebook = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-5.0, 5.0]])
    count, total = torch.ones(3), codebook.clone()  # N_i = 1, m_i = e_i: where a fresh model starts
    z = torch.tensor([[1.0, 1.0], [3.0, 3.0], [9.0, 8.0]])
    idx = nearest(z, codebook)
    assert idx.tolist() == [0, 0, 1]
    counts = ema_update(codebook, count, total, z, idx, decay=0.5)
    assert counts.tolist() == [2, 1, 0]
    # N = 0.5 N + 0.5 n = [1.5, 1, 0.5];  m = 0.5 m + 0.5 sum z = [[2, 2], [9.5, 9], [-2.5, 2.5]]
    assert torch.allclose(count, torch.tensor([1.5, 1.0, 0.5]))
    assert torch.allclose(total, torch.tensor([[2.0, 2.0], [9.5, 9.0], [-2.5, 2.5]]))
    # e_i = m_i / N_i (Laplace smoothing with eps = 1e-5 changes nothing at this precision): code 0 moves
    # from (0, 0) towards its vectors' mean (2, 2), code 1 towards (9, 8), the unused code 2 stays put.
    assert torch.allclose(codebook, torch.tensor([[4 / 3, 4 / 3], [9.5, 9.0], [-5.0, 5.0]]), atol=1e-4)


def test_dead_codes_restart_on_vectors_of_the_batch():
    codebook = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    count, total = torch.tensor([5.0, 0.5]), codebook.clone()
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    dead = restart_dead(codebook, count, total, z, threshold=1.0)
    assert dead.tolist() == [False, True]
    assert torch.equal(codebook[0], torch.zeros(2)) and count[0] == 5.0  # a live code is left alone
    assert any(torch.equal(codebook[1], row) for row in z) and count[1] == 1.0 and torch.equal(total[1], codebook[1])


def test_codebook_loss_is_the_codebooks_only_gradient_and_ema_has_none():
    model = vqvae(codebook="loss")
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 2 - 1
    loss, stats = model.loss("vqvae", x)
    loss.backward()
    assert "vqvae/codebook" in stats and model.codebook.grad.abs().sum() > 0
    # The same gradient from the codebook term ||sg[z_e] - e||^2 alone (Eq. 3): the reconstruction reaches
    # the encoder through the straight-through estimator and the commitment term stops at sg[e].
    only = model.codebook.grad.clone()
    model.zero_grad()
    z_e = model.encoder(x)
    _, z_q = model.quantize(z_e)
    (z_e.detach() - z_q).pow(2).flatten(1).sum(1).mean().backward()
    assert torch.allclose(model.codebook.grad, only, rtol=1e-5, atol=1e-7)
    ema = vqvae()
    assert "codebook" in dict(ema.named_buffers()) and "codebook" not in dict(ema.named_parameters())
    assert all(p is not ema.codebook for p in ema.phase_parameters("vqvae"))


def test_the_prior_reads_every_earlier_cell_and_no_later_one():
    """Change one cell's code: the logits at a position change exactly when that cell comes before it in
    raster order (no later cell leaks in, and the gated stacks leave no blind spot)."""
    torch.manual_seed(0)
    prior = PixelCNN(num_codes=6, width=8, layers=5).eval()
    codes = torch.randint(0, 6, (1, 5, 5))
    changed = codes.repeat(25, 1, 1)  # grid s has cell s changed
    changed.view(25, 25).diagonal().add_(1).remainder_(6)
    with torch.no_grad():
        moved = (prior(changed) - prior(codes)).abs().amax(1).view(25, 25) > 1e-6  # [s, t]: did cell t move?
    assert torch.equal(moved, torch.ones(25, 25, dtype=torch.bool).triu(1))


def test_ancestral_sampling_inverts_the_cdf_of_each_cell():
    torch.manual_seed(0)
    prior = PixelCNN(num_codes=5, width=8, layers=2).eval()
    u = torch.rand(2000, 3, 3)
    codes = prior.sample(u)
    assert torch.equal(prior.sample(u), codes)  # the same uniforms, the same codes
    # The first cell reads nothing before it: its codes follow p(c_0) exactly as u's quantiles fall.
    p0 = F.softmax(prior(codes[:1])[0, :, 0, 0], 0)
    freq = torch.bincount(codes[:, 0, 0], minlength=5).float() / len(u)
    assert torch.allclose(freq, p0, atol=0.03)
    edges = torch.cat([torch.zeros(1), p0.cumsum(0)])
    assert torch.equal(codes[:, 0, 0], torch.bucketize(u[:, 0, 0].contiguous(), edges[1:-1], right=True))


def test_perplexity_is_the_number_of_codes_in_equal_use():
    assert perplexity(torch.ones(16)).item() == pytest.approx(16)
    assert perplexity(torch.tensor([0.0, 7.0, 0.0, 0.0])).item() == pytest.approx(1)
    assert perplexity(torch.tensor([3.0, 3.0, 0.0, 0.0])).item() == pytest.approx(2)


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_vqvae_shapes(size, channels):
    torch.manual_seed(0)
    model = build({"family": "vqvae", "num_codes": 8, "z_dim": 4, "ch": 8, "prior_ch": 8, "prior_layers": 2},
                  channels, size)
    x = torch.rand(3, channels, size, size) * 2 - 1
    assert model.codes(x).shape == (3, size // 4, size // 4)
    assert model.reconstruct(x).shape == x.shape and model.code_shape == [size // 4] * 2 and model.num_codes == 8
    z = model.noise(2)
    assert z.shape == (2, size // 4, size // 4)
    with torch.no_grad():
        assert model.eval().sample(z).shape == (2, channels, size, size)
    model.train()
    for phase in model.phases:
        loss, stats = model.loss(phase.name, x)
        assert torch.isfinite(loss) and all(v.shape == () for v in stats.values())
    assert set(model.loss("vqvae", x)[1]) == {"vqvae/loss", "vqvae/recon", "vqvae/commit", "vqvae/perplexity",
                                              "vqvae/usage"}


@pytest.mark.parametrize("kw, fragment", [
    ({"codebook": "kmeans"}, "model.codebook='kmeans' is unknown; choose from ema, loss"),
    ({"decay": 1.0}, "0 < model.decay < 1"),
    ({"num_codes": 1}, "model.num_codes must be an integer >= 2"),
    ({"likelihood": "poisson"}, "choose from bernoulli, gaussian, dlogistic"),
])
def test_bad_vqvae_settings_are_named(kw, fragment):
    with pytest.raises(GentrainError, match=fragment):
        vqvae(**kw)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_vqvae_trains_logs_and_samples_through_the_cli(gentrain, vqvae_run, tmp_path):
    last = records(vqvae_run)[-1]
    assert last["step"] == 150
    assert {"vqvae/recon", "vqvae/commit", "vqvae/perplexity", "vqvae/usage", "prior/nll"} <= set(last)
    ckpt = torch.load(vqvae_run / "checkpoints" / "last.pt", weights_only=True)
    assert set(ckpt["optim"]) == {"vqvae", "prior"} and "ema_count" in ckpt["model"]
    assert (vqvae_run / "samples" / "step_0000150.png").is_file()
    tiles = {"grid": (16, 4, 4), "reconstruct": (16, 8, 4), "interpolate": (20, 10, 2)}  # n, columns, rows
    for mode, (n, cols, rows) in tiles.items():
        out = tmp_path / f"{mode}.png"
        gentrain("sample", f"ckpt={vqvae_run}", f"mode={mode}", f"n={n}", f"out={out}", env=ONE_THREAD)
        with Image.open(out) as img:
            assert img.size == (2 + cols * 30, 2 + rows * 30)  # 28 px tiles, 2 px of padding
    # ancestral sampling from the seeded uniforms repeats exactly; another seed draws other images
    model, _ = load_model(checkpoint.resolve(vqvae_run), torch.device("cpu"))
    draw = lambda seed: generate(model, model.noise(4, torch.Generator().manual_seed(seed)), "cpu", 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = draw(0)
        assert torch.equal(draw(0), first) and not torch.equal(draw(1), first)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_short_run_reconstructs_test_images_far_better_than_the_mean_image(gentrain, vqvae_run, data_root):
    """150 steps of 32 images on CPU: the test distortion, -log p(x|z_q) in nats, is under half of what the
    training set's mean image scores as p(x) for every image, the codes use most of the codebook, and the
    PixelCNN prior already codes them in fewer bits than log2(K) per cell."""
    gentrain("eval", f"ckpt={vqvae_run}", "metrics=[nll]", "metrics.nll_n=500", env=ONE_THREAD)
    result = json.loads((vqvae_run / "checkpoints" / "eval.json").read_text())
    m = result["metrics"]
    assert set(m) == {"rate_bits", "rate_uniform_bits", "distortion"}
    assert "no IWAE estimate" in result["skipped"]["nll"]
    from omegaconf import OmegaConf

    from gentrain import data

    cfg = OmegaConf.create({"name": "mnist", "root": str(data_root), "image_size": 28})
    mean = (data.load(cfg, "train").images.float() / 255).mean(0).clamp(1e-4, 1 - 1e-4)
    test = data.load(cfg, "test").images[:500].float() / 255
    baseline = F.binary_cross_entropy(mean.expand_as(test), test, reduction="none").flatten(1).sum(1).mean().item()
    assert m["distortion"] < 0.5 * baseline, (m, baseline)
    assert m["rate_uniform_bits"] == 49 * math.log2(128) and m["rate_bits"] < m["rate_uniform_bits"]
    last = records(vqvae_run)[-1]
    assert last["vqvae/usage"] > 0.5 and last["vqvae/perplexity"] > 20, last


def test_codebook_loss_variant_trains_through_the_cli(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=vqvae", "model.codebook=loss", "model.prior_ch=8", *FAST, "trainer.steps=2",
             f"hydra.run.dir={run}", env=ONE_THREAD)
    assert "vqvae/codebook" in records(run)[-1]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert "codebook" in ckpt["model"] and "ema_count" not in ckpt["model"]


def test_bf16_autocast_quantises_in_fp32_and_updates_the_codebook():
    model = vqvae()
    before = model.codebook.clone()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = model.loss("vqvae", x)
        z_e = model.encoder(x)
        idx = model.quantize(z_e)[0]
    assert z_e.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert model.codebook.dtype == torch.float32 and not torch.equal(model.codebook, before)
    flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(idx.flatten(), torch.cdist(flat, model.codebook).argmin(1))  # distances in fp32
