"""Constraint maps of the archetypal dictionary: pure functions on tensors, row by row, and
`PROJECTIONS`, the table of the maps a dictionary applies to W in place."""

import torch


GPU_SORT_WIDTH = 4096  # torch sorts rows up to this wide in one pass on CUDA (in shared memory)


def _threshold_of_sorted(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau, support mask) from rows sorted in descending order (Held et al.; Duchi et al.)."""
    css = u.cumsum(dim=-1).sub_(1.0)
    ranks = torch.arange(1, u.shape[-1] + 1, device=u.device, dtype=u.dtype)
    support = u * ranks > css  # a prefix of each row: its length is the support's size
    first_out = torch.argmin(support.view(torch.uint8), dim=-1, keepdim=True)  # no int64 copy
    rho = torch.where(support[..., -1:], u.shape[-1], first_out).clamp_min(1)
    return css.gather(-1, rho - 1) / rho.to(u.dtype), support


def project_rows_to_simplex_(w: torch.Tensor, candidates: int = 64) -> torch.Tensor:
    """Exact Euclidean projection of each row onto the probability simplex {x >= 0, sum x = 1},
    in place: subtract the per-row threshold tau (`simplex_threshold`), clip at zero. Unlike
    relu-and-renormalise this is the nearest point, and it yields sparse rows."""
    return w.sub_(simplex_threshold(w, candidates)).clamp_(min=0.0)


def simplex_threshold(w: torch.Tensor, candidates: int = 64) -> torch.Tensor:
    """The per-row threshold tau of the simplex projection, (..., 1).

    Only the entries above tau matter, so it comes from a partial sort: the top `candidates`
    of each row give tau exactly when the support is smaller, and otherwise a lower bound (any
    subset S gives (sum_S w - 1) / |S| <= tau); the entries above that bound settle tau
    (`_threshold_above`). On a GPU, rows up to `GPU_SORT_WIDTH` wide (W on its candidate
    centroids) are sorted whole: one kernel, where a partial sort and a refinement launch dozens
    (the host's launches bound a GPU step); wider rows' tau rises from the bound by
    `refine_threshold`, without asking which rows are wide.
    """
    if w.shape[-1] <= 2 * candidates or (w.is_cuda and w.shape[-1] <= GPU_SORT_WIDTH):
        return _threshold_of_sorted(torch.sort(w, dim=-1, descending=True).values)[0]
    tau, support = _threshold_of_sorted(w.topk(candidates, dim=-1).values)
    if w.is_cuda:  # asking which rows are wide would make the host wait for the device
        return refine_threshold(w, tau)
    wide = support[..., -1]
    if wide.all():
        return _threshold_above(w, tau)
    if wide.any():
        tau[wide] = _threshold_above(w[wide], tau[wide])
    return tau


def _threshold_above(w: torch.Tensor, bound: torch.Tensor, passes: int = 32) -> torch.Tensor:
    """The exact simplex threshold of the rows of a matrix, given a lower bound of it per row.

    While over an eighth of all entries are above the bound, Michelot's passes raise it (each
    about halves what is kept); once it stops moving it is exact. That settles rows as narrow as
    W on its candidate centroids (512) in a few passes: on CPU 3,840 x 512 took 23-51 ms, where
    the sort below took 60-110 ms. Entries at or below the bound cannot be in the support, so
    otherwise only the others are sorted, gathered into a block as wide as the row that keeps
    the most: 3,840 x 32,000 at the few hundred entries per row a fit settles to takes 0.5-1 s,
    where sorting whole rows took 5-6 s (and so do rows that keep over a quarter after all the
    passes).
    """
    for _ in range(passes):
        above = w > bound
        kept = int(torch.count_nonzero(above))
        if kept <= above.numel() // 8:
            break
        raised = refine_threshold(w, bound, passes=1)
        if torch.equal(raised, bound):
            return bound
        bound = raised
    if kept > above.numel() // 4:
        return _threshold_of_sorted(torch.sort(w, dim=-1, descending=True).values)[0]
    rows, cols = above.nonzero(as_tuple=True)  # row-major: each row's entries are contiguous
    counts = torch.bincount(rows, minlength=w.shape[0])  # faster than counting along rows
    slot = torch.arange(rows.numel(), device=w.device) - (counts.cumsum(0) - counts)[rows]
    block = w.new_full((w.shape[0], int(counts.max())), float("-inf"))  # never in a support
    block[rows, slot] = w[rows, cols]
    return _threshold_of_sorted(torch.sort(block, dim=-1, descending=True).values)[0]


def refine_threshold(w: torch.Tensor, tau: torch.Tensor, passes: int = 8) -> torch.Tensor:
    """Michelot's iteration tau <- (sum_{w > tau} w - 1) / |{w > tau}| from a lower bound of the
    simplex threshold: it rises to the exact tau in a few passes (each a sweep over w, no sort,
    no host round trip). Rows whose support the top candidates held are exact from the start;
    the others settle to float precision within 4-8 passes in our tests (tests/test_fit.py)."""
    for _ in range(passes):
        keep = w > tau
        # counted as bytes into int32: summing bools along rows is several times slower on CPU
        count = keep.view(torch.uint8).sum(-1, keepdim=True, dtype=torch.int32).clamp_min(1)
        # max: rises monotonically also under rounding
        tau = torch.maximum(tau, (torch.where(keep, w, 0).sum(-1, keepdim=True) - 1) / count)
    return tau


def relu_renormalise_rows(w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The paper's reference projection: clip negatives, rescale each row to sum 1.

    Not the nearest point on the simplex; a row that is all <= 0 becomes (nearly) zero.
    """
    w = torch.relu(w)
    return w / (w.sum(dim=-1, keepdim=True) + eps)


def clip_row_norms(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Rescale the rows whose L2 norm exceeds `max_norm` onto that sphere; others unchanged."""
    if max_norm <= 0:
        return torch.zeros_like(x)
    norms = x.norm(dim=-1, keepdim=True)
    return x * torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0)


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


PROJECTIONS = {  # in place: W is large (3,840 x 32,000 at the paper's size)
    "paper": lambda w: w.copy_(relu_renormalise_rows(w)),
    "exact": project_rows_to_simplex_,
}
