import torch

from archsae.evaluate.stability import match_atoms, stability


def test_dictionary_against_a_signed_permutation_of_itself_has_stability_one():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(50, 16, generator=g)
    perm = torch.randperm(50, generator=g)
    signs = torch.where(torch.rand(50, generator=g) < 0.5, -1.0, 1.0)[:, None]
    other = (d * signs * 3.0)[perm]  # scaled too: cosines ignore norms
    assert abs(stability(d, other) - 1.0) < 1e-12
    match, cos = match_atoms(d, other)
    assert (perm[torch.as_tensor(match)] == torch.arange(50)).all()
    assert ((torch.as_tensor(cos) < 0) == (signs[:, 0] < 0)).all()


def test_two_random_dictionaries_are_far_less_stable():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, 64, generator=g), torch.randn(50, 64, generator=g)
    assert stability(a, b) < 0.5
