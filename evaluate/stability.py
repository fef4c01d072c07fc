"""Stability: how much two dictionaries agree, after the best one-to-one matching of their atoms.

Cosines are taken between unit-normalised atoms and matched on their absolute value, so an atom
and its negation count as the same concept (signed Hungarian matching). Up to `EXACT_LIMIT`
atoms the matching is scipy's exact assignment on the dense cosine matrix; beyond, the dense
matrix (and the cubic solver) no longer fit, and the matching is the exact minimum-weight
matching restricted to each atom's `candidates` nearest atoms (faiss search, both signs): a
lower bound on the optimum, which `match_atoms` says it is.
"""

import itertools
import statistics

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from archsae.fit import unit_rows

EXACT_LIMIT = 16_384  # scipy: 10,240 atoms in about 15 s and 0.8 GB


def match_atoms(a: torch.Tensor, b: torch.Tensor, exact_limit: int = EXACT_LIMIT,
                candidates: int = 32) -> tuple[np.ndarray, np.ndarray, str]:
    """(index into b for each atom of a, signed cosine of each pair, method) of the best
    matching; a must not have more atoms than b."""
    if len(a) > len(b):
        raise ValueError("match the smaller dictionary against the larger one")
    ua, ub = unit_rows(a.detach().double()), unit_rows(b.detach().double())
    if max(len(a), len(b)) <= exact_limit:
        cos = (ua @ ub.T).cpu().numpy()
        rows, cols = linear_sum_assignment(-np.abs(cos))
        order = np.argsort(rows)
        return cols[order], cos[rows[order], cols[order]], "exact (scipy linear_sum_assignment)"
    return _sparse_matching(ua.float().cpu().numpy(), ub.float().cpu().numpy(), candidates)


def _sparse_matching(ua: np.ndarray, ub: np.ndarray, candidates: int):
    import faiss

    index = faiss.IndexFlatIP(ub.shape[1])
    index.add(np.ascontiguousarray(ub))
    m = candidates
    while True:
        m = min(m, len(ub))
        pos_s, pos_i = index.search(np.ascontiguousarray(ua), m)
        neg_s, neg_i = index.search(np.ascontiguousarray(-ua), m)
        rows = np.repeat(np.arange(len(ua)), 2 * m)
        cols = np.concatenate([pos_i, neg_i], axis=1).reshape(-1)
        score = np.concatenate([pos_s, neg_s], axis=1).reshape(-1)  # |cos| of the pair
        keep = cols >= 0
        # cost 2 - |cos| > 0: zero entries would read as missing edges
        graph = csr_matrix((2.0 - score[keep], (rows[keep], cols[keep])), shape=(len(ua), len(ub)))
        try:
            r, c = min_weight_full_bipartite_matching(graph)
            break
        except ValueError:  # no matching covers every atom with these candidates: widen
            if m == len(ub):
                raise
            m *= 4
    order = np.argsort(r)
    c = c[order]
    cos = np.einsum("ij,ij->i", ua.astype(np.float64), ub[c].astype(np.float64))
    return c, cos, f"sparse (exact matching over each atom's {m} nearest atoms per sign; a lower bound)"


def _matched(a: torch.Tensor, b: torch.Tensor, exact_limit: int = EXACT_LIMIT) -> tuple[float, str]:
    """(mean |cosine| of the matched atoms, the matching used)."""
    if len(a) > len(b):
        a, b = b, a
    _, cos, method = match_atoms(a, b, exact_limit)
    return float(np.abs(cos).mean()), method


def stability(a: torch.Tensor, b: torch.Tensor, exact_limit: int = EXACT_LIMIT) -> float:
    """Mean |cosine| of the matched atoms: 1 for a dictionary and a signed permutation of itself."""
    return _matched(a, b, exact_limit)[0]


def max_cosine(a: torch.Tensor, b: torch.Tensor, block: int = 4096) -> float:
    """max_ij cos(A_i, B_j) between two dictionaries (in blocks of rows)."""
    ua, ub = unit_rows(a.detach().double()), unit_rows(b.detach().double())
    return max(float((ua[s:s + block] @ ub.T).max()) for s in range(0, len(ua), block))


def compare_runs(dictionaries: list[torch.Tensor]) -> dict:
    """Stability of every pair of runs (mean, sd, each pair, which runs, the matching used) and
    their max cosine (each pair, mean)."""
    pair_runs = list(itertools.combinations(range(len(dictionaries)), 2))
    scores, methods, max_cos = [], set(), []
    for i, j in pair_runs:
        score, method = _matched(dictionaries[i], dictionaries[j])
        scores.append(score)
        methods.add(method)
        max_cos.append(max_cosine(dictionaries[i], dictionaries[j]))
    return {"mean": statistics.mean(scores) if scores else None,
            "sd": statistics.stdev(scores) if len(scores) > 1 else None, "pairs": scores,
            "pair_runs": pair_runs, "matching": sorted(methods), "max_cosine_pairs": max_cos,
            "max_cosine": statistics.mean(max_cos) if max_cos else None}
