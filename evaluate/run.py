"""`archsae evaluate`: the paper's metrics for fits (and baselines), on the held-out split of
their store, for all tokens and for each token kind the store has.

Tokens are standardised with the constants the model was trained with (for a fit, input_mean /
input_std in its model.safetensors), so a kind-restricted pass sees exactly what the model was
trained on.
"""

import torch
from tqdm import tqdm

from archsae.errors import UserError
from archsae.cache import TokenStore, open_store
from archsae.evaluate.metrics import CodeTally
from archsae.fit import load
from archsae.fit.checkpoint import read_config
from archsae.fit.train import store_id


def fit_store(fitdir, store=None):
    """The store a fit was trained on (or `store`, checked to be that one)."""
    config = read_config(fitdir)
    path = store or config["store"]["path"]
    opened = open_store(path)
    if store_id(opened) != config["store"]["id"]:
        raise UserError(f"{fitdir} was trained on another store ({config['store']['model']}, "
                        f"d={config['store']['d']}), not {path}: pass the store it was made from")
    return opened, config


@torch.no_grad()
def evaluate_model(opened, predict, atoms: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   tokens: str = "all", heldout: float = 0.1, batch_size: int = 4096,
                   progress: bool = True, name: str = "evaluate") -> dict:
    """Metrics of `predict` (standardised x -> (x_hat, codes)) on the held-out split:
    {"all": {...}, "<kind>": {...}, ...}, every kind standardised with the same mean / std."""
    kinds = [tokens]
    if tokens == "all" and len(opened.kind_counts()) > 1:
        kinds += list(opened.kind_counts())
    results = {}
    for kind in kinds:
        loader = TokenStore(opened, tokens=kind, split="heldout", standardize=False,
                            heldout_fraction=heldout)
        tally = CodeTally(atoms)
        bar = tqdm(total=loader.n_tokens, unit="tok", unit_scale=True, disable=not progress,
                   desc=f"{name} {kind}")
        for x in loader.batches(batch_size, shuffle=False, drop_last=False):
            x = (x - mean) / std
            x_hat, z = predict(x)
            tally.update(x, x_hat, z)
            bar.update(len(x))
        bar.close()
        results[kind] = tally.summary(atoms)
    return results


def evaluate_fit(fitdir, store=None, batch_size: int = 4096, progress: bool = True) -> dict:
    """Metrics of one fit on its held-out split."""
    opened, config = fit_store(fitdir, store)
    model = load(fitdir)
    fit_cfg = config["fit"]

    def predict(x):
        x_hat, codes, _ = model(x)
        return x_hat, codes.dense

    metrics = evaluate_model(opened, predict, model.dictionary.weight().detach(), model.input_mean,
                             model.input_std, fit_cfg["tokens"], fit_cfg["heldout"], batch_size,
                             progress)
    return {"fit": str(fitdir), "sae": config["sae"]["sae"], "concepts": config["sae"]["concepts"],
            "top_k": config["sae"]["top_k"], "seed": fit_cfg["seed"], "metrics": metrics}
