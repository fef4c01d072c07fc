"""The sparse autoencoder: standardisation, pre-bias, linear encoder, an encoder rule, a
dictionary. `SAESettings` (in `archsae.fit.settings`) says which.
"""

import torch
import torch.nn.functional as F
from torch import nn

from archsae.errors import UserError
from archsae.fit.dictionaries import ArchetypalDictionary, FreeDictionary, dense_rows
from archsae.fit.encoders import ENCODERS, Codes, TopK
from archsae.fit.settings import SAESettings
from archsae.fit.sparse_codes import decode_top_k, top_k_products_pay, topk_of_linear

FREE_TIED_SCALE = 0.2  # of the tied encoder's rows, for random free atoms (docs/fit.md)


class SparseAutoencoder(nn.Module):
    """x -> codes z (B, k) -> x_hat = z D + b_pre, on standardised activations.

    The standardisation constants of the store (`input_mean`, `input_std`) are buffers of the
    model, saved with its weights: `standardise` maps raw activations to what it was trained on.
    Random parts of the initialisation are drawn from `generator` (the fit's seed)."""

    def __init__(self, settings: SAESettings, points: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        s = settings
        if s.needs_centroids and points is None:
            raise UserError(f"the SAE {s.name} needs centroids: compute them first "
                            "(`archsae centroids`)")
        self.settings = s
        self.register_buffer("input_mean", torch.zeros(s.d))
        self.register_buffer("input_std", torch.ones(s.d))
        if s.dictionary == "archetypal":
            self.dictionary = ArchetypalDictionary(s.concepts, points, s.delta, s.projection,
                                                   s.multiplier, s.project, s.w_candidates)
        else:
            init = None
            if s.decoder_init == "centroids":
                if len(points) < s.concepts:
                    raise UserError(f"a decoder started at the centroids needs at least "
                                    f"{s.concepts} centroids, got {len(points)}: compute more")
                init = points[: s.concepts]
            self.dictionary = FreeDictionary(s.concepts, s.d, init, generator)
        self.encoder = ENCODERS[s.encoder](s.concepts, s.top_k)
        self.pre_bias = nn.Parameter(torch.zeros(s.d), requires_grad=s.pre_bias)
        self.enc = nn.utils.skip_init(nn.Linear, s.d, s.concepts)  # set below
        with torch.no_grad():
            if not s.tied_encoder:  # nn.Linear's draw: U(-1/sqrt(d), 1/sqrt(d))
                bound = s.d ** -0.5
                self.enc.weight.uniform_(-bound, bound, generator=generator)
                self.enc.bias.uniform_(-bound, bound, generator=generator)
            else:  # tied: z_i = <x, D_i / |D_i|> / mean |D|: top-k picks by alignment
                atoms = self.dictionary.weight()
                norms = atoms.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                self.enc.weight.copy_(atoms / norms / norms.mean() * self._tied_scale())
                self.enc.bias.zero_()

    def _tied_scale(self) -> float:
        """Free atoms started at centroids are each aligned with a token: k of them rebuild it
        about k times over (R^2 -36 at init on real features, still < 0 after 100 steps), so
        their codes start at 1/k. Random free atoms start at FREE_TIED_SCALE: Adam moves each
        weight by about lr a step, so shorter rows learn faster (held-out R^2 by scale in
        docs/fit.md). Archetypal rows (1 / mean |D|, atoms at centroids) are short already."""
        s = self.settings
        if s.dictionary == "archetypal":
            return 1.0
        return 1 / s.top_k if s.decoder_init == "centroids" else FREE_TIED_SCALE

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations -> the standardised space the model works in."""
        return (x - self.input_mean) / self.input_std

    def _encoder_bias(self) -> torch.Tensor:
        """enc(x - pre_bias) is written as x E^T + (b - E pre_bias): the same numbers, but the
        pre-bias's gradient is then a product with a vector, not a (B x k) x (k x d) one."""
        return self.enc.bias - self.enc.weight @ self.pre_bias

    def pre_activations(self, x: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """enc(x - pre_bias); only those of `columns` when given."""
        weight, bias = self.enc.weight, self._encoder_bias()
        if columns is not None:
            weight, bias = weight[columns], bias[columns]
        return F.linear(x, weight, bias)

    def encode(self, x: torch.Tensor) -> Codes:
        """Codes; a TopK encoder in training (train mode, gradients on) keeps the top-k lists
        alone (no dense codes) where its gradient and the decode's pay as products over them
        (`fit.sparse_codes`)."""
        if (isinstance(self.encoder, TopK) and self.training and torch.is_grad_enabled()
                and top_k_products_pay(x.device)):
            values, indices = topk_of_linear(x, self.enc.weight, self._encoder_bias(), self.encoder.top_k)
            return Codes(None, indices, torch.relu(values))
        return self.encoder(self.pre_activations(x))

    def decode(self, codes: Codes, atoms: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
        atoms = self.dictionary.weight() if atoms is None else atoms
        # from the top-k lists, but for the dense product's gradient where that pays
        if codes.indices is not None and (not torch.is_grad_enabled() or top_k_products_pay(atoms.device)):
            x_hat = decode_top_k(codes.indices, codes.values, atoms)
        else:  # the dense codes, made from the lists when the encoder kept only those
            dense = (codes.dense if codes.dense is not None
                     else dense_rows(codes.values, codes.indices, len(atoms)))
            x_hat = dense @ atoms
        return x_hat + self.pre_bias if bias else x_hat

    def forward(self, x: torch.Tensor):
        """(x_hat, codes, pre-activations)."""
        pre = self.pre_activations(x)
        codes = self.encoder(pre)
        return self.decode(codes), codes, pre

    @torch.no_grad()
    def project_(self, hull: bool = True) -> None:
        self.dictionary.project_(hull)

