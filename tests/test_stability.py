import numpy as np
import pytest
import torch

from archsae.evaluate.stability import match_atoms, stability


@pytest.mark.parametrize("exact_limit", [10_000, 0])  # 0: the scalable (sparse) matching
def test_dictionary_against_a_signed_permutation_of_itself_has_stability_one(exact_limit):
    g = torch.Generator().manual_seed(0)
    d = torch.randn(50, 16, generator=g)
    perm = torch.randperm(50, generator=g)
    signs = torch.where(torch.rand(50, generator=g) < 0.5, -1.0, 1.0)[:, None]
    other = (d * signs * 3.0)[perm]  # scaled too: cosines ignore norms
    assert abs(stability(d, other, exact_limit) - 1.0) < 1e-6
    match, cos, method = match_atoms(d, other, exact_limit)
    assert method.startswith("exact" if exact_limit else "sparse")
    assert (perm[torch.as_tensor(match)] == torch.arange(50)).all()
    assert ((torch.as_tensor(cos) < 0) == (signs[:, 0] < 0)).all()


def test_two_random_dictionaries_are_far_less_stable():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, 64, generator=g), torch.randn(50, 64, generator=g)
    assert stability(a, b) < 0.5


def test_sparse_matching_is_one_to_one_and_close_to_the_exact_optimum():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(300, 32, generator=g)
    b = a[torch.randperm(300, generator=g)] + 0.8 * torch.randn(300, 32, generator=g)
    match, _, _ = match_atoms(a, b, exact_limit=0, candidates=4)
    assert len(np.unique(match)) == 300
    exact, sparse = stability(a, b), stability(a, b, exact_limit=0)
    assert sparse <= exact + 1e-9 and sparse > exact - 0.02
