"""Every setting of the fit stage, declared once: the SAE, its training, its archetype points.

Each field carries its help text and its choices or range; construction checks them (so a
Python caller, a config.json read back and the CLI all get the same checks), and the CLI's
options are generated from the fields (`archsae.options`). `SAE_PRESETS` is the table of named
SAEs (`ra`, `a`, `topk`, ...) and `sae_settings` builds one from its name.
"""

import math
from dataclasses import asdict, dataclass, field, fields

import torch

from archsae.cache import TOKEN_KINDS, Split
from archsae.errors import InvalidSetting, UserError
from archsae.fit.encoders import ENCODERS
from archsae.fit.projections import PROJECTIONS

DICTIONARIES = ("free", "archetypal")
DECODER_INITS = ("random", "centroids")
ENCODER_INITS = ("tied", "random")
TOKEN_CHOICES = ("all",) + TOKEN_KINDS
PAPER_CENTROIDS = 32000  # K-means centroids per backbone in the paper
DEFAULT_NITER = 20  # K-means iterations
ARCHETYPAL_WARMUP = 0.05  # FitSettings.warmup's default for archetypal dictionaries (docs/fit.md)

# name -> (encoder, dictionary, delta)
SAE_PRESETS: dict[str, tuple[str, str, float]] = {
    "ra": ("topk", "archetypal", 1.0),
    "a": ("topk", "archetypal", 0.0),
    "topk": ("topk", "free", 0.0),
    "batchtopk": ("batchtopk", "free", 0.0),
    "jumprelu": ("jumprelu", "free", 0.0),
    "relu": ("relu", "free", 0.0),
}


def setting(default, help: str, choices=None, low=None, high=None, low_open=False,
            high_open=False, type=None, flags: str | None = None, check=None, cli: bool = True):
    """A dataclass field with what the CLI and the checks need: help, choices, a range
    [low, high] (open at either end when asked), its type when the default is None, a custom
    check, the CLI's flag names (comma-separated; a bool's "--on/--off")."""
    return field(default=default, metadata={
        "help": help, "choices": choices, "low": low, "high": high, "low_open": low_open,
        "high_open": high_open, "type": type or _type_of(default), "flags": flags,
        "check": check, "cli": cli})


def _type_of(default):
    return str if default is None else type(default)


def describe_range(m) -> str:
    low = "" if m["low"] is None else f"{'>' if m['low_open'] else '>='} {m['low']:g}"
    high = "" if m["high"] is None else f"{'<' if m['high_open'] else '<='} {m['high']:g}"
    return " and ".join(p for p in (low, high) if p)


def _check_field(f, value) -> None:
    m = f.metadata
    if value is None:
        if f.default is not None:
            raise InvalidSetting(f.name, "{name} must be given")
        return
    if m.get("choices") is not None:
        if value not in m["choices"]:
            raise InvalidSetting(f.name, f"{{name}} {value!r} is not one of {', '.join(m['choices'])}")
        return
    kind = m["type"]
    if kind is str and not isinstance(value, str):
        raise InvalidSetting(f.name, f"{{name}} must be text, not {value!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise InvalidSetting(f.name, f"{{name}} must be true or false, not {value!r}")
        return
    if kind in (int, float):
        ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or not math.isfinite(value):
            raise InvalidSetting(f.name, f"{{name}} must be a finite {kind.__name__}, not {value!r}")
        low, high = m.get("low"), m.get("high")
        if (low is not None and (value < low or (m["low_open"] and value == low))) or \
                (high is not None and (value > high or (m["high_open"] and value == high))):
            raise InvalidSetting(f.name, f"{{name}} {value!r} is out of range: it must be "
                                         f"{describe_range(m)}")
    if m.get("check"):
        m["check"](f.name, value)


class Settings:
    """Checks on construction; `from_dict` refuses keys it does not know."""

    def __post_init__(self):
        for f in fields(self):
            _check_field(f, getattr(self, f.name))

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown {cls.__name__} key {unknown[0]!r}: the keys are "
                            f"{', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


def _torch_device(name: str, value: str) -> None:
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise InvalidSetting(name, f"{{name}} {value!r} is not a device: use cpu, cuda or cuda:N") from None


@dataclass
class SAESettings(Settings):
    """Everything that defines the model (its training is `FitSettings`)."""

    d: int = setting(768, "Features per token (from the store).", low=1, cli=False)
    encoder: str = setting("topk", "The encoder rule.", choices=tuple(ENCODERS))
    dictionary: str = setting("archetypal", "free (unit-norm atoms) or archetypal (W C + Lambda).",
                              choices=DICTIONARIES)
    delta: float = setting(1.0, "Relaxation radius of the archetypal dictionary (0: A-SAE).", low=0)
    concepts: int | None = setting(None, "Dictionary size [5 x d].", low=1, type=int)
    top_k: int | None = setting(None, "Active codes per token (target L0 for penalised encoders) "
                                      "[concepts / 10].", low=1, type=int)
    projection: str = setting("exact", "Simplex map after each step: exact Euclidean projection, or "
                                       "the paper's relu + renormalise.", choices=tuple(PROJECTIONS))
    project: bool = setting(True, "Control: --no-projection never projects W (atoms may leave the hull).",
                            flags="--project/--no-projection")
    w_candidates: int = setting(512, "Centroids each archetypal atom may combine at a time, chosen anew from a "
                                   "dense gradient every w_refresh updates of W (0: all; see docs/fit.md).",
                                low=0)
    multiplier: bool = setting(False, "Learnable scale exp(m) of D (reference library).")
    pre_bias: bool = setting(False, "Learn the bias subtracted before encoding and added after decoding "
                                    "(Gao et al.); off, it stays at 0, the standardised inputs' mean "
                                    "(see docs/fit.md).",
                             flags="--pre-bias/--no-pre-bias")
    decoder_init: str = setting("random", "Free dictionaries: control that starts atom i at centroid i.",
                                choices=DECODER_INITS)
    encoder_init: str | None = setting(None, "Encoder rows at the start: along the atoms (tied), or drawn as "
                                             "nn.Linear draws them (random, the reference's TopKSAE) [tied where "
                                             "the atoms start at centroids, else random].",
                                       choices=ENCODER_INITS, type=str)
    centroids: str | None = setting(None, "Name of an existing centroid set in the store [computed].")

    def __post_init__(self):
        _check_field(next(f for f in fields(self) if f.name == "d"), self.d)
        if self.concepts is None:
            self.concepts = 5 * self.d
        if self.top_k is None:
            self.top_k = max(1, self.concepts // 10)
        super().__post_init__()
        if self.top_k > self.concepts:
            raise InvalidSetting("top_k", f"{{name}} {self.top_k} must not exceed the {self.concepts} concepts")

    @property
    def name(self) -> str:
        """What the SAE is, derived from encoder x dictionary x delta (and the controls)."""
        if self.dictionary == "archetypal":
            name = "ra" if self.delta > 0 else "a"
            name += "" if self.encoder == "topk" else f"-{self.encoder}"
            name += "" if self.project else "-no-projection"
        else:
            name = self.encoder + ("-centroid-init" if self.decoder_init == "centroids" else "")
        if self.tied_encoder != self.needs_centroids:  # not the default init
            name += "-tied-encoder" if self.tied_encoder else "-random-encoder"
        return name

    @property
    def tied_encoder(self) -> bool:
        """By default the encoder starts along the atoms where they start at centroids (a random
        one costs RA-SAE 8 points of R^2); random free atoms get nn.Linear's draw, which on real
        features matches the reference's TopKSAE where tying them does not (docs/fit.md)."""
        return self.needs_centroids if self.encoder_init is None else self.encoder_init == "tied"

    @property
    def needs_centroids(self) -> bool:
        return self.dictionary == "archetypal" or self.decoder_init == "centroids"


def preset_values(sae: str) -> dict:
    """The fields a named SAE sets: {"encoder", "dictionary", "delta"}."""
    if sae not in SAE_PRESETS:
        raise InvalidSetting("sae", f"{{name}} {sae!r} is not one of {', '.join(SAE_PRESETS)}")
    return dict(zip(("encoder", "dictionary", "delta"), SAE_PRESETS[sae]))


def sae_settings(sae: str | None, d: int, concepts: int | None = None, top_k: int | None = None,
                 **values) -> SAESettings:
    """Settings of a named SAE (`SAE_PRESETS`) with the paper's defaults (k = 5 d, top-k = k / 10);
    `values` that contradict the name (another encoder or dictionary, delta 0 for RA-SAE) are
    refused; without a name, `values` alone define the SAE."""
    values = {k: v for k, v in {**values, "concepts": concepts, "top_k": top_k}.items() if v is not None}
    if sae is None:
        return SAESettings(d=d, **values)
    preset = preset_values(sae)
    for key in ("encoder", "dictionary"):
        if key in values and values[key] != preset[key]:
            raise InvalidSetting(key, f"{{name}} {values[key]} contradicts the SAE {sae!r} "
                                      f"({preset['encoder']} x {preset['dictionary']}): leave the "
                                      "SAE's name out to combine encoder and dictionary freely")
    if "delta" in values and preset["dictionary"] == "archetypal" and \
            (values["delta"] > 0) != (preset["delta"] > 0):
        raise InvalidSetting("delta", f"{{name}} {values['delta']:g} contradicts the SAE {sae!r}: "
                                      "RA-SAE has delta > 0, A-SAE delta 0")
    return SAESettings(d=d, **{**preset, **values})


@dataclass
class FitSettings(Settings):
    """How an SAE is trained, and on which tokens and split of the store."""

    epochs: int = setting(10, "Passes over the training tokens.", low=1)
    batch_size: int = setting(1024, "Tokens per training step.", low=1)
    lr: float = setting(5e-4, "Adam learning rate of the encoder and free dictionaries.", low=0, low_open=True)
    dictionary_lr: float = setting(2e-2, "Learning rate of the archetypal W and Lambda (a long fit may want "
                                         "less: see docs/fit.md).", low=0, low_open=True)
    dictionary_final_lr: float = setting(0.0, "Fraction of W's learning rate reached at the end of its own cosine "
                                              "decay (1: none; see docs/fit.md).", low=0, high=1)
    dictionary_eps: float = setting(1e-6, "Adam's eps for W (see docs/fit.md).", low=0, low_open=True)
    w_every: int = setting(1, "Steps between updates of the archetypal W; its gradient is the exact mean "
                              "of theirs, and W C is recomputed only then (see docs/fit.md).", low=1)
    w_refresh: int = setting(50, "Updates of W between choices of each atom's candidate centroids "
                                 "(w_candidates).", low=1)
    warmup: float | None = setting(None, "Fraction of the steps spent warming the learning rates up [0.05 "
                                         "with an archetypal dictionary, whose W starts at a high rate; 0 "
                                         "with a free one, as the reference's TopKSAE].",
                                   low=0, high=1, high_open=True, type=float)
    final_lr: float = setting(1.0, "Fraction of the learning rate reached at the end of a cosine decay "
                                   "(1: none; see docs/fit.md).", low=0, high=1)
    clip_grad: float = setting(1.0, "Gradient-norm clip (0: off).", low=0)
    aux_k: int | None = setting(None, "Codes of the AuxK dead-code loss [2 x top-k].", low=1, type=int)
    aux_alpha: float = setting(1 / 32, "Weight of the AuxK loss.", low=0)
    dead_tokens: int = setting(1_000_000, "A code silent for this many tokens (at most an epoch) is dead.", low=1)
    tokens: str = setting("all", "Which tokens to train on.", choices=TOKEN_CHOICES)
    heldout: float = setting(0.1, "Fraction of images held out (never trained on, nor in the centroids).",
                             low=0, high=1, low_open=True, high_open=True)
    split_seed: int = setting(0, "Seed of the held-out draw.", low=0)
    subset: float = setting(1.0, "Fraction of the training images used (data-perturbation studies).",
                            low=0, high=1, low_open=True)
    subset_seed: int = setting(0, "Seed of the subset draw.", low=0)
    seed: int = setting(0, "Seed of the initialisation and of the token order.", low=0)
    checkpoint_every: int = setting(500, "Steps between checkpoints.", low=1)
    log_every: int = setting(20, "Steps between rows of metrics.jsonl.", low=1)
    device: str | None = setting(None, "cpu, cuda, cuda:1 ... [cuda when available].", check=_torch_device)
    cuda_graphs: bool = setting(True, "On a GPU, replay each TopK training step as a captured CUDA graph "
                                      "rather than launch its kernels one by one from Python (see docs/fit.md).")

    # how a fit runs, not what it computes: a resumed fit takes these from the command
    RUNTIME = ("device", "cuda_graphs")

    @property
    def split(self) -> Split:
        return Split(self.heldout, self.split_seed)

    def warmup_for(self, sae: SAESettings) -> float:
        """The warm-up as asked, else by dictionary: it cost TopK 0.2-0.4 points of R^2 in short
        fits on real features, and W's high starting rate needs it (docs/fit.md)."""
        if self.warmup is not None:
            return self.warmup
        return ARCHETYPAL_WARMUP if sae.dictionary == "archetypal" else 0.0


@dataclass
class CentroidSettings(Settings):
    """The archetype points: K-means of standardised training tokens (`archsae.fit.centroids`)."""

    n_centroids: int | None = setting(
        None, f"Number of centroids [min({PAPER_CENTROIDS}, train tokens / 4)]; more per concept gives "
              "archetypal SAEs more R^2 and less stability across seeds (docs/fit.md).", low=1, type=int,
        flags="--n-centroids,--k")
    seed: int = setting(0, "K-means seed.", low=0)
    sample: int | None = setting(None, "Tokens given to K-means [256 per centroid, at most all; "
                                       "an existing set: whatever it used].",
                                 low=1, type=int)
    niter: int | None = setting(None, f"K-means iterations [{DEFAULT_NITER}; an existing set: whatever it "
                                      "used].", low=1, type=int)

