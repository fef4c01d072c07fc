"""Encoders: pre-activations (B, k) -> sparse codes. Any of them pairs with any dictionary.

- `TopK`: keep the k largest (ReLU) per token; exact L0 = k.
- `BatchTopK`: keep the k * B largest over the batch; at inference a threshold learnt as a running
  mean of the smallest kept value (saved with the weights: the reference library does not).
- `JumpReLU`: z = pre * H(pre - theta), theta learnt through a straight-through rectangle kernel
  (Rajamanoharan et al. 2024) with an L0 penalty. Inputs are standardised (codes of order 1),
  so the kernel's bandwidth is 0.05 rather than the 0.001 used on raw residual streams.
- `ReLU`: z = relu(pre) with an L1 penalty weighted by atom norms.
The penalised encoders (JumpReLU, ReLU) reach a target L0 through an adaptive coefficient, so
every SAE can be compared at the same sparsity.
"""

from typing import NamedTuple

import torch
from torch import nn


class Codes(NamedTuple):
    dense: torch.Tensor | None  # (B, k); None where only the top-k lists were kept (training)
    indices: torch.Tensor | None = None  # (B, top_k) when each row has exactly top_k entries
    values: torch.Tensor | None = None

    def l0(self) -> torch.Tensor:
        """Mean number of nonzero codes per token (from the top-k lists when there are some: a
        tenth of the reads of the dense codes)."""
        active = self.dense if self.values is None else self.values
        return (active > 0).sum(-1, dtype=torch.float32).mean()

    def fired(self, concepts: int) -> torch.Tensor:
        """(concepts,) bool: the codes nonzero on at least one token; from the dense codes when
        there are some (on a GPU the scatter from the lists' B x top-k entries into `concepts`
        slots took 0.29 ms of an H200's step at the paper's size, most of it contention)."""
        if self.dense is not None:
            return (self.dense > 0).any(0)
        hit = torch.zeros(concepts, dtype=torch.uint8, device=self.indices.device)
        positive = (self.values > 0).flatten().to(torch.uint8)
        return hit.scatter_reduce_(0, self.indices.flatten(), positive, "amax").bool()


class TopK(nn.Module):
    penalised = False

    def __init__(self, concepts: int, top_k: int):
        super().__init__()
        self.top_k = top_k

    def forward(self, pre: torch.Tensor) -> Codes:
        values, indices = pre.topk(self.top_k, dim=-1)
        values = torch.relu(values)
        return Codes(torch.zeros_like(pre).scatter(-1, indices, values), indices, values)


class BatchTopK(nn.Module):
    penalised = False

    def __init__(self, concepts: int, top_k: int, momentum: float = 0.01):
        super().__init__()
        self.top_k, self.momentum = top_k, momentum
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def forward(self, pre: torch.Tensor) -> Codes:
        acts = torch.relu(pre)
        if not self.training:
            return Codes(acts * (acts > self.threshold.nan_to_num(0.0)))
        flat = acts.flatten()
        values, indices = flat.topk(min(self.top_k * pre.shape[0], flat.numel()))
        with torch.no_grad():
            positive = values[values > 0]
            if len(positive):
                smallest = positive.min()
                t = self.threshold
                self.threshold.copy_(smallest if t.isnan() else t + self.momentum * (smallest - t))
        return Codes(torch.zeros_like(flat).scatter(0, indices, values).view_as(pre))


def _rectangle(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """The pseudo-derivative kernel K((pre - theta) / eps) / eps of a Heaviside step at theta."""
    return ((pre - theta).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpGate(torch.autograd.Function):
    """H(pre - theta), with the rectangle-kernel pseudo-derivative for theta."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        return None, (-grad * _rectangle(pre, theta, ctx.bandwidth)).sum(0), None


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta): exact gradient in pre, pseudo-derivative in theta."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        kernel = _rectangle(pre, theta, ctx.bandwidth)
        return grad * (pre > theta).to(pre.dtype), (-grad * theta * kernel).sum(0), None


class JumpReLU(nn.Module):
    penalised = True

    def __init__(self, concepts: int, top_k: int, bandwidth: float = 0.05, init_threshold: float = 1.0):
        super().__init__()
        self.top_k, self.bandwidth = top_k, bandwidth
        self.log_threshold = nn.Parameter(torch.full((concepts,), float(torch.tensor(init_threshold).log())))

    def forward(self, pre: torch.Tensor) -> Codes:
        theta = self.log_threshold.exp()
        return Codes(_JumpReLU.apply(pre, theta, self.bandwidth))

    def penalty(self, pre: torch.Tensor, codes: Codes, atom_norms: torch.Tensor) -> torch.Tensor:
        """Mean L0 per token, differentiable in theta."""
        return _JumpGate.apply(pre, self.log_threshold.exp(), self.bandwidth).sum(-1).mean()


class ReLU(nn.Module):
    penalised = True

    def __init__(self, concepts: int, top_k: int):
        super().__init__()
        self.top_k = top_k

    def forward(self, pre: torch.Tensor) -> Codes:
        return Codes(torch.relu(pre))

    def penalty(self, pre: torch.Tensor, codes: Codes, atom_norms: torch.Tensor) -> torch.Tensor:
        """Mean L1 per token, each code weighted by its atom's norm (scale-invariant)."""
        return (codes.dense * atom_norms).sum(-1).mean()


ENCODERS = {"topk": TopK, "batchtopk": BatchTopK, "jumprelu": JumpReLU, "relu": ReLU}
