import numpy as np
from hypothesis import given, settings, strategies as st

from archsae.cache.stats import merge_moments, moments, standard_deviation


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(1, 6), st.lists(st.integers(0, 200), max_size=6),
       st.integers(0, 2**31 - 1))
def test_merged_moments_equal_moments_of_everything(n, d, cuts, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=rng.normal(0, 50, d), scale=rng.uniform(0.1, 10, d), size=(n, d))
    bounds = sorted({0, n, *[c % (n + 1) for c in cuts]})
    parts = [moments(x[a:b]) for a, b in zip(bounds, bounds[1:])]
    count, mean, m2 = merge_moments(*zip(*parts))
    assert count == n
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(m2 / n, x.var(0), rtol=1e-7, atol=1e-9)


def test_merge_does_not_depend_on_which_parts_are_empty():
    x = np.arange(12.0).reshape(6, 2)
    a = merge_moments(*zip(moments(x[:3]), moments(x[3:3]), moments(x[3:])))
    b = merge_moments(*zip(moments(x[:3]), moments(x[3:])))
    assert a[0] == b[0] and np.allclose(a[1], b[1]) and np.allclose(a[2], b[2])


def test_standard_deviation_floors_constant_features():
    n, _, m2 = moments(np.ones((5, 3)))
    assert np.all(standard_deviation(n, m2) > 0)
