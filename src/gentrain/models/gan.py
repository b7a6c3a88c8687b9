"""The GAN family: a generator G and a discriminator D trained in phases: D (d_steps times), Dreg (lazy
regularisation, every r1_every steps) and G.

The loss and D's regularisers (models/losses.py), DiffAugment, class conditioning and the EMA of G are
chosen by the model config; the architectures are DCGAN (models/nets.py), SNGAN's ResNet
(models/resnet.py), R3GAN's normalisation-free ResNet (models/r3gan.py), FastGAN (models/lightweight.py)
and an MLP for 2-D toy data.
"""

import copy

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from torch.optim.swa_utils import update_bn

from gentrain import dist
from gentrain.checks import integer, positive
from gentrain.data import DataFacts
from gentrain.dist import per_example
from gentrain.errors import GentrainError
from gentrain.models import augment as diffaug
from gentrain.models import losses
from gentrain.models.family import EMA as EMA_CAPABILITY
from gentrain.models.family import Phase
from gentrain.models.lightweight import LightweightD, LightweightG
from gentrain.models.losses import Regulariser
from gentrain.models.nets import MLP, Decoder, Encoder, dcgan_init, plan
from gentrain.models.r3gan import R3GAND, R3GANG
from gentrain.models.resnet import ResNetD, ResNetG

ARCHS = ("dcgan", "resnet", "r3gan", "lightweight", "mlp")


class Projection(nn.Module):
    """D(x, y) = psi(phi(x)) + <E[y], phi(x)> (Miyato & Koyama 2018, Eq. 3): the class enters as an
    inner product with D's features instead of being concatenated to its input."""

    def __init__(self, body: nn.Module, features: int, num_classes: int):
        super().__init__()
        self.body, self.psi = body, nn.Linear(features, 1)
        self.embed = nn.Embedding(num_classes, features) if num_classes else None
        if self.embed is not None:
            # psi's scale, 1/sqrt(features): Embedding's N(0, 1) would make <E[y], phi(x)> sqrt(features)
            # times larger than the rest of D's output and saturate the loss from the first step.
            nn.init.normal_(self.embed.weight, 0.0, features ** -0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x)
        out = self.psi(h)
        return out if self.embed is None else out + (self.embed(y) * h).sum(1, keepdim=True)


class EMA(nn.Module):
    """An EMA of G's weights (Karras et al. 2018, Sec. 5; Yazici et al. 2019) whose decay ramps up as
    min(decay, (1 + n) / (10 + n)) over the first n updates, so early weights are not averaged in for long;
    the first update copies G.

    Batch-norm statistics are not averaged: G's running statistics belong to G's own recent weights, not to
    their average, and an EMA sampled with them draws from a shifted distribution. calibrate() recomputes
    them from the EMA's own weights before it samples or is saved ("precise BN", Wu & Johnson 2021,
    Sec. 3), on a fixed set of codes, once per update count: sample() calls calibrate(), and so does the
    loop before it writes a checkpoint (GAN.calibrate_ema); state_dict() only reads.

    The count n stays on the device and nothing is read back, so an update costs no host sync and can be
    captured in a CUDA graph (torch's AveragedModel reads n on the host each update). The state-dict keys
    are AveragedModel's, module.* and n_averaged, so checkpoints written with it load."""

    # Calibration codes: 32 batches of 32. Channel statistics over 1,024 codes (times the feature map's
    # pixels) do as well as over 4,096 (the default GAN at 5,000 steps, seed 0: FID 36.9 against 37.0),
    # and batches of 32 keep a 512 px G's activations small.
    CODES = (32, 32)

    def __init__(self, G: nn.Module, decay: float, z_dim: int, num_classes: int = 0):
        super().__init__()
        self.module, self.decay = copy.deepcopy(G).requires_grad_(False), decay
        self.z_dim, self.num_classes = z_dim, num_classes
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))
        # the n_averaged its batch-norm statistics were computed at; not saved, so a loaded EMA recomputes them
        self.register_buffer("calibrated_at", torch.tensor(-1, dtype=torch.long), persistent=False)
        self.register_load_state_dict_post_hook(EMA._after_loading)

    @staticmethod
    def _after_loading(module: "EMA", incompatible_keys) -> None:
        module.calibrated_at.fill_(-1)

    def forward(self, *args):
        return self.module(*args)

    @torch.no_grad()
    def update(self, G: nn.Module) -> None:
        n = self.n_averaged.float()
        beta = torch.where(n == 0, 0.0, ((1 + n) / (10 + n)).clamp(max=self.decay))
        ema = list(self.module.parameters())
        torch._foreach_mul_(ema, beta)
        torch._foreach_add_(ema, torch._foreach_mul(list(G.parameters()), 1 - beta))
        self.n_averaged += 1

    @torch.no_grad()
    def calibrate(self) -> None:
        """The batch-norm statistics of the EMA's weights over CODES, z ~ N(0, I) from a fixed seed (classes
        in turn for a conditional G), in fp32, unless they are current. Reads n back: sampling and saving
        call it, never a training step."""
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.module.modules())
        if not has_bn or self.calibrated_at.item() == self.n_averaged.item():
            return
        batches, size = self.CODES
        g, device = torch.Generator().manual_seed(0), self.n_averaged.device
        codes = [torch.randn(size, self.z_dim, generator=g).to(device) for _ in range(batches)]
        training = self.module.training
        with torch.autocast(device.type, enabled=False):
            update_bn(codes, Codes(self.module, self.num_classes))  # running stats: the mean over the batches
        self.module.train(training)  # update_bn leaves the wrapper's own mode, train
        self.calibrated_at.copy_(self.n_averaged)


class Codes(nn.Module):
    """G as a function of its codes alone, the one input torch's update_bn passes: a conditional G gets the
    classes in turn across the calls (code i has class i mod num_classes)."""

    def __init__(self, G: nn.Module, num_classes: int):
        super().__init__()
        self.G, self.num_classes, self.seen = G, num_classes, 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.num_classes:
            return self.G(z)
        y = torch.arange(self.seen, self.seen + len(z), device=z.device) % self.num_classes
        self.seen += len(z)
        return self.G(z, y)


class GAN(nn.Module):
    optimizers = ("D", "G")
    capabilities = frozenset()  # with model.ema, the instance's own: {"ema"}

    def __init__(self, channels: int, image_size: int, z_dim: int = 100, ch: int = 64, loss: str = "ns",
                 arch: str = "auto", depth: int = 3, d_steps: int = 1, d_norm: str = "auto", sn: bool = False,
                 gp: float = 10.0, clip: float = 0.01, r1: float = 0.0, r1_every: int = 16, r2: float = 0.0,
                 r2_every: int = 16, ema: float = 0.0,
                 augment: list | str = (), augment_p: float | str = 1.0, ada_target: float = 0.6,
                 ada_interval: int = 4, ada_kimg: float = 500, conditional: bool = False, num_classes: int = 0,
                 reuse_fakes: bool = False):
        super().__init__()
        arch = resolve_arch(arch, image_size)
        self.z_dim, self.points, self.reconstructs = z_dim, arch == "mlp", arch == "lightweight"
        self.loss_fn = losses.LOSSES[loss]
        self.num_classes = num_classes if conditional else 0
        self.augment = diffaug.parse(augment)
        # The probability each DiffAugment transform is applied with: 1 (always), a fixed number, or `auto`,
        # adaptive augmentation (Karras et al. 2020, ADA, Sec. 3): p starts at 0 and follows the
        # overfitting heuristic r_t = E[sign(D(x_real))], up when r_t is above ada_target, down below it,
        # every ada_interval steps, by as much as lets it cross [0, 1] in ada_kimg thousand images.
        # p and its running sums are buffers: they are in every checkpoint, so a resume continues them.
        self.adaptive = augment_p == "auto"
        self.ada = (ada_target, ada_interval, ada_kimg)
        if self.adaptive:
            for name in ("augment_p", "ada_signs", "ada_logits", "ada_images"):
                self.register_buffer(name, torch.zeros(()))
        else:
            self.fixed_p = None if augment_p == 1 else float(augment_p)
        # D's regularisers: the gradient penalty belongs to wgan_gp and clipping to wgan, as in the papers;
        # R1 and R2 (weight gamma / 2 each) go with any loss.
        self.regularisers = [*([Regulariser("gp", gp)] if loss == "wgan_gp" else []),
                             *([Regulariser("r1", 0.5 * r1, r1_every)] if r1 else []),
                             *([Regulariser("r2", 0.5 * r2, r2_every)] if r2 else []),
                             *([Regulariser("clip", clip)] if loss == "wgan" else [])]
        # D's batch norm mixes examples, which WGAN-GP's per-example gradient penalty (Gulrajani et al.
        # 2017, Sec. 4) and spectral norm's Lipschitz bound do not allow for: auto leaves it out then. R1
        # keeps it: on Fashion-MNIST hinge + R1 with batch norm is ahead of hinge alone at 5,000 steps, and
        # D without batch norm was far behind, with or without R1 (docs/quality.md, "R1 with D's batch norm").
        # Checkpoints of format 1 had it off with R1 (checkpoint.py).
        if d_norm == "auto":
            d_norm = "none" if sn or loss == "wgan_gp" else "batch"

        # The runs of one training step, which is one G update: D d_steps times, the lazy penalties as their
        # own phase every few steps (StyleGAN2's Dreg), then G. With reuse_fakes, G's phase scores the fakes
        # D's last phase trained on, with D's updated weights, as the PyTorch DCGAN example's step does: one G
        # forward fewer a step, so that phase records G's graph and hands the fakes over in the step's
        # `carry` (loop.Step), which lives for one step: nothing is kept on the model between phases.
        self.reuse_fakes = reuse_fakes
        # The lazy penalties that share an interval share a Dreg phase (R1 and R2 at one interval: one phase).
        intervals = sorted({reg.every for reg in self.lazy})
        name = lambda every: "Dreg" if len(intervals) == 1 else f"Dreg{every}"
        self.dreg = {name(every): [reg for reg in self.lazy if reg.every == every] for every in intervals}
        last_d = Phase("D", "D", records=("G",) if reuse_fakes else ())
        self.phases = (*[Phase("D", "D")] * (d_steps - 1), last_d,
                       *[Phase(name(every), "D", every) for every in intervals], Phase("G", "G"))
        # D gives one logit (or critic score) per example; G's raw output is squashed to [-1, 1] for images.
        if arch == "dcgan":
            self.G = Decoder(z_dim, channels, image_size, ch, num_classes=self.num_classes)
            if self.num_classes:  # DCGAN's D with its last layer as psi and the final feature map as phi
                body = Encoder(channels, image_size, ch, 0, norm=d_norm == "batch")
                self.D = Projection(body, body.features, self.num_classes)
            else:
                self.D = Encoder(channels, image_size, ch, 1, norm=d_norm == "batch")
            dcgan_init(self)
        elif arch == "lightweight":  # FastGAN (Liu et al. 2021): its D keeps its batch norm, as the paper's
            self.G = LightweightG(z_dim, channels, image_size, ch)
            self.D = LightweightD(channels, image_size, ch)
            dcgan_init(self)
        elif arch == "r3gan":  # R3GAN (Huang et al. 2024): no normalisation, its own initialisation
            self.G = R3GANG(z_dim, channels, image_size, ch)
            self.D = R3GAND(channels, image_size, ch)
        elif arch == "resnet":
            # SNGAN's CIFAR-10 widths are 256 in G and 128 in D: ch=128 gives those.
            self.G = ResNetG(z_dim, channels, image_size, 2 * ch, self.num_classes)
            body = ResNetD(channels, image_size, ch)
            self.D = Projection(body, body.out_dim, self.num_classes)
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_uniform_(m.weight)  # as SNGAN's code
                    nn.init.zeros_(m.bias)
        else:
            self.G = MLP(z_dim, channels, ch, depth)
            self.D = MLP(channels, 1, ch, depth, act=lambda: nn.LeakyReLU(0.2))
        if sn:
            # Spectral normalisation (Miyato et al. 2018, Eq. 8): W / sigma(W) with sigma estimated by one
            # power iteration per step, so every layer of D is 1-Lipschitz.
            for m in list(self.D.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    spectral_norm(m)
        self.G_ema = EMA(self.G, ema, z_dim, self.num_classes) if ema else None
        self.use_ema = bool(ema)  # sampling reads G_ema; `ema=false` at sample/eval time reads G
        self.capabilities = frozenset({EMA_CAPABILITY} if ema else ())

    @property
    def lazy(self) -> list[Regulariser]:
        """The penalties that run every few steps, in the Dreg phase."""
        return [reg for reg in self.regularisers if reg.every > 1 and not reg.constraint]

    @classmethod
    def check(cls, s, facts: DataFacts) -> None:
        """The GAN settings as one clear line each when wrong."""
        if s["loss"] not in losses.LOSSES:
            raise GentrainError(f"model.loss={s['loss']!r} is not a GAN loss; choose from {', '.join(losses.LOSSES)}")
        if s["arch"] not in (*ARCHS, "auto"):
            raise GentrainError(f"model.arch={s['arch']!r} is unknown; choose from {', '.join(ARCHS)}")
        arch = resolve_arch(s["arch"], facts.image_size)
        if (arch == "mlp") != facts.points:
            raise GentrainError("model.arch=mlp is for 2-D points (dataset=ring8|grid25); images need model.arch=dcgan|resnet|r3gan"
                                if arch == "mlp" else f"model.arch={arch} needs images; this dataset holds 2-D points, "
                                f"which need model.arch=mlp (or auto)")
        if not facts.points:
            plan(facts.image_size)
        for key in ("z_dim", "ch", "depth", "d_steps", "r1_every", "r2_every", "ada_interval"):
            integer(1)(f"model.{key}", s[key])
        positive()("model.ada_kimg", s["ada_kimg"])
        if arch == "r3gan" and s["conditional"]:
            raise GentrainError("model.arch=r3gan is unconditional here; use model.arch=dcgan or resnet with "
                                "model.conditional=true")
        if arch == "lightweight" and (facts.image_size & (facts.image_size - 1) or s["conditional"]):
            raise GentrainError("model.arch=lightweight (FastGAN) needs an unconditional model and a power-of-two "
                                f"image side, 128 to 512 px in the paper; got dataset.image_size={facts.image_size}"
                                f"{' and model.conditional=true' if s['conditional'] else ''}")
        p = s["augment_p"]
        if not (p == "auto" or (not isinstance(p, str) and 0 <= p <= 1)) or not 0 < s["ada_target"] < 1:
            raise GentrainError(f"model.augment_p must be a probability in [0, 1] or auto, and model.ada_target in "
                                f"(0, 1); got augment_p={p!r}, ada_target={s['ada_target']}")
        if s["d_norm"] not in ("auto", "batch", "none"):
            raise GentrainError(f"model.d_norm must be auto, batch or none, got {s['d_norm']!r}")
        gp, r1, r2, clip, ema = s["gp"], s["r1"], s["r2"], s["clip"], s["ema"]
        if not (gp >= 0 and r1 >= 0 and r2 >= 0 and clip > 0 and 0 <= ema < 1):
            raise GentrainError(f"need model.gp >= 0, model.r1 >= 0, model.r2 >= 0, model.clip > 0 and 0 <= model.ema < 1; "
                                f"got gp={gp}, r1={r1}, r2={r2}, clip={clip}, ema={ema}")
        try:
            augment = diffaug.parse(s["augment"])
        except ValueError as e:
            raise GentrainError(f"model.augment: {e}") from None
        if augment and facts.points:
            raise GentrainError("model.augment (DiffAugment) transforms images; use it with image data")
        if p != 1 and not augment:
            raise GentrainError(f"model.augment_p={p} sets how often the DiffAugment transforms apply, and "
                                f"model.augment lists none; add them, e.g. model.augment=[color,translation,cutout]")
        if s["conditional"] and not facts.num_classes:
            raise GentrainError("model.conditional=true needs a labelled dataset (one with classes); this one has none")

    def phase_parameters(self, opt: str):
        return {"D": self.D, "G": self.G}[opt].parameters()

    def noise(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randn(n, self.z_dim, generator=generator, device=device)

    def _cond(self, y):
        return (y,) if self.num_classes else ()

    def _generate(self, G, z, y):
        out = G(z, *self._cond(y))
        return out if self.points else torch.tanh(out)

    def sample(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Samples for the codes z (images in [-1, 1], or points), from the EMA generator when there is
        one. A conditional model without labels y draws the classes in turn, 0, 1, 2, ..."""
        if self.num_classes and y is None:
            y = torch.arange(len(z), device=z.device) % self.num_classes
        if self.use_ema and self.G_ema is not None:
            self.G_ema.calibrate()
            return self._generate(self.G_ema, z, y)
        return self._generate(self.G, z, y)

    def calibrate_ema(self) -> None:
        """The EMA's batch-norm statistics for its current weights, before a checkpoint is written."""
        if self.G_ema is not None:
            self.G_ema.calibrate()

    def loss(self, phase: str, x: torch.Tensor, y: torch.Tensor | None = None, step: int = 0,
             carry: dict | None = None):
        """`carry`: the step's hand-over between its phases (loop.Step), or None: D's last phase leaves
        its fakes there for G's phase (model.reuse_fakes)."""
        cond = self._cond(y)
        p = self.augment_p if self.adaptive else self.fixed_p
        aug = lambda images: diffaug.diff_augment(images, self.augment, p)
        # The penalties differentiate D's input gradient, a second backward that compiled networks
        # (trainer.compile) do not support: they run D's plain forward.
        noise = lambda: per_example(lambda m: self.noise(m, device=x.device), len(x))
        if phase in self.dreg:
            # Lazy regularisation (Karras et al. 2020, Sec. 3.1): each penalty every `every` steps, scaled by
            # `every` so its average weight is unchanged, on augmented reals as D sees them, and R2 on fresh
            # fakes, augmented as D sees them (G is not trained here: no graph of G is kept).
            real_in, loss, stats, fake_in = aug(x), 0.0, {}, None
            if any(reg.reads_fakes for reg in self.dreg[phase]):
                with torch.no_grad():
                    fake_in = aug(self._generate(self.G, noise(), y))
            for reg in self.dreg[phase]:
                term = reg.penalty(self.D.forward, real_in, fake_in, *cond)
                loss = loss + reg.weight * reg.every * term
                stats[f"D/{reg.name}"] = term.detach()
            return loss, stats
        if phase == "D":
            # G's graph is recorded only where G's parameters take gradients: in the phase that `records` G.
            with torch.set_grad_enabled(self.reuse_fakes and torch.is_grad_enabled()):
                fake = self._generate(self.G, noise(), y)
            if fake.requires_grad and carry is not None:  # the phase that records G: G's phase scores these
                carry["fakes"] = (fake, y)
            fake = fake.detach()
            real_in, fake_in = aug(x), aug(fake)
            recons = None
            if self.reconstructs:  # FastGAN's D also reconstructs the real images from its own features
                real, recons = self.D(real_in, reconstruct=True)
                real = real.float()
            else:
                real = self.D(real_in, *cond).float()
            fake_out = self.D(fake_in, *cond).float()
            loss = self.loss_fn.d(real, fake_out)
            if self.loss_fn.logits:  # D(x) and D(G(z)) as probabilities: is D winning?
                stats = {"D(x)": torch.sigmoid(real).mean(), "D(G(z))": torch.sigmoid(fake_out).mean()}
            else:
                stats = {"D/real": real.mean(), "D/fake": fake_out.mean()}
            for reg in self.regularisers:
                if reg.every == 1 and not reg.constraint:
                    term = reg.penalty(self.D.forward, real_in, fake_in, *cond)
                    loss = loss + reg.weight * term
                    stats[f"D/{reg.name}"] = term
            if recons is not None:  # L_recons, weight 1 as in the paper
                loss = loss + recons
                stats["D/recons"] = recons
            if self.adaptive:
                self._observe(real.detach())
                stats["D/augment_p"] = self.augment_p
            return loss, {"D/loss": loss.detach()} | {k: v.detach() for k, v in stats.items()}
        if phase != "G":
            raise ValueError(f"the GAN has no phase {phase!r}")
        kept = carry.pop("fakes", None) if carry is not None else None
        if kept is not None:  # D's fakes of this step, their graph kept (only such fakes are)
            fake, fake_y = kept
        else:
            fake, fake_y = self._generate(self.G, noise(), y), y
        fake = self.D(aug(fake), *self._cond(fake_y)).float()
        real = None
        if self.loss_fn.g_reads_real:  # a relativistic loss compares with D's scores of real images
            with torch.no_grad():
                real = self.D(aug(x), *cond).float()
        loss = self.loss_fn.g(real, fake)
        return loss, {"G/loss": loss.detach()}

    @torch.no_grad()
    def _observe(self, real: torch.Tensor) -> None:
        """ADA's overfitting heuristic, summed on the device: the signs of D's outputs on real images."""
        self.ada_signs += real.sign().sum()
        self.ada_logits += real.numel()
        self.ada_images += len(real)

    @torch.no_grad()
    def _adapt(self, step) -> None:
        """Every ada_interval steps: r_t = E[sign(D(x_real))] over the interval (summed over ranks), and
        p <- clamp(p + sign(r_t - target) * images / (ada_kimg * 1000), 0, 1) (Karras et al. 2020, Sec. 3).
        Device tensors throughout, so it costs no host sync and a captured step can hold it."""
        target, interval, kimg = self.ada
        if isinstance(step, int) and (step + 1) % interval:
            return
        sums = dist.total(torch.stack([self.ada_signs, self.ada_logits, self.ada_images]))
        rt = sums[0] / sums[1].clamp(min=1)
        new_p = (self.augment_p + torch.sign(rt - target) * sums[2] / (kimg * 1000)).clamp(0, 1)
        now = (torch.as_tensor(step, device=new_p.device) + 1) % interval == 0
        self.augment_p.copy_(torch.where(now, new_p, self.augment_p))
        for acc in (self.ada_signs, self.ada_logits, self.ada_images):
            acc.copy_(torch.where(now, torch.zeros_like(acc), acc))

    @torch.no_grad()
    def after_step(self, phase: str, step: int) -> None:
        """After an optimizer step: D's constraints (WGAN's weight clipping), adaptive augmentation's update of
        its probability, and the EMA update of G."""
        if phase == "D":
            for reg in self.regularisers:
                if reg.constraint:
                    reg.apply(self.D)
            if self.adaptive:
                self._adapt(step)
        if phase == "G" and self.G_ema is not None:
            self.G_ema.update(self.G)


def resolve_arch(arch: str, image_size: int) -> str:
    """model.arch=auto: the MLP for 2-D points (image_size 0), DCGAN for images."""
    if arch == "auto":
        return "mlp" if image_size == 0 else "dcgan"
    return arch
