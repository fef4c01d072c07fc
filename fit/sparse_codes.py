"""Products with top-k codes whose gradients touch only the top-k entries.

A TopK code matrix Z (B x k) holds top_k nonzeros per row. Its two products in a training step,
the encoder's Z = topk(x E^T + b) and the decoder's x_hat = Z D, cost B x d x k each way as
dense matrices; from the top-k lists they cost B x d x top_k. On 2 CPU cores that took a TopK
step at the demo's size (d 1,280, 512 concepts, top-k 32, batch 1,024) from 64 ms to 37-46 ms,
and at the paper's (d 768, 3,840 concepts, top-k 384) from 0.25 s to 0.19 s at batch 1,024,
where the sparse kernels are only a little faster than BLAS. A GPU's tensor cores take the
dense products (`top_k_products_pay`).

The gradients need Z^T (token rows summed into concept rows) and, for each kept entry, one dot
product of the output gradient with its atom (an SDDMM); both come from the entries grouped by
concept, one stable sort of the indices per product.
"""

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F


class _ByConcept(NamedTuple):
    """The (token, slot) entries of B x top_k index lists, grouped by concept."""
    order: torch.Tensor  # positions in the flattened lists, by concept, tokens ascending
    tokens: torch.Tensor  # the token of each
    offsets: torch.Tensor  # (concepts,) where each concept's group starts
    counts: torch.Tensor  # (concepts,) its size


def _by_concept(indices: torch.Tensor, concepts: int) -> _ByConcept:
    flat = indices.flatten()
    order = flat.sort(stable=True).indices  # stable: a fixed order of summation
    counts = torch.bincount(flat, minlength=concepts)
    return _ByConcept(order, order // indices.shape[1], counts.cumsum(0) - counts, counts)


def _concept_rows(groups: _ByConcept, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Z^T rows: row i is sum of weights[b, j] rows[b] over the entries (b, j) of concept i."""
    return F.embedding_bag(groups.tokens, rows, groups.offsets, mode="sum",
                           per_sample_weights=weights.flatten()[groups.order])


def _entry_dots(groups: _ByConcept, indices: torch.Tensor, atoms: torch.Tensor,
                grad: torch.Tensor) -> torch.Tensor:
    """<grad[b], atoms[indices[b, j]]> for every entry, shaped as indices (an SDDMM)."""
    rows = F.pad(groups.counts.cumsum(0), (1, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        mask = torch.sparse_csr_tensor(rows, groups.tokens, grad.new_zeros(len(groups.tokens)),
                                       (len(atoms), len(grad)))
        dots = torch.sparse.sampled_addmm(mask, atoms, grad.T, beta=0.0).values()
    return torch.empty_like(dots).scatter_(0, groups.order, dots).view_as(indices)


class _TopKOfLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, top_k):
        values, indices = torch.addmm(bias, x, weight.T).topk(top_k, dim=-1)
        ctx.save_for_backward(x, weight, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _):
        x, weight, indices = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, mode="sum", per_sample_weights=grad_values)
        if ctx.needs_input_grad[1]:
            grad_weight = _concept_rows(_by_concept(indices, len(weight)), grad_values, x)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_values.new_zeros(len(weight)).index_add_(
                0, indices.flatten(), grad_values.flatten())
        return grad_x, grad_weight, grad_bias, None


class _DecodeTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, values, atoms):
        ctx.save_for_backward(indices, values, atoms)
        return F.embedding_bag(indices, atoms, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad):
        indices, values, atoms = ctx.saved_tensors
        groups = _by_concept(indices, len(atoms))
        grad_values = _entry_dots(groups, indices, atoms, grad) if ctx.needs_input_grad[1] else None
        grad_atoms = _concept_rows(groups, values, grad) if ctx.needs_input_grad[2] else None
        return None, grad_values, grad_atoms


def top_k_products_pay(device: torch.device) -> bool:
    """Whether training takes these products: on CPU; a GPU's tensor cores take the dense ones."""
    return device.type == "cpu"


def topk_of_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the top_k largest entries of each row of x W^T + b; the gradients of
    W, b (and x) come from those entries alone."""
    return _TopKOfLinear.apply(x, weight, bias, top_k)


def decode_top_k(indices: torch.Tensor, values: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """sum over j of values[b, j] atoms[indices[b, j]]: Z D from the top-k lists, in both
    directions."""
    return _DecodeTopK.apply(indices, values, atoms)
