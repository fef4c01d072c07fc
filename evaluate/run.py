"""`archsae evaluate`: the paper's metrics for fits (and baselines), on the held-out split of
their store, for all tokens and for each token kind the store has.

Tokens are standardised with the constants the model was trained with (for a fit, its own
`standardise`), so a kind-restricted pass sees exactly what the model was trained on.
"""

from typing import Callable

import torch
from tqdm import tqdm

from archsae.cache import Split, TokenStore
from archsae.evaluate.metrics import CodeTally
from archsae.fit import fit_settings, load, open_fit_store


@torch.no_grad()
def evaluate_model(opened, predict, atoms: torch.Tensor, standardise: Callable, tokens: str = "all",
                   split: Split = Split(), batch_size: int = 4096, progress: bool = True,
                   name: str = "evaluate") -> dict:
    """Metrics of `predict` (standardised x -> (x_hat, codes)) on the held-out part of `split`:
    {"all": {...}, "<kind>": {...}, ...}, every kind standardised by the same `standardise`."""
    kinds = [tokens]
    if tokens == "all" and len(opened.kind_counts()) > 1:
        kinds += list(opened.kind_counts())
    results = {}
    for kind in kinds:
        loader = TokenStore(opened, tokens=kind, part="heldout", split=split, standardize=False)
        tally = CodeTally(atoms)
        bar = tqdm(total=loader.n_tokens, unit="tok", unit_scale=True, disable=not progress,
                   desc=f"{name} {kind}")
        for x in loader.batches(batch_size, shuffle=False, drop_last=False):
            x = standardise(x)
            x_hat, z = predict(x)
            tally.update(x, x_hat, z)
            bar.update(len(x))
        bar.close()
        results[kind] = tally.summary(atoms)
    return results


def evaluate_fit(fitdir, store=None, batch_size: int = 4096, progress: bool = True) -> dict:
    """Metrics of one fit on its held-out split."""
    opened, config = open_fit_store(fitdir, store)
    model = load(fitdir)
    sae, cfg = fit_settings(config)

    def predict(x):
        x_hat, codes, _ = model(x)
        return x_hat, codes.dense

    metrics = evaluate_model(opened, predict, model.dictionary.weight().detach(), model.standardise,
                             cfg.tokens, cfg.split, batch_size, progress)
    return {"fit": str(fitdir), "sae": sae.name, "concepts": sae.concepts, "top_k": sae.top_k,
            "seed": cfg.seed, "metrics": metrics}
