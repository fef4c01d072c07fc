"""Fit stage: projections, archetypal constraints, every SAE variant, resume, export, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.optimize import linprog

from archsae.cache import TokenStore
from archsae.evaluate.run import evaluate_fit
from archsae.fit import load
from archsae.fit.checkpoint import fit_settings
from archsae.fit.dictionaries import (ArchetypalDictionary, hull_points, products_on_candidates,
                                     restrict_to_candidates)
from archsae.fit.encoders import Codes, TopK
from archsae.fit.projections import (_threshold_of_sorted, clip_row_norms, project_rows_to_simplex_,
                                    refine_threshold, relu_renormalise_rows)
from archsae.fit import SAESettings, sae_settings
from archsae.fit import step as step_module
from archsae.fit.sparse_codes import decode_top_k, topk_of_linear
from archsae.fit.step import TrainingStep, lr_factor
from archsae.fit import FitSettings, fit
from archsae.fit.train import Trainer
from conftest import cli, cli_process, output, torchrun


@pytest.fixture
def store(fit_store):
    return fit_store


def small(sae, **kw):
    return sae_settings(sae, 64, concepts=32, top_k=4, centroids="k64-seed0-all-heldout0.1s0", **kw)


FAST = dict(epochs=2, batch_size=128, lr=2e-3, log_every=1, checkpoint_every=1000)


def projected(w, **kw):
    return project_rows_to_simplex_(w.clone(), **kw)


def test_exact_simplex_projection_golden_cases():
    w = torch.tensor([[2.0, 0.0, 0.0], [0.6, 0.6, 0.0], [1.0, 0.5, -1.0], [0.2, 0.3, 0.5]])
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.75, 0.25, 0.0], [0.2, 0.3, 0.5]])
    torch.testing.assert_close(projected(w), expected)


def test_exact_simplex_projection_is_the_nearest_point():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 7, generator=g, dtype=torch.float64) * 2
    p = projected(w)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(projected(p), p)  # idempotent
    others = torch.distributions.Dirichlet(torch.ones(7, dtype=torch.float64)).sample((50, 200))
    assert ((w[:, None] - others).norm(dim=-1) >= (w - p).norm(dim=-1)[:, None] - 1e-12).all()


def test_candidate_shortcut_equals_the_full_sort():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 1000, generator=g, dtype=torch.float64) * 0.01
    w[:20, :3] += 1.0  # sparse rows: support inside the candidates
    full = projected(w, candidates=10**6)
    fast = projected(w, candidates=16)  # the dense rows take the fallback
    torch.testing.assert_close(fast, full)
    assert (fast[:20] > 0).sum(-1).max() <= 3 and (fast[20:] > 0).sum(-1).min() > 16


def test_threshold_from_the_entries_above_a_bound_equals_the_full_sort():
    """Rows of the width real fits reach (hundreds of 5,000 in the support), exact ties at the
    threshold, spikes and all-equal rows: sorting only the entries above the candidates' bound
    gives the full sort's projection, in float32 as trained."""
    g = torch.Generator().manual_seed(3)
    w = torch.rand(64, 5000, generator=g) * 1e-5
    w[:16, :3] += 1.0  # narrow: support inside the candidates
    w[16:40, :300] += 2e-3 + torch.rand(24, 300, generator=g) * 4e-3  # wide: a few hundred
    w[40:56, :400] = 3e-3  # ties: 400 equal entries in the support, tau = 5e-4
    w[40:56, 400:800] = 5e-4  # and 400 equal ones at the threshold itself
    w[56:] = 0.25  # all equal: every entry in the support (the whole-row sort)
    full = projected(w, candidates=10**6)
    fast = projected(w, candidates=16)
    torch.testing.assert_close(fast, full, atol=1e-7, rtol=0)
    sizes = (fast > 0).sum(-1)
    assert sizes[:16].max() <= 3 and 16 < sizes[16:40].min() and sizes[16:40].max() <= 300
    assert (sizes[40:56] == 400).all() and (sizes[56:] == 5000).all()
    torch.testing.assert_close(fast.sum(-1), torch.ones(64), atol=1e-4, rtol=0)  # float32 sums
    wide_only = projected(w[16:56], candidates=16)  # no whole-row sort needed
    torch.testing.assert_close(wide_only, full[16:56], atol=1e-7, rtol=0)


def test_threshold_refined_without_host_round_trips_is_exact():
    """The CUDA path: Michelot's passes from the top candidates' lower bound reach the exact
    threshold, also for rows whose support is far wider than the candidates."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 4000, generator=g, dtype=torch.float64) * 0.01
    w[:16, :5] += 1.0
    tau, _ = _threshold_of_sorted(w.topk(16, dim=-1).values)
    refined = (w - refine_threshold(w, tau)).clamp(min=0)
    torch.testing.assert_close(refined, projected(w))
    assert (refined[16:] > 0).sum(-1).min() > 100


def test_hull_from_sparse_rows_equals_the_dense_product():
    g = torch.Generator().manual_seed(4)
    points = torch.randn(2048, 32, generator=g)
    w = projected(torch.randn(64, 2048, generator=g) * 0.05)  # a few per row
    assert torch.count_nonzero(w) * 16 <= w.numel()  # the sparse path
    torch.testing.assert_close(hull_points(w, points), w @ points)
    dense = torch.full((64, 2048), 1 / 2048)  # the dense path
    torch.testing.assert_close(hull_points(dense, points), dense @ points)


def test_l0_and_fired_codes_from_the_top_k_lists_equal_the_dense_counts():
    g = torch.Generator().manual_seed(5)
    pre = torch.randn(64, 200, generator=g) - 1.5  # some of the top-k are <= 0: not active
    pre[:, 150:] = -9.0  # codes that never fire
    sparse = TopK(200, 40)(pre)
    dense = Codes(sparse.dense)
    assert 0 < sparse.l0() < 40 and sparse.l0() == dense.l0()
    assert torch.equal(sparse.fired(200), dense.fired(200)) and not sparse.fired(200)[150:].any()


def test_top_k_products_and_their_gradients_equal_the_dense_ones():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(96, 24, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 24, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, generator=g, dtype=torch.float64, requires_grad=True)
    atoms = torch.randn(40, 24, generator=g, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        bias[30:] -= 100.0  # the last concepts are never chosen: empty groups at the end
        bias[:3] += 100.0  # the first ones always: groups of every token
    target = torch.randn(96, 24, generator=g, dtype=torch.float64)
    out = []
    for sparse in (True, False):
        if sparse:
            values, indices = topk_of_linear(x, weight, bias, 6)
            x_hat = decode_top_k(indices, torch.relu(values - 1.0), atoms)  # some values are 0
        else:
            pre = torch.nn.functional.linear(x, weight, bias)
            values, indices = pre.topk(6, dim=-1)
            codes = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values - 1.0))
            x_hat = codes @ atoms
        (x_hat - target).square().sum().backward()
        out.append([x_hat.detach()] + [t.grad.clone() for t in (x, weight, bias, atoms)])
        for t in (x, weight, bias, atoms):
            t.grad = None
    assert out[0][3][30:].abs().max() == 0 and out[0][3][:3].abs().min() > 0
    for a, b in zip(*out):
        torch.testing.assert_close(a, b)


def test_a_topk_step_on_the_top_k_lists_equals_the_dense_step(store, monkeypatch):
    """Training on CPU takes the top-k products; the dense ones (a GPU's) train the same model."""
    x = torch.from_numpy(TokenStore(store).sample(128, seed=1)).float()
    models = []
    for sparse in (True, False):
        monkeypatch.setattr("archsae.fit.sae.top_k_products_pay", lambda device: sparse)
        learner = TrainingStep(sae_settings("topk", 64, concepts=32, top_k=4), FitSettings(dead_tokens=256),
                               None, 100, torch.device("cpu"))
        assert (learner.model.encode(x).dense is None) == sparse
        for _ in range(6):  # AuxK from the third step
            learner(x)
        models.append(learner.model.state_dict())
    for k in models[0]:
        torch.testing.assert_close(models[0][k], models[1][k], atol=1e-5, rtol=1e-4)


def test_paper_projection_and_norm_clip():
    w = torch.tensor([[1.0, 3.0, -2.0], [0.0, 0.0, 4.0]])
    torch.testing.assert_close(relu_renormalise_rows(w, eps=0), torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]]))
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    torch.testing.assert_close(clip_row_norms(x, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))
    assert torch.equal(clip_row_norms(x, 0.0), torch.zeros_like(x))


@pytest.mark.parametrize("candidates", [0, 8])  # all 64 centroids, or 8 per atom (sparse products)
def test_a_sae_atoms_lie_in_the_convex_hull_of_the_centroids(store, tmp_path, candidates):
    fit(store, tmp_path / "a", small("a", w_candidates=candidates), FitSettings(**FAST, w_refresh=3),
        progress=False)
    model = load(tmp_path / "a")
    W, C = model.dictionary.dense_W().detach().double(), model.dictionary.points.double()
    assert ((W != 0).sum(-1) <= (candidates or len(C))).all()
    assert (W >= 0).all() and torch.allclose(W.sum(-1), torch.ones(len(W), dtype=torch.float64))
    assert model.dictionary.relax.abs().max() == 0
    D = model.dictionary.weight().double()  # the fused eval dictionary
    torch.testing.assert_close(D, W @ C, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(W, torch.eye(*W.shape, dtype=torch.float64)), "W should have moved"
    Ct = C.T.numpy()
    for i in range(3):  # independent check: |lambda C - D_i| <= 1e-4 with lambda on the simplex
        d = D[i].numpy()
        res = linprog(np.zeros(len(C)), A_ub=np.vstack([Ct, -Ct]), b_ub=np.concatenate([d + 1e-4, 1e-4 - d]),
                      A_eq=np.ones((1, len(C))), b_eq=[1.0], bounds=(0, None), method="highs")
        assert res.status == 0
    far = (D[0] + 100 * D.std()).numpy()  # and a point far outside is not in the hull
    res = linprog(np.zeros(len(C)), A_ub=np.vstack([Ct, -Ct]), b_ub=np.concatenate([far + 1e-4, 1e-4 - far]),
                  A_eq=np.ones((1, len(C))), b_eq=[1.0], bounds=(0, None), method="highs")
    assert res.status == 2


def test_ra_sae_relaxation_stays_within_delta(store, tmp_path):
    fit(store, tmp_path / "ra", small("ra", delta=0.5, projection="paper"), FitSettings(**FAST),
        progress=False)
    model = load(tmp_path / "ra")
    assert model.dictionary.relax.norm(dim=-1).max() <= 0.5 + 1e-5
    # Lambda is used, not frozen near 0 by W's large Adam eps: most rows reach the bound
    assert model.dictionary.relax.norm(dim=-1).median() > 0.9 * 0.5, "Lambda should be used"


@pytest.mark.parametrize("sae", ["ra", "a", "topk", "batchtopk", "jumprelu", "relu"])
def test_every_sae_trains_and_lowers_its_loss(store, tmp_path, sae):
    fit(store, tmp_path / sae, small(sae), FitSettings(**{**FAST, "epochs": 6}), progress=False)
    summary = evaluate_fit(tmp_path / sae, progress=False)["metrics"]["all"]
    rows = [json.loads(l) for l in (tmp_path / sae / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["mse"] for r in rows[:3]]), np.mean([r["mse"] for r in rows[-3:]])
    assert last < 0.85 * first, (sae, first, last)
    assert 0 < summary["r2"] < 1
    if sae in ("ra", "a", "topk"):
        assert summary["l0"] == 4
    elif sae in ("batchtopk", "jumprelu"):  # the batch rule / the adaptive L0 penalty
        assert 1 < rows[-1]["l0"] < 3 * 4, rows[-1]["l0"]
    else:  # L1 steers L0 only slowly: here the penalty must at least be rising towards it
        assert rows[-1]["penalty_coef"] > rows[0]["penalty_coef"]
    config = json.loads((tmp_path / sae / "config.json").read_text())
    assert config["finished"] and SAESettings.from_dict(config["sae"]).name == sae
    assert config["store"]["d"] == 64
    assert (config["centroids"] is not None) == (sae in ("ra", "a"))


def test_w_gradient_summed_over_steps_is_exact():
    """W updated every m steps gets the mean of the m gradients it would have had (W fixed)."""
    g = torch.Generator().manual_seed(0)
    points, targets = torch.randn(12, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    dictionary = ArchetypalDictionary(4, points, delta=0.5)
    dictionary.relax.data.normal_(generator=g)
    for t in targets:
        (dictionary.weight() - t).pow(2).sum().backward()
        dictionary.collect_hull_gradient()
    dictionary.hull_gradient_to_W(len(targets))
    W = dictionary.W.detach().clone().requires_grad_()
    sum((W @ points + dictionary.relax.detach() - t).pow(2).sum() for t in targets).backward()
    torch.testing.assert_close(dictionary.W.grad, W.grad / len(targets))


@pytest.mark.parametrize("n_points", [40, 80])  # 8 of 40: dense kernels; 8 of 80: sparse ones
def test_w_on_candidates_gives_the_dense_products(n_points):
    """W held on s candidate centroids per row: W C and dL/dW equal the dense ones there."""
    g = torch.Generator().manual_seed(0)
    points, grad = torch.randn(n_points, 6, generator=g), torch.randn(5, 6, generator=g)
    dictionary = ArchetypalDictionary(5, points, candidates=8)
    assert dictionary.W.shape == (5, 8) and torch.equal(dictionary.dense_W(), torch.eye(5, n_points))
    dictionary.W.data.uniform_(generator=g)
    dictionary.W.data[dictionary.W.data < 0.3] = 0  # zeros, as the projection leaves them
    dictionary.W.data[0] = 0  # and a row of them
    dense = dictionary.dense_W()
    torch.testing.assert_close(hull_points(dictionary.W, points, dictionary.candidates), dense @ points)
    torch.testing.assert_close(products_on_candidates(grad, points, dictionary.candidates),
                               (grad @ points.T).gather(1, dictionary.candidates))
    old, new = torch.tensor([[0, 2, 4, 6]]), torch.tensor([[1, 2, 6, 9]])
    assert restrict_to_candidates(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), old, new, 7.0).tolist() == \
        [[7.0, 2.0, 4.0, 7.0]]


def test_candidates_keep_the_support_and_add_the_steepest_centroids():
    """A refresh keeps every centroid W uses and fills up with those of most negative gradient
    since the last choice; W itself does not change, and its gradient is the dense one on the
    new candidates."""
    g = torch.Generator().manual_seed(1)
    points = torch.randn(50, 6, generator=g)
    dictionary = ArchetypalDictionary(4, points, candidates=10)
    dictionary.W.data.uniform_(generator=g)
    dictionary.W.data[:, ::2] = 0  # 5 of the 10 in use
    project_rows_to_simplex_(dictionary.W.data)
    before, used = dictionary.dense_W().clone(), dictionary.dense_W() != 0
    dictionary.candidate_grad_sum = torch.randn(4, 6, generator=g)  # chooses
    dictionary.hull_grad_sum = 2 * dictionary.candidate_grad_sum  # this update's, of 2 steps
    dense = dictionary.candidate_grad_sum @ points.T
    old = dictionary.hull_gradient_to_W(2, refresh=True)
    new = dictionary.candidates
    assert not torch.equal(old, new) and torch.equal(new, new.sort(dim=1).values)
    assert torch.equal(dictionary.dense_W(), before)
    torch.testing.assert_close(dictionary.W.grad, dense.gather(1, new))
    for i in range(4):
        chosen = set(new[i].tolist())
        support = set(used[i].nonzero().flatten().tolist())
        rest = [c for c in dense[i].argsort().tolist() if c not in support]
        assert support <= chosen and chosen - support == set(rest[:10 - len(support)])


def test_w_every_updates_w_only_at_the_end_of_each_window(store):
    points = torch.from_numpy(TokenStore(store).sample(64)).float()
    learner = TrainingStep(sae_settings("ra", 64, concepts=32, top_k=4), FitSettings(w_every=3), points,
                           100, torch.device("cpu"))
    x = torch.from_numpy(TokenStore(store).sample(128, seed=1)).float()
    changed = []
    for _ in range(6):
        before = learner.model.dictionary.W.detach().clone()
        learner(x)
        changed.append(not torch.equal(before, learner.model.dictionary.W))
    assert changed == [False, False, True, False, False, True]


def test_auxk_runs_on_the_codes_dead_at_the_last_read(store, monkeypatch):
    """Which codes are dead is read every DEAD_CHECK_EVERY steps (a wait for the device); AuxK
    runs on those until the next read, and not at all when none was."""
    monkeypatch.setattr(step_module, "DEAD_CHECK_EVERY", 4)
    cfg = FitSettings(batch_size=128, dead_tokens=10**6)
    learner = TrainingStep(sae_settings("topk", 64, concepts=32, top_k=4), cfg, None, 10**5, torch.device("cpu"))
    x = torch.from_numpy(TokenStore(store).sample(128, seed=1)).float()
    assert len(learner.dead_codes) == 32  # before the first read: all candidates
    learner.step = 8000  # 8,000 x 128 tokens: codes may be dead by now; a read
    learner.silent_tokens.zero_()
    assert float(learner(x)["aux"]) == 0 and len(learner.dead_codes) == 0
    for _ in range(3):  # code 5 dies between reads: not seen until the next one
        learner.silent_tokens[5] = 10**7
        assert float(learner(x)["aux"]) == 0 and len(learner.dead_codes) == 0
    learner.silent_tokens[5] = 10**7
    assert float(learner(x)["aux"]) > 0 and learner.dead_codes.tolist() == [5] and learner.step == 8005


@pytest.mark.parametrize("n_dead", [1, 5, 20])  # fewer and more than k_aux = 8
def test_auxk_on_the_dead_columns_equals_auxk_on_all_of_them(store, n_dead):
    learner = TrainingStep(sae_settings("topk", 64, concepts=32, top_k=4), FitSettings(), None, 10, torch.device("cpu"))
    x = torch.from_numpy(TokenStore(store).sample(128, seed=1)).float()
    dead = torch.zeros(32, dtype=torch.bool)
    dead[torch.randperm(32, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
    residual = torch.randn(128, 64, generator=torch.Generator().manual_seed(1))
    out = []
    for columns in (torch.arange(32), torch.nonzero(dead).flatten()):
        learner.dead_codes = columns
        atoms = learner.model.dictionary.weight().detach().requires_grad_()
        learner.model.zero_grad()
        loss = learner._aux_loss(x, atoms, residual, dead)
        loss.backward()
        out.append((loss.detach(), learner.model.enc.weight.grad, atoms.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b)


def test_no_step_replaces_a_tensor_that_a_cuda_graph_of_the_step_reads(store, monkeypatch):
    """A CUDA graph replays a step's kernels on the tensors it captured (fit/graphs.py): every
    step, replayed or not, must update the model, Adam's state and the running state in place;
    only the steps that run as Python may replace the dead codes (the graphs then are dropped),
    and a replayed step leaves nothing behind for Python (the hull, its running sum). Checked
    step by step on CPU, through refreshes of W's candidates, dead-code reads and AuxK."""
    monkeypatch.setattr(step_module, "DEAD_CHECK_EVERY", 4)
    points = torch.from_numpy(TokenStore(store).sample(64)).float()
    x = torch.from_numpy(TokenStore(store).sample(128, seed=1)).float()
    cfg = FitSettings(batch_size=128, dead_tokens=3 * 128, w_refresh=5)
    learner = TrainingStep(sae_settings("ra", 64, concepts=32, top_k=4, w_candidates=8), cfg, points, 40,
                           torch.device("cpu"))
    dictionary = learner.model.dictionary

    def tensors():
        held = dict(learner.model.state_dict(keep_vars=True))
        held |= {f"adam {i} {k}": v for i, state in enumerate(learner.optimizer.state.values())
                 for k, v in state.items()}
        return held | {"silent": learner.silent_tokens, "penalty": learner.penalty_coef,
                       "candidate sums": dictionary.candidate_grad_sum}

    learner(x)  # Adam's state is made by the first step
    replayed = 0
    for step in range(1, 40):
        learner.graphs = "stand-in"  # `_graph_key` asks only whether there are graphs
        key = learner._graph_key(x, metrics=step % 3 == 0)
        learner.graphs = None
        before, dead = tensors(), learner.dead_codes
        learner(x, metrics=step % 3 == 0)
        after = tensors()
        assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
        if key is not None:
            replayed += 1
            assert learner.dead_codes is dead
            assert dictionary._hull is None and dictionary.hull_grad_sum is None and learner.hull_steps == 0
    assert 20 < replayed < 39 and float(dictionary.candidate_grad_sum.abs().sum()) > 0


def test_a_step_without_metrics_trains_the_same_model(store):
    points = torch.from_numpy(TokenStore(store).sample(64)).float()
    x = torch.from_numpy(TokenStore(store).sample(128, seed=1)).float()
    models = []
    for metrics in (True, False):
        learner = TrainingStep(sae_settings("ra", 64, concepts=32, top_k=4), FitSettings(dead_tokens=128), points,
                               100, torch.device("cpu"))
        rows = [learner(x, metrics=metrics) for _ in range(5)]
        assert all(r == {} for r in rows) != metrics
        models.append(learner.model.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_w_rate_decays_on_its_own_while_the_others_keep_theirs(store):
    """W: dictionary_lr decayed to dictionary_final_lr x it; encoder and Lambda: final_lr."""
    points = torch.from_numpy(TokenStore(store).sample(64)).float()
    cfg = FitSettings(dictionary_lr=1e-2, dictionary_final_lr=0.25, warmup=0.0)
    learner = TrainingStep(sae_settings("ra", 64, concepts=32, top_k=4), cfg, points, 5, torch.device("cpu"))
    x = torch.from_numpy(TokenStore(store).sample(128, seed=1)).float()
    w_rates = []
    for _ in range(5):
        learner(x)
        lrs = {g["name"]: g["lr"] for g in learner.optimizer.param_groups}
        w_rates.append(lrs["W"])
        assert lrs["relax"] == pytest.approx(1e-2) and lrs["model"] == pytest.approx(cfg.lr)
    assert w_rates == sorted(w_rates, reverse=True) and w_rates[0] > w_rates[-1]
    assert w_rates[-1] == pytest.approx(1e-2 * lr_factor(4, 5, 0.0, 0.25)) and w_rates[-1] < 0.5e-2


@pytest.mark.parametrize("pre_bias", [True, False])
def test_pre_bias_learns_only_when_asked(store, pre_bias):
    x = torch.from_numpy(TokenStore(store).sample(128, seed=1)).float() + 0.5  # off-centre: a bias helps
    learner = TrainingStep(sae_settings("topk", 64, concepts=32, top_k=4, pre_bias=pre_bias), FitSettings(),
                           None, 5, torch.device("cpu"))
    for _ in range(5):
        learner(x, metrics=False)
    assert learner.model.pre_bias.abs().max() > 0 if pre_bias else torch.equal(learner.model.pre_bias, torch.zeros(64))


def test_fits_written_before_the_pre_bias_setting_resume_learning_it():
    config = {"sae": sae_settings("topk", 64, concepts=32, top_k=4).to_dict(), "fit": FitSettings().to_dict()}
    assert fit_settings(config)[0].pre_bias is False
    del config["sae"]["pre_bias"]
    assert fit_settings(config)[0].pre_bias is True


def test_no_projection_control_leaves_the_simplex(store, tmp_path):
    fit(store, tmp_path / "f", small("a", project=False), FitSettings(**FAST), progress=False)
    W = load(tmp_path / "f").dictionary.dense_W().detach()
    assert (W < 0).any() or not torch.allclose(W.sum(-1), torch.ones(len(W)))


# w_every 5: the cut falls inside a window of W's gradient sum; candidates: refreshed on both sides
@pytest.mark.parametrize("w_every, candidates", [(1, 0), (5, 0), (1, 8)])
def test_resume_after_sigterm_equals_an_uninterrupted_fit(store, tmp_path, monkeypatch, w_every, candidates):
    # dead codes read every 5 steps (the cut falls between reads), AuxK on from step 3
    cfg = FitSettings(**{**FAST, "epochs": 3, "checkpoint_every": 7, "w_every": w_every, "w_refresh": 4,
                         "dead_tokens": 3 * FAST["batch_size"]})
    sae = small("ra", w_candidates=candidates)
    monkeypatch.setattr(step_module, "DEAD_CHECK_EVERY", 5)
    fit(store, tmp_path / "ref", sae, cfg, progress=False)
    trainer = Trainer(store, tmp_path / "cut", sae, cfg, progress=False)
    step = TrainingStep.__call__

    def interrupted(self, x, **kwargs):  # a SIGTERM arrives during step 17
        row = step(self, x, **kwargs)
        if self.step == 17:
            signal.raise_signal(signal.SIGTERM)
        return row

    monkeypatch.setattr(TrainingStep, "__call__", interrupted)
    with pytest.raises(SystemExit):
        trainer.run()
    monkeypatch.undo()
    monkeypatch.setattr(step_module, "DEAD_CHECK_EVERY", 5)
    assert json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["step"] == 17
    fit(store, tmp_path / "cut", sae, cfg, resume=True, progress=False)
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows)), "no step is logged twice"


@pytest.mark.slow
def test_resume_after_sigkill_via_cli(store, tmp_path):
    args = ["fit", store, "--sae", "topk", "--out", tmp_path / "f", "--concepts", 32, "--top-k", 4,
            "--epochs", 40, "--batch-size", 128, "--checkpoint-every", 10, "--device", "cpu"]
    ref = cli_process(*[a if a != tmp_path / "f" else tmp_path / "ref" for a in args])
    assert ref.wait(timeout=300) == 0, output(ref)
    proc = cli_process(*args)
    deadline = time.time() + 120
    while not (tmp_path / "f" / "checkpoint.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "f" / "model.safetensors").exists(), "killed before the end"
    resumed = cli_process(*args, "--resume")
    assert resumed.wait(timeout=300) == 0, output(resumed)
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "f" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sae", ["ra", "batchtopk"])
def test_export_round_trip(store, tmp_path, sae):
    fit(store, tmp_path / "f", small(sae), FitSettings(**FAST), progress=False)
    res = cli("export", tmp_path / "f", "--out", tmp_path / "plain.safetensors")
    assert res.exit_code == 0, res.output
    t = load_file(tmp_path / "plain.safetensors")
    model = load(tmp_path / "f")
    x = next(TokenStore(store, part="heldout").batches(64, shuffle=False))
    with torch.no_grad():
        x_hat, codes, _ = model(x)
    pre = (x - t["pre_bias"]) @ t["encoder_weight"].T + t["encoder_bias"]
    if sae == "ra":
        v, i = pre.topk(4, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    else:
        z = torch.relu(pre) * (torch.relu(pre) > t["threshold"])
        assert torch.isfinite(t["threshold"]).all()
    torch.testing.assert_close(z, codes.dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z @ t["decoder"] + t["pre_bias"], x_hat, atol=1e-4, rtol=1e-4)
    assert t["input_mean"].shape == (64,) and (t["input_std"] > 0).all()


def _one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1, res.output
    return lines[0]


def test_too_few_tokens_for_k_says_the_largest_sensible_k(store):
    line = _one_error_line(cli("centroids", store, "--k", 100000))
    n_train = TokenStore(store).n_tokens
    assert f"largest sensible number is {n_train // 4}" in line and str(n_train) in line


def test_centroids_say_where_faiss_ran_and_how_to_move_it_to_a_gpu(store, monkeypatch):
    res = cli("centroids", store, "--k", 64)
    assert res.exit_code == 0 and "on the CPU" in res.output and "GPU support" not in res.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host with faiss-cpu
    res = cli("centroids", store, "--k", 64)
    assert res.exit_code == 0 and "this faiss has no GPU support" in res.output and "faiss-gpu" in res.output


def test_fewer_centroids_than_concepts(store, tmp_path):
    line = _one_error_line(cli("fit", store, "--sae", "ra", "--out", tmp_path / "f", "--concepts", 100,
                               "--centroids", "k64-seed0-all-heldout0.1s0"))
    assert "at least 100 centroids" in line and "64" in line
    assert not (tmp_path / "f" / "model.safetensors").exists()


def test_store_fit_mismatch_and_existing_fit(store, tmp_path):
    import zarr
    fit(store, tmp_path / "f", small("topk"), FitSettings(**FAST), progress=False)
    line = _one_error_line(cli("fit", store, "--sae", "topk", "--out", tmp_path / "f"))
    assert "already holds a finished fit" in line
    assert cli("fit", store, "--sae", "topk", "--out", tmp_path / "f", "--resume").exit_code == 0
    line = _one_error_line(cli("fit", store, "--sae", "topk", "--top-k", 8, "--out", tmp_path / "f"))
    assert "other settings (top_k 4, not 8)" in line  # a rerun never trains something else in place
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(0).normal(size=(400, 32)).astype(np.float32))
    assert cli("import", other, "--out", tmp_path / "s2").exit_code == 0
    line = _one_error_line(cli("fit", tmp_path / "s2", "--sae", "topk", "--out", tmp_path / "f", "--resume"))
    assert "another store" in line and "d=64" in line
    line = _one_error_line(cli("fit", store, "--sae", "nope", "--out", tmp_path / "g"))
    assert "'--sae'" in line and "nope" in line


def test_topk_started_at_centroids_does_not_overshoot_at_init():
    """k atoms aligned with a token would rebuild it k times over: the encoder starts at 1/k."""
    from archsae.fit.sae import SparseAutoencoder

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g) * 3
    x = centres[torch.arange(512) % 4] + 0.3 * torch.randn(512, 32, generator=g)
    x = x - x.mean(0)
    model = SparseAutoencoder(sae_settings("topk", 32, 64, 8, decoder_init="centroids"), x[:64], g)
    with torch.no_grad():
        r2 = 1 - (x - model(x)[0]).pow(2).sum() / x.pow(2).sum()
    assert r2 > 0


@pytest.mark.parametrize("sae", ["ra", "topk"])
def test_encoder_init_is_tied_to_the_atoms_or_drawn_from_the_fit_seed(sae):
    """tied (the default where atoms start at centroids): rows along the atoms, of norm 1 / their
    mean norm (random free atoms: FREE_TIED_SCALE of it), no bias; random (the default of random
    free atoms): nn.Linear's uniform draw, the same for the same seed."""
    from archsae.fit.sae import FREE_TIED_SCALE, SparseAutoencoder

    assert sae_settings(sae, 16).tied_encoder == (sae == "ra")
    assert sae_settings(sae, 16, decoder_init="centroids").tied_encoder if sae == "topk" else True
    points = torch.randn(80, 16, generator=torch.Generator().manual_seed(1))
    tied = SparseAutoencoder(sae_settings(sae, 16, 40, 4, encoder_init="tied"), points,
                             torch.Generator().manual_seed(0))
    atoms = tied.dictionary.weight().detach()
    cosines = torch.nn.functional.cosine_similarity(tied.enc.weight, atoms, dim=-1)
    assert torch.allclose(cosines, torch.ones(40)) and not tied.enc.bias.any()
    norms = tied.enc.weight.norm(dim=-1)
    scale = FREE_TIED_SCALE if sae == "topk" else 1.0
    assert torch.allclose(norms, scale / atoms.norm(dim=-1).mean().expand(40))
    random = [SparseAutoencoder(sae_settings(sae, 16, 40, 4, encoder_init="random"), points,
                                torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    bound = 16 ** -0.5
    for p in (random[0].enc.weight, random[0].enc.bias):
        assert p.abs().max() <= bound and p.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.2)
    assert torch.equal(random[0].enc.weight, random[1].enc.weight)
    assert not torch.equal(random[0].enc.weight, random[2].enc.weight)
    assert torch.nn.functional.cosine_similarity(random[0].enc.weight, atoms, dim=-1).abs().mean() < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("sae", ["ra", "topk"])
def test_torchrun_two_ranks_fit_the_model_of_one_process(store, tmp_path, sae):
    """Data-parallel: --batch-size is the global batch, each of 2 CPU ranks (gloo) takes half of
    it; the model equals one process's with the same global batch (float tolerance: the
    all-reduce sums in another order), and resuming under torchrun works."""
    args = ["fit", str(store), "--sae", sae, "--concepts", "32", "--top-k", "4", "--epochs", "2",
            "--batch-size", "256", "--lr", "2e-3", "--centroids", "k64-seed0-all-heldout0.1s0",
            "--checkpoint-every", "5"]
    if sae == "ra":  # W on 8 of the 64 centroids per atom (sparse products), chosen every 3 updates
        args += ["--w-candidates", "8", "--w-refresh", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "archsae", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    two = torchrun(*args, "--out", tmp_path / "two", tmp=tmp_path, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("held-out R^2") == 1, "rank 0 alone reports"
    assert json.loads((tmp_path / "two" / "config.json").read_text())["processes"] == 2
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    rows = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})
