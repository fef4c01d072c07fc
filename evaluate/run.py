"""`archsae evaluate`: the paper's metrics for fits (and baselines), on the held-out split of
their store, for all tokens and for each token kind the store has.

Tokens are standardised with the constants the model was trained with (for a fit, its own
`standardise`), so a kind-restricted pass sees exactly what the model was trained on.
"""

from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from archsae.cache import TOKEN_KINDS, Split, TokenStore
from archsae.devices import resolve_device
from archsae.evaluate.metrics import CodeTally, summarise
from archsae.fit import fit_settings, load, open_fit_store


@torch.no_grad()
def evaluate_model(opened, predict, atoms: torch.Tensor, standardise: Callable, tokens: str = "all",
                   split: Split = Split(), batch_size: int = 4096, progress: bool = True,
                   name: str = "evaluate") -> dict:
    """Metrics of `predict` (standardised x -> (x_hat, codes)) on the held-out part of `split`:
    {"all": {...}, "<kind>": {...}, ...}, every kind standardised by the same `standardise`.
    One pass over the tokens: each batch's rows go to the tally of their kind, and "all" is the
    sum of those. Tallies live on the atoms' device, where the batches are sent."""
    # windows of a few batches: nothing is shuffled, and a GPU holds up to three beside the tallies
    loader = TokenStore(opened, tokens=tokens, part="heldout", split=split, standardize=False,
                        shuffle_tokens=8 * batch_size)
    kinds = list(opened.kind_counts()) if tokens == "all" and len(opened.kind_counts()) > 1 else []
    # every image gives all its token positions, in order: a row's kind is its position's
    kind_of_row = opened.token_kind[loader.positions]
    codes = {kind: TOKEN_KINDS.index(kind) for kind in kinds}
    tallies = {kind: CodeTally(atoms) for kind in kinds or [tokens]}
    row = 0
    with tqdm(total=loader.n_tokens, unit="tok", unit_scale=True, disable=not progress, desc=name) as bar:
        # on a GPU the stored values travel and are decoded there; on the host they come decoded
        device = atoms.device if atoms.is_cuda else None
        for x in loader.batches(batch_size, shuffle=False, drop_last=False, device=device):
            x = standardise(x if device is None else loader.decode(x))
            x_hat, z = predict(x)
            if kinds:  # row indices from the host's arithmetic: no wait for the device
                kind = kind_of_row[(row + np.arange(len(x))) % len(kind_of_row)]
                for name_, code in codes.items():
                    rows = np.flatnonzero(kind == code)
                    if len(rows):
                        rows = torch.from_numpy(rows).to(x.device, non_blocking=True)
                        tallies[name_].update(x[rows], x_hat[rows], z[rows])
            else:
                tallies[tokens].update(x, x_hat, z)
            row += len(x)
            bar.update(len(x))
    results = summarise(tallies, atoms, union="all" if kinds else None)
    return {key: results[key] for key in (["all"] if kinds else []) + list(tallies)}


def evaluate_fit(fitdir, store=None, batch_size: int = 4096, progress: bool = True,
                 device: str | None = None) -> dict:
    """Metrics of one fit on its held-out split, on `device` [CUDA when present]."""
    opened, config = open_fit_store(fitdir, store)
    model = load(fitdir, resolve_device(device))
    sae, cfg = fit_settings(config)

    def predict(x):
        x_hat, codes, _ = model(x)
        return x_hat, codes.dense

    metrics = evaluate_model(opened, predict, model.dictionary.weight().detach(), model.standardise,
                             cfg.tokens, cfg.split, batch_size, progress)
    return {"fit": str(fitdir), "sae": sae.name, "concepts": sae.concepts, "top_k": sae.top_k,
            "seed": cfg.seed, "metrics": metrics}
