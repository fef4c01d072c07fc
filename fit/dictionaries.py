"""Dictionaries: the decoder's atoms D (k x d). Each has `weight()` and `project_()`, the
constraint map applied after every optimiser step.

- `FreeDictionary`: unconstrained atoms kept at unit norm (the standard SAE decoder).
- `ArchetypalDictionary`: D = exp(m) (W C + Lambda), C frozen archetype points (K-means
  centroids), W row-stochastic, ||Lambda_i|| <= delta. delta = 0 is A-SAE, delta > 0 RA-SAE.
  In training, the hull part H = W C is held as a leaf tensor; after each backward
  `collect_hull_gradient` adds dL/dH to a running sum, which `hull_gradient_to_W` turns into W's
  gradient (dL/dW = dL/dH C^T), so W can be updated every m steps at the cost of one product
  instead of three per step. (Data-parallel fits average dL/dH across processes before it is
  collected: k x d numbers instead of W's k x n'.)
"""

import warnings

import torch
from torch import nn

from archsae.errors import UserError
from archsae.fit.projections import PROJECTIONS, clip_row_norms, unit_rows


def hull_points(w: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """W C. On CPU, from W's nonzeros alone when it is as sparse as the exact projection leaves
    it (a few hundred of 32,000 centroids per row: 0.3 s instead of 0.6 s for 3,840 atoms of
    d 768, conversion included). On a GPU, counting them would make the host wait."""
    if w.device.type == "cpu" and int(torch.count_nonzero(w)) * 16 <= w.numel():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            return w.to_sparse_csr() @ points
    return w @ points


class FreeDictionary(nn.Module):
    def __init__(self, concepts: int, d: int, init: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        weight = torch.randn(concepts, d, generator=generator) if init is None else init.clone().float()
        self.atoms = nn.Parameter(unit_rows(weight))

    def weight(self) -> torch.Tensor:
        return self.atoms

    @torch.no_grad()
    def project_(self, hull: bool = True) -> None:
        self.atoms.copy_(unit_rows(self.atoms))


class ArchetypalDictionary(nn.Module):
    """Atoms in (a delta-neighbourhood of) the convex hull of the archetype points C."""

    def __init__(self, concepts: int, points: torch.Tensor, delta: float = 1.0,
                 projection: str = "exact", multiplier: bool = False, project: bool = True):
        super().__init__()
        n_points, d = points.shape
        if n_points < concepts:
            raise UserError(f"an archetypal dictionary of {concepts} concepts needs at least "
                            f"{concepts} centroids, got {n_points}: compute {concepts} or more "
                            "centroids, or ask for fewer concepts")
        self.register_buffer("points", points.float().contiguous())
        self.W = nn.Parameter(torch.eye(concepts, n_points))  # atom i starts at centroid i
        self.relax = nn.Parameter(torch.zeros(concepts, d))
        self.log_multiplier = nn.Parameter(torch.zeros(()), requires_grad=multiplier)
        self.delta, self.projection, self.project = float(delta), projection, project
        self._fused: torch.Tensor | None = None
        self._hull: torch.Tensor | None = None  # W C in training, a leaf for dL/d(W C)
        self.hull_grad_sum: torch.Tensor | None = None  # dL/d(W C) summed since W's update
        self.register_load_state_dict_post_hook(lambda module, keys: module._forget_fused())

    def _forget_fused(self) -> None:
        self._fused = self._hull = None

    def hull(self) -> torch.Tensor:
        """W C as a leaf whose .grad is this step's dL/d(W C)."""
        if self._hull is None or self._hull.device != self.W.device:
            with torch.no_grad():
                self._hull = hull_points(self.W, self.points).requires_grad_()
        return self._hull

    def weight(self) -> torch.Tensor:
        """D; in eval mode W C + Lambda is fused once and reused."""
        if self.training:
            return (self.hull() + self.relax) * self.log_multiplier.exp()
        if self._fused is None or self._fused.device != self.W.device:
            with torch.no_grad():
                hull = hull_points(self.W, self.points)
                self._fused = (hull + self.relax) * self.log_multiplier.exp()
        return self._fused

    @torch.no_grad()
    def collect_hull_gradient(self) -> None:
        """Add this step's dL/d(W C) to the running sum."""
        if self._hull is None or self._hull.grad is None:
            return
        grad, self._hull.grad = self._hull.grad, None
        self.hull_grad_sum = grad if self.hull_grad_sum is None else self.hull_grad_sum.add_(grad)

    @torch.no_grad()
    def hull_gradient_to_W(self, steps: int) -> None:
        """W's gradient: the mean over the last `steps` steps of dL/dW = dL/d(W C) C^T, exact
        because W did not change over them. The hull is rebuilt from W after its update."""
        grad, self.hull_grad_sum = self.hull_grad_sum, None
        self.W.grad = None if grad is None else (grad @ self.points.T).div_(steps)
        self._hull = None

    @torch.no_grad()
    def project_(self, hull: bool = True) -> None:
        """The constraint map; `hull=False`: W has not changed, only Lambda is clipped."""
        if not self.project:  # the "projection off" control of the stability study
            return
        if hull:
            PROJECTIONS[self.projection](self.W)
            self._hull = None
        self.relax.copy_(clip_row_norms(self.relax, self.delta))
        self._fused = None

    def train(self, mode: bool = True):
        self._forget_fused()
        return super().train(mode)
