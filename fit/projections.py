"""Constraint maps of the archetypal dictionary: pure functions on tensors, row by row."""

import torch


def _simplex_threshold(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau, support mask) from rows sorted in descending order (Held et al.; Duchi et al.)."""
    css = u.cumsum(dim=-1).sub_(1.0)
    ranks = torch.arange(1, u.shape[-1] + 1, device=u.device, dtype=u.dtype)
    support = u * ranks > css  # a prefix of each row: its length is the support's size
    first_out = torch.argmin(support.view(torch.uint8), dim=-1, keepdim=True)  # no int64 copy
    rho = torch.where(support[..., -1:], u.shape[-1], first_out).clamp_min(1)
    return css.gather(-1, rho - 1) / rho.to(u.dtype), support


def project_rows_to_simplex(w: torch.Tensor, candidates: int = 64) -> torch.Tensor:
    """Exact Euclidean projection of each row onto the probability simplex {x >= 0, sum x = 1}.

    Subtract the per-row threshold tau, clip at zero. Unlike relu-and-renormalise this is the
    nearest point, and it yields sparse rows. Only the entries above tau matter, so tau comes
    from a partial sort: the top `candidates` of each row give tau exactly when the support is
    smaller, and otherwise a lower bound (any subset S gives (sum_S w - 1) / |S| <= tau), which
    says how many entries can be in the support; the top that many settle tau. A full sort is
    the last resort, when that is over a thousand entries (on CPU: 5-6 s for 3,840 rows of
    32,000 once Adam's small eps has made them dense; Michelot's passes were no faster there).
    On a GPU, tau rises from the bound by `refine_threshold`, without asking which rows are wide.
    """
    n = w.shape[-1]
    if n <= 2 * candidates:
        tau, _ = _simplex_threshold(torch.sort(w, dim=-1, descending=True).values)
        return (w - tau).clamp_(min=0.0)
    tau, support = _simplex_threshold(w.topk(candidates, dim=-1).values)
    if w.is_cuda:  # asking which rows are wide would make the host wait for the device
        return (w - refine_threshold(w, tau)).clamp_(min=0.0)
    wide = support[..., -1]
    if wide.any():
        rows = w if wide.all() else w[wide]
        bound = tau if wide.all() else tau[wide]
        reach = int(torch.count_nonzero(rows > bound, dim=-1).max()) + 1
        if reach <= min(1024, n // 4):  # a large top-k is slower than sorting
            exact, _ = _simplex_threshold(rows.topk(reach, dim=-1).values)
        else:
            exact, _ = _simplex_threshold(torch.sort(rows, dim=-1, descending=True).values)
        if wide.all():
            tau = exact
        else:
            tau[wide] = exact
    return (w - tau).clamp_(min=0.0)


def refine_threshold(w: torch.Tensor, tau: torch.Tensor, passes: int = 8) -> torch.Tensor:
    """Michelot's iteration tau <- (sum_{w > tau} w - 1) / |{w > tau}| from a lower bound of the
    simplex threshold: it rises to the exact tau in a few passes (each a sweep over w, no sort,
    no host round trip). Rows whose support the top candidates held are exact from the start;
    the others settle to float precision within 4-8 passes in our tests (tests/test_fit.py)."""
    for _ in range(passes):
        keep = w > tau
        count = keep.sum(-1, keepdim=True).clamp_min(1)
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


PROJECTIONS = {"paper": relu_renormalise_rows, "exact": project_rows_to_simplex}
