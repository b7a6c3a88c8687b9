"""The contract between a model family and the rest of gentrain: the members every family has (a
typing.Protocol, not a base class), the phases one training step runs, and the optional capabilities a
family declares by name, which the verbs ask for instead of asking which family they hold."""

from typing import Iterable, Mapping, NamedTuple, Protocol, runtime_checkable

import torch

from gentrain.data import DataFacts


class Phase(NamedTuple):
    """One run of a training step: minimise `loss(name, ...)` with the optimizer `opt`, on the steps where
    step % every == 0. Phases that share an optimizer share its parameters and state, as StyleGAN2-ADA's
    Dmain and Dreg share D's Adam (Karras et al. 2020, training/training_loop.py). A phase may appear
    several times in a step (a GAN's d_steps D updates); each run reads a batch of its own. `records` names
    the optimizers of later phases whose networks this phase runs with their autograd graph kept, for a later
    phase of the same step to differentiate (a GAN's D phase drawing the fakes that G's phase then scores)."""

    name: str
    opt: str
    every: int = 1
    records: tuple[str, ...] = ()


@runtime_checkable
class Family(Protocol):
    """What the loop, the verbs and the checkpoints need of every model family (an nn.Module)."""

    optimizers: tuple[str, ...]      # the optimizers a step updates, one per parameter set; optim.lr_<name>
    phases: tuple[Phase, ...]        # the runs of one training step, in order
    num_classes: int                 # classes a conditional model draws for; 0 when unconditional
    capabilities: frozenset[str]     # the optional capabilities below that this model has

    @classmethod
    def check(cls, settings: Mapping, facts: DataFacts) -> None:
        """Refuse, with one GentrainError line, model settings (the config with defaults filled in) that
        are wrong in themselves or for data with these facts: run before any data is loaded."""

    def phase_parameters(self, opt: str) -> Iterable[torch.nn.Parameter]:
        """The parameters the optimizer `opt` updates."""

    def loss(self, phase: str, x: torch.Tensor, y: torch.Tensor | None, step: int | torch.Tensor,
             carry: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The phase's loss on a batch (x, y) and the detached numbers to log, named `<network>/<what>`.
        `carry` is the one place a phase hands something to a later phase of the same step (a GAN's D
        phase leaves the fakes it drew for G's phase); it starts empty every step, so a step's state is the
        networks, optimizers and RNG alone, which the loop can snapshot and restore."""

    def after_step(self, phase: str, step: int | torch.Tensor) -> None:
        """Called after the phase's optimizer step (weight clipping, an EMA of weights); may do nothing."""

    def noise(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """The randomness of n samples."""

    def sample(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Samples for the noise z (and classes y): images in [-1, 1], or 2-D points."""


# Optional capabilities. A family lists the ones it has in `capabilities`; each names the members below.

EMA = "ema"                  # an EMA of the generator's weights, which sampling reads while use_ema is true
RECONSTRUCT = "reconstruct"  # images -> their reconstructions (an autoencoder)
INTERPOLATE = "interpolate"  # interpolation between two images (where noise codes have nothing between them)
LIKELIHOOD = "likelihood"    # a bound on -log p(x) split into rate and distortion (gentrain eval's nll)
IWAE = "iwae"                # importance weights of q(z|x), for the IWAE estimate of log p(x)
CODEC = "codec"              # images <-> codes, with what a code costs (gentrain encode/decode)
BITSTREAM = "bitstream"      # discrete codes under a causal prior: an arithmetic-coded file (encode out=*.gtc)
LATENT_PRIOR = "latent_prior"  # continuous codes whose sampling prior can be a density fitted after training


@runtime_checkable
class HasEMA(Protocol):
    use_ema: bool

    def calibrate_ema(self) -> None:
        """Bring what the EMA samples with up to date (its batch-norm statistics), before a checkpoint."""


@runtime_checkable
class Reconstructs(Protocol):
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images x in [-1, 1] (and their classes) -> reconstructions in [-1, 1]."""


@runtime_checkable
class Interpolates(Protocol):
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Rows of images a, b and the points t in [0, 1] -> rows x len(t) images between them."""


@runtime_checkable
class HasLikelihood(Protocol):
    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """The pixels the model is trained and scored on (binarised, for a binarising model)."""

    def rate_distortion(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, in nats: the rate (what the code costs) and the distortion -log p(x|z)."""

    def protocol(self) -> dict:
        """What its likelihood numbers mean (likelihoods.protocol), for eval.json."""


@runtime_checkable
class ImportanceWeighted(Protocol):
    def log_weights(self, x: torch.Tensor, k: int, chunk: int = 100, y: torch.Tensor | None = None) -> torch.Tensor:
        """(N, k) log importance weights log p(x, z_i) - log q(z_i|x) of k samples z_i ~ q(z|x)."""


@runtime_checkable
class Codec(Protocol):
    code_shape: list[int]   # one image's code
    num_codes: int          # discrete codes: indices into this many; 0: real-valued codes

    def encode_codes(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (codes as stored, what each costs in nats)."""

    def decode_codes(self, codes: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Stored codes -> images in [-1, 1]."""

    def describe_codes(self, dtype: torch.dtype, rate_bits: float, stored_bits: int) -> str:
        """What the codes are and what they cost, for the encode report."""


@runtime_checkable
class EntropyCoded(Protocol):
    code_shape: list[int]   # the grid of code indices (H, W)
    num_codes: int

    def code_logits(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, H, W) code indices -> (N, K, H, W) logits of p(c_i | c_<i) in raster order: a cell's logits
        read only the cells before it."""


@runtime_checkable
class FittedPrior(Protocol):
    latent_prior: object  # None: N(0, I); else a fitted density with sample(n, generator) (models/prior.py)

    def posterior_means(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] (and classes) -> the means of q(z|x), flat (N, D): what a sampling prior is
        fitted to. noise() draws from latent_prior while it is set."""


PROTOCOLS = {EMA: HasEMA, RECONSTRUCT: Reconstructs, INTERPOLATE: Interpolates, LIKELIHOOD: HasLikelihood,
             IWAE: ImportanceWeighted, CODEC: Codec, BITSTREAM: EntropyCoded, LATENT_PRIOR: FittedPrior}
