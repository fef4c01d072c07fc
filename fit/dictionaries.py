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
  With `candidates` s < n', each row of W lives on s centroids of its own (`W` is k x s, the
  buffer `candidates` their sorted column numbers): Adam and the projection cost k x s instead
  of k x n', and on CPU W C and dL/dW too, most of an RA step at the paper's 32,000 centroids (a
  GPU's tensor cores take those two products dense). Every few updates they are chosen
  anew (`choose_candidates`): the support W has, then the centroids that the mean dense dL/dW
  since the last choice pulls in hardest (exact: dL/d(W C) summed over those steps, times C^T).
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from archsae.errors import UserError
from archsae.fit.projections import PROJECTIONS, clip_row_norms, unit_rows


def hull_points(w: torch.Tensor, points: torch.Tensor,
                candidates: torch.Tensor | None = None) -> torch.Tensor:
    """W C in float32, W given on its `candidates` columns when there are any. On CPU only W's
    nonzeros are multiplied where it is as sparse as the exact projection leaves it (a few
    hundred of 32,000 centroids per row): on candidates by `_weighted_point_sums`, a dense W
    through CSR (0.3 s instead of 0.6 s for 3,840 atoms of d 768, conversion included). On a
    GPU the dense product on the tensor cores, under the caller's autocast (bf16 in training,
    as the decode that reads the atoms): on an H200 at the paper's size 0.65 ms against
    cuSPARSE's 0.75 ms, and no host waits for a count."""
    if w.device.type == "cpu":
        # in float32 under autocast too: sparse bf16 kernels are not everywhere
        with torch.autocast("cpu", enabled=False):
            if candidates is not None and _sparse_pays(candidates, points):
                return _weighted_point_sums(w, candidates, points)
            if candidates is not None:
                w = dense_rows(w, candidates, len(points))
            if int(torch.count_nonzero(w)) * 16 <= w.numel():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                    return w.to_sparse_csr() @ points
            return w @ points
    if candidates is not None:  # scattered straight into the dtype the product takes
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else w.dtype
        w = dense_rows(w.to(dtype), candidates, len(points))
    return (w @ points).float()


def _weighted_point_sums(values: torch.Tensor, candidates: torch.Tensor,
                         points: torch.Tensor) -> torch.Tensor:
    """sum_j values[i, j] C[candidates[i, j]] over the nonzero values alone: on CPU at the
    paper's 512 candidates of 32,000 (3,840 atoms of d 768, about 300 nonzeros per row) 0.18 s
    against 0.40 s for the same product through a CSR matrix (0.26 s with the zeros kept)."""
    keep = values != 0
    counts = keep.sum(1)
    return F.embedding_bag(candidates[keep], points, counts.cumsum(0) - counts, mode="sum",
                           per_sample_weights=values[keep])


def dense_rows(values: torch.Tensor, candidates: torch.Tensor, n_points: int) -> torch.Tensor:
    """The rows x n' matrix holding `values` at the `candidates` columns of each row, 0 elsewhere
    (W on its candidates; top-k codes from their lists)."""
    return values.new_zeros(len(values), n_points).scatter_(1, candidates, values)


def _sparse_pays(candidates: torch.Tensor, points: torch.Tensor) -> bool:
    """On CPU, sparse products on s candidates of n' beat dense ones (BLAS) only when s is a
    small part of n': at s = n' / 4 they were 1.3x slower, at the paper's 512 of 32,000 2-6x
    faster (W C 0.13 s instead of 0.3 s, dL/dW 0.1-0.2 s instead of 0.7 s)."""
    return candidates.shape[1] * 8 <= len(points)


def gradient_at_points(grad: torch.Tensor, points: torch.Tensor,
                       candidates: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dW = dL/d(W C) C^T, k x n', or at each row's `candidates` (k x s), float32; on a GPU
    in bf16 on the tensor cores (float32 there is over ten times slower, and Adam divides W's
    gradient by its own scale)."""
    with torch.autocast(grad.device.type, dtype=torch.bfloat16, enabled=grad.is_cuda):
        products = grad @ points.T
    return (products if candidates is None else products.gather(1, candidates)).float()


def products_on_candidates(grad: torch.Tensor, points: torch.Tensor,
                           candidates: torch.Tensor) -> torch.Tensor:
    """(grad C^T)[i, candidates[i]], k x s; on CPU without the dense k x n' product (an SDDMM)
    when that is faster. On a GPU the dense product: on an H200 at the paper's size 0.35 ms
    against cuSPARSE's SDDMM's 0.69 ms."""
    if not (grad.device.type == "cpu" and _sparse_pays(candidates, points)):
        return gradient_at_points(grad, points, candidates)
    k, s = candidates.shape
    rows = torch.arange(0, k * s + 1, s, device=grad.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        mask = torch.sparse_csr_tensor(rows, candidates.reshape(-1), grad.new_zeros(k * s), (k, len(points)))
    return torch.sparse.sampled_addmm(mask, grad, points.T, beta=0.0).values().view(candidates.shape)


def choose_candidates(w: torch.Tensor, grad: torch.Tensor, size: int) -> torch.Tensor:
    """Each row's `size` centroids, sorted: its support in the dense W `w` (all of it; W never
    had more than `size` entries), then those of most negative gradient, which a descent step
    raises first."""
    score = grad.masked_fill(w != 0, float("-inf"))
    return score.topk(size, dim=1, largest=False).indices.sort(dim=1).values


def restrict_to_candidates(values: torch.Tensor, old: torch.Tensor, new: torch.Tensor,
                           fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Rows of values held at the sorted columns `old`, read at the sorted columns `new`; the
    columns `old` lacks get `fill` (a number, or a tensor shaped as `new`)."""
    at = torch.searchsorted(old, new).clamp_(max=old.shape[1] - 1)
    found = old.gather(1, at) == new
    fill = torch.as_tensor(fill, dtype=values.dtype, device=values.device)
    return torch.where(found, values.gather(1, at), fill)


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
                 projection: str = "exact", multiplier: bool = False, project: bool = True,
                 candidates: int = 0):
        super().__init__()
        n_points, d = points.shape
        if n_points < concepts:
            raise UserError(f"an archetypal dictionary of {concepts} concepts needs at least "
                            f"{concepts} centroids, got {n_points}: compute {concepts} or more "
                            "centroids, or ask for fewer concepts")
        self.register_buffer("points", points.float().contiguous())
        size = n_points if candidates == 0 else min(candidates, n_points)
        if size < n_points:  # any s columns that hold i: the first update chooses them anew
            columns = (torch.arange(concepts)[:, None] + torch.arange(size)) % n_points
            self.register_buffer("candidates", columns.sort(dim=1).values)
            start = (self.candidates == torch.arange(concepts)[:, None]).float()
        else:
            self.register_buffer("candidates", None)
            start = torch.eye(concepts, n_points)
        self.W = nn.Parameter(start)  # atom i starts at centroid i
        self.relax = nn.Parameter(torch.zeros(concepts, d))
        self.log_multiplier = nn.Parameter(torch.zeros(()), requires_grad=multiplier)
        self.delta, self.projection, self.project = float(delta), projection, project
        self._fused: torch.Tensor | None = None
        self._hull: torch.Tensor | None = None  # W C in training, a leaf for dL/d(W C)
        self.hull_grad_sum: torch.Tensor | None = None  # dL/d(W C) summed since W's update
        # ... since the candidates' choice: updated in place (a CUDA graph of the step adds to it)
        self.register_buffer("candidate_grad_sum", torch.zeros(concepts, d) if size < n_points else None,
                             persistent=False)
        self.register_load_state_dict_post_hook(lambda module, keys: module._forget_fused())

    def _forget_fused(self) -> None:
        self._fused = self._hull = None

    def hull(self) -> torch.Tensor:
        """W C as a leaf whose .grad is this step's dL/d(W C)."""
        if self._hull is None or self._hull.device != self.W.device:
            with torch.no_grad():
                self._hull = hull_points(self.W, self.points, self.candidates).requires_grad_()
        return self._hull

    def weight(self) -> torch.Tensor:
        """D; in eval mode W C + Lambda is fused once and reused."""
        if self.training:
            return (self.hull() + self.relax) * self.log_multiplier.exp()
        if self._fused is None or self._fused.device != self.W.device:
            with torch.no_grad():
                hull = hull_points(self.W, self.points, self.candidates)
                self._fused = (hull + self.relax) * self.log_multiplier.exp()
        return self._fused

    def dense_W(self) -> torch.Tensor:
        """W as k x n' (rows on candidates scattered into place)."""
        if self.candidates is None:
            return self.W
        return dense_rows(self.W, self.candidates, len(self.points))

    @torch.no_grad()
    def collect_hull_gradient(self) -> None:
        """Add this step's dL/d(W C) to the running sum."""
        if self._hull is None or self._hull.grad is None:
            return
        grad, self._hull.grad = self._hull.grad, None
        if self.candidates is not None:
            self.candidate_grad_sum.add_(grad)
        self.hull_grad_sum = grad if self.hull_grad_sum is None else self.hull_grad_sum.add_(grad)

    @torch.no_grad()
    def hull_gradient_to_W(self, steps: int, refresh: bool = False):
        """W's gradient: the mean over the last `steps` steps of dL/dW = dL/d(W C) C^T, exact
        because W did not change over them. The hull is rebuilt from W after its update.

        With candidates and `refresh`, they are chosen anew and W moves onto them; returns the
        old candidates then, for the optimiser's state to follow, else None."""
        grad, self.hull_grad_sum = self.hull_grad_sum, None
        self._hull = None
        if grad is None:
            self.W.grad = None
            return None
        grad = grad.div_(steps)
        if self.candidates is None:
            self.W.grad = gradient_at_points(grad, self.points)
            return None
        old = None
        if refresh:  # in place, as the running sum: a CUDA graph of the step reads them
            old, pull = self.candidates.clone(), gradient_at_points(self.candidate_grad_sum, self.points)
            self.candidate_grad_sum.zero_()
            new = choose_candidates(self.dense_W(), pull, old.shape[1])
            self.W.copy_(restrict_to_candidates(self.W, old, new))
            self.candidates.copy_(new)
        self.W.grad = products_on_candidates(grad, self.points, self.candidates)
        return old

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
