"""RA-SAE training-step cost, ours against the paper's reference library, side by side.

At d=768, 3,840 concepts, 32,000 centroids (top-k = concepts / 10 for both), batch 4,096 and
1,024:
  ours:      TopK x archetypal (delta 1; our default exact simplex projection, and the paper's
             relu + renormalise, the reference's algorithm) vs TopK x free dictionary, one
             `TrainingStep` each (forward, loss, backward, clip, Adam, projection), at the
             default candidate centroids per atom and at others (`w_candidates`, 0: all, a dense
             W), timed over whole periods of the step's work (`w_refresh` updates of W, one of
             which chooses the candidates anew from a dense gradient), at the working learning
             rate (no warm-up of it) after `WARM_STEPS` steps: from its identity start a dense
             W's rows first spread over about a thousand centroids, then settle to the few
             hundred a fit keeps (the exact projection's cost follows them). The default RA-SAE
             and TopK, the headline ratio, are timed in turns, a step of each per round over a
             whole period (TopK's step varied by 20% from one minute to the next here); the other
             variants one after the other;
  reference: overcomplete 0.3.0's RATopKSAE vs TopKSAE, one step of its own `train_sae` loop
             body (zero_grad, forward, criterion(x, x_hat, z_pre, z, model.get_dictionary()),
             backward, clip, Adam) with a plain MSE criterion, as ours has no AuxK term while no
             code is dead.
The reference runs in a subprocess that adds `.bench/reference` (made by `make bench`:
overcomplete with matplotlib<3.9, einops, opencv) to its path, so it never touches our venv.

    python -m benchmarks.ra_step [--steps 3] [--concepts 3840] [--centroids 32000]
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch

from benchmarks.common import count, result, run_reference

BATCHES = (4096, 1024)
CANDIDATES = (256, 512, 1024, 0)  # centroids per atom (0: all): the cost side of docs/fit.md's table
WARM_STEPS = 8  # before timing: allocations, Adam state, W's support past its first spread
MIN_SECONDS = 3.0  # steps of a fraction of a second are timed over more runs than `steps`


def warm(step, x, align: int = 1) -> None:
    """At least `WARM_STEPS` steps, in whole multiples of `align` (W's update interval)."""
    for _ in range(math.ceil(WARM_STEPS / align) * align):
        step(x)


def timed(step, x, steps: int, window: int = 1, align: int = 1) -> float:
    """Seconds per step: the median over at least `steps` runs (and `MIN_SECONDS`) of a whole
    window of `window` steps (a period of the step's work), after `warm`."""
    warm(step, x, align)
    times = []
    start = time.perf_counter()
    while len(times) < steps or time.perf_counter() - start < MIN_SECONDS:
        t = time.perf_counter()
        for _ in range(window):
            step(x)
        times.append((time.perf_counter() - t) / window)
    return statistics.median(times)


def side_by_side(steps: dict, x, rounds: int, align: int = 1) -> dict:
    """Seconds per step of each of `steps`, taken in turns (one step of each per round, over
    `rounds` rounds, in reverse order every other round), so that all see the same state of a
    noisy machine, first and second alike (the second of two reads in a row ran slower here,
    benchmarks/loader.py); after `warm`."""
    for step in steps.values():
        warm(step, x, align)
    seconds = dict.fromkeys(steps, 0.0)
    for r in range(rounds):
        for name, step in (list(steps.items()) if r % 2 == 0 else list(steps.items())[::-1]):
            t = time.perf_counter()
            step(x)
            seconds[name] += time.perf_counter() - t
    return {name: total / rounds for name, total in seconds.items()}


def ours(args) -> dict:
    from archsae.fit import FitSettings, SAESettings, sae_settings
    from archsae.fit.step import TrainingStep

    g = torch.Generator().manual_seed(0)
    points = torch.randn(args.centroids, args.d, generator=g)
    out = {}
    default = SAESettings().w_candidates
    others = [("ra_paper", {"projection": "paper"})]
    others += [(f"ra_s{s}", {"w_candidates": s}) for s in candidate_sizes(default) if s != default]
    for batch in BATCHES:
        x = torch.randn(batch, args.d, generator=g)
        cfg = FitSettings(batch_size=batch, warmup=0.0)

        def learner(sae, **extra):
            return TrainingStep(sae_settings(sae, args.d, args.concepts, **extra), cfg,
                                points if sae == "ra" else None, 10**6, torch.device("cpu"))

        def period(step) -> int:  # W's updates between choices of its candidates, in steps
            on_candidates = getattr(step.model.dictionary, "candidates", None) is not None
            return cfg.w_every * (cfg.w_refresh if on_candidates else 1)

        # the headline: the default RA-SAE and TopK in turns, over whole periods of RA's work
        pair = {"ra": learner("ra"), "topk": learner("topk")}
        rounds = period(pair["ra"]) * math.ceil(args.steps / period(pair["ra"]))
        for name, seconds in side_by_side(pair, x, rounds, cfg.w_every).items():
            out[f"{name}_{batch}"] = seconds
        out[f"ra_s{default}_{batch}"] = out[f"ra_{batch}"]
        del pair
        for name, extra in others:  # beside it, one after the other
            step = learner("ra", **extra)
            out[f"{name}_{batch}"] = timed(step, x, math.ceil(args.steps / period(step)),
                                           period(step), cfg.w_every)
            del step
    out["default"] = default
    return out


def candidate_sizes(default: int) -> list[int]:
    """`CANDIDATES` and the default, ascending, all (0) last."""
    return sorted(set(CANDIDATES) | {default}, key=lambda s: s or math.inf)


def reference(args) -> dict:
    from overcomplete.sae import RATopKSAE, TopKSAE

    g = torch.Generator().manual_seed(0)
    points = torch.randn(args.centroids, args.d, generator=g)
    out = {}
    for batch in BATCHES:
        x = torch.randn(batch, args.d, generator=g)
        for name in ("ra", "topk"):
            model = (RATopKSAE(args.d, args.concepts, points, delta=1.0) if name == "ra"
                     else TopKSAE(args.d, args.concepts))
            optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)

            def step(batch):  # the body of overcomplete.sae.train.train_sae
                optimizer.zero_grad()
                z_pre, z, x_hat = model(batch)
                model.get_dictionary()  # what the loop passes to its criterion (unused by MSE)
                loss = (batch - x_hat).square().mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()

            out[f"{name}_{batch}"] = timed(step, x, args.steps)
            del model, optimizer
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=count(), default=3)
    ap.add_argument("--d", type=count(), default=768)
    ap.add_argument("--concepts", type=count(), default=3840)
    ap.add_argument("--centroids", type=count(), default=32000)
    ap.add_argument("--reference", action="store_true", help="(internal) time the reference only")
    args = ap.parse_args()
    if args.reference:
        print(json.dumps(reference(args)))
        return
    ref = run_reference("benchmarks.ra_step", sys.argv[1:])
    our = ours(args)
    print(f"d={args.d}, {args.concepts} concepts, {args.centroids} centroids, torch threads "
          f"{torch.get_num_threads()}; seconds per step (median of at least {args.steps} runs "
          f"and {MIN_SECONDS:.0f} s):")
    for b in BATCHES:
        print(f"  batch {b:5d}  ours       RA-SAE {our[f'ra_{b}']:.3f} (exact projection), "
              f"{our[f'ra_paper_{b}']:.3f} (paper's projection), {our['default'] or 'all'} candidate "
              f"centroids per atom  TopK {our[f'topk_{b}']:.3f}  "
              f"RA / TopK {our[f'ra_{b}'] / our[f'topk_{b}']:.2f}")
        others = "  ".join(f"{s or 'all (dense W)'}: {our[f'ra_s{s}_{b}'] / our[f'topk_{b}']:.2f}"
                           for s in candidate_sizes(our["default"]))
        print(f"  batch {b:5d}  ours       RA / TopK by candidate centroids per atom: {others}")
        print(f"  batch {b:5d}  reference  RA-SAE {ref[f'ra_{b}']:.3f} (paper's projection)  "
              f"TopK {ref[f'topk_{b}']:.3f}  RA / TopK {ref[f'ra_{b}'] / ref[f'topk_{b}']:.2f}")
    result("ra_over_topk_ours", our["ra_4096"] / our["topk_4096"], "<=", 1.5)
    result("ra_over_topk_ours_batch1024", our["ra_1024"] / our["topk_1024"], "<=", 1.5)
    result("ra_over_topk_ours_paper_projection", our["ra_paper_4096"] / our["topk_4096"], "<=", 1.5)
    result("ra_step_reference_over_ours", ref["ra_4096"] / our["ra_4096"], ">=", 1.0)
    result("topk_step_reference_over_ours", ref["topk_1024"] / our["topk_1024"], ">=", 1.0)


if __name__ == "__main__":
    main()
