"""Constraint maps of the archetypal dictionary: pure functions on tensors, row by row."""

import torch


def _simplex_threshold(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau, support mask) from rows sorted in descending order (Held et al.; Duchi et al.)."""
    css = u.cumsum(dim=-1) - 1.0
    ranks = torch.arange(1, u.shape[-1] + 1, device=u.device, dtype=u.dtype)
    support = (u - css / ranks) > 0
    rho = support.to(u.dtype).cumsum(dim=-1).argmax(dim=-1, keepdim=True)  # last True
    return css.gather(-1, rho) / (rho + 1).to(u.dtype), support


def project_rows_to_simplex(w: torch.Tensor, candidates: int = 64) -> torch.Tensor:
    """Exact Euclidean projection of each row onto the probability simplex {x >= 0, sum x = 1}.

    Subtract the per-row threshold tau, clip at zero. Unlike relu-and-renormalise this is the
    nearest point, and it yields sparse rows. Sparse rows need only their largest entries to
    fix tau, so tau is computed from the top `candidates` of each row (a linear-time top-k,
    not a sort of the whole row); rows whose support reaches past the candidates, for which
    that is not enough, fall back to the full sort. The result is exact either way.
    """
    if w.shape[-1] <= 2 * candidates:
        tau, _ = _simplex_threshold(torch.sort(w, dim=-1, descending=True).values)
        return torch.clamp(w - tau, min=0.0)
    tau, support = _simplex_threshold(w.topk(candidates, dim=-1).values)
    wide = support[..., -1]
    if wide.all():
        tau, _ = _simplex_threshold(torch.sort(w, dim=-1, descending=True).values)
    elif wide.any():
        tau[wide], _ = _simplex_threshold(torch.sort(w[wide], dim=-1, descending=True).values)
    return torch.clamp(w - tau, min=0.0)


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
