"""The sparse autoencoder: pre-bias, linear encoder, an encoder rule, a dictionary; and the table
of named SAEs (`SAE_PRESETS`) with `build_sae` to make one from settings.
"""

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from archsae.errors import UserError
from archsae.fit.dictionaries import ArchetypalDictionary, FreeDictionary
from archsae.fit.encoders import ENCODERS, Codes

# name -> (encoder, dictionary, delta)
SAE_PRESETS: dict[str, tuple[str, str, float]] = {
    "ra": ("topk", "archetypal", 1.0),
    "a": ("topk", "archetypal", 0.0),
    "topk": ("topk", "free", 0.0),
    "batchtopk": ("batchtopk", "free", 0.0),
    "jumprelu": ("jumprelu", "free", 0.0),
    "relu": ("relu", "free", 0.0),
}
DICTIONARIES = ("free", "archetypal")
DECODER_INITS = ("random", "centroids")


@dataclass
class SAESettings:
    """Everything that defines the model (the training settings live in `FitSettings`)."""

    sae: str = "ra"
    d: int = 768
    concepts: int = 3840
    top_k: int = 384
    encoder: str = "topk"
    dictionary: str = "archetypal"
    delta: float = 1.0
    projection: str = "exact"
    multiplier: bool = False
    project: bool = True  # archetypal constraint on; off is the control of the stability study
    decoder_init: str = "random"  # free dictionaries: "centroids" starts atom i at centroid i
    n_centroids: int = 0
    centroids: str | None = None  # name of the centroid set in the store

    @classmethod
    def from_dict(cls, data: dict) -> "SAESettings":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_centroids(self) -> bool:
        return self.dictionary == "archetypal" or self.decoder_init == "centroids"


class SparseAutoencoder(nn.Module):
    """x -> codes z (B, k) -> x_hat = z D + b_pre, on standardised activations."""

    def __init__(self, settings: SAESettings, points: torch.Tensor | None = None):
        super().__init__()
        s = settings
        if s.encoder not in ENCODERS:
            raise UserError(f"unknown --encoder {s.encoder!r}: use one of {', '.join(ENCODERS)}")
        if s.dictionary not in DICTIONARIES:
            raise UserError(f"unknown --dictionary {s.dictionary!r}: use one of {', '.join(DICTIONARIES)}")
        if not 0 < s.top_k <= s.concepts:
            raise UserError(f"--top-k {s.top_k} must be between 1 and --concepts {s.concepts}")
        if s.needs_centroids and points is None:
            raise UserError("this SAE needs centroids: run `archsae centroids` first")
        self.settings = s
        if s.dictionary == "archetypal":
            self.dictionary = ArchetypalDictionary(s.concepts, points, s.delta, s.projection,
                                                   s.multiplier, s.project)
        else:
            init = None
            if s.decoder_init == "centroids":
                if len(points) < s.concepts:
                    raise UserError(f"--decoder-init centroids needs at least {s.concepts} "
                                    f"centroids, got {len(points)}: compute more")
                init = points[: s.concepts]
            self.dictionary = FreeDictionary(s.concepts, s.d, init)
        self.encoder = ENCODERS[s.encoder](s.concepts, s.top_k)
        self.pre_bias = nn.Parameter(torch.zeros(s.d))
        self.enc = nn.Linear(s.d, s.concepts)
        with torch.no_grad():  # z_i = <x, D_i / |D_i|> / mean |D|: top-k picks by alignment
            atoms = self.dictionary.weight()
            norms = atoms.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            self.enc.weight.copy_(atoms / norms / norms.mean())
            self.enc.bias.zero_()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x - self.pre_bias)

    def encode(self, x: torch.Tensor) -> Codes:
        return self.encoder(self.pre_activations(x))

    def decode(self, codes: Codes, atoms: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
        atoms = self.dictionary.weight() if atoms is None else atoms
        if codes.indices is not None:  # k entries per row: a gather instead of a dense product
            x_hat = F.embedding_bag(codes.indices, atoms, per_sample_weights=codes.values,
                                    mode="sum")
        else:
            x_hat = codes.dense @ atoms
        return x_hat + self.pre_bias if bias else x_hat

    def forward(self, x: torch.Tensor):
        """(x_hat, codes, pre-activations)."""
        pre = self.pre_activations(x)
        codes = self.encoder(pre)
        return self.decode(codes), codes, pre

    @torch.no_grad()
    def project_(self) -> None:
        self.dictionary.project_()


def sae_settings(sae: str, d: int, concepts: int | None = None, top_k: int | None = None,
                 **overrides) -> SAESettings:
    """Settings for a named SAE with the paper's defaults (k = 5 d, top-k = k / 10)."""
    if sae not in SAE_PRESETS:
        raise UserError(f"unknown --sae {sae!r}: use one of {', '.join(SAE_PRESETS)}")
    encoder, dictionary, delta = SAE_PRESETS[sae]
    concepts = concepts or 5 * d
    values = {"encoder": encoder, "dictionary": dictionary, "delta": delta,
              **{k: v for k, v in overrides.items() if v is not None}}
    return SAESettings(sae=sae, d=d, concepts=concepts, top_k=top_k or max(1, concepts // 10),
                       **values)
