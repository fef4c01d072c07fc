"""Where each concept fires most: one streaming pass over a store, never an images x concepts
matrix in memory.

Images are encoded a few at a time; an image's activation of a concept is the maximum over its
tokens. A running top-N per concept (N x k values and image indices) and each image's strongest
concepts (M per image) are all that is kept, with per-concept firing counts and sums. The
heatmaps are then computed for the few images that made it into some top list only.
"""

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from archsae.cache import TokenStore
from archsae.evaluate.run import fit_store
from archsae.fit import load


@dataclass
class TopActivations:
    values: np.ndarray  # (k, N) a concept's N largest image activations, descending (0: none)
    images: np.ndarray  # (k, N) their image indices in the store (-1: none)
    frequency: np.ndarray  # (k,) fraction of tokens on which the concept fires
    mean_activation: np.ndarray  # (k,) mean activation where it fires
    image_concepts: dict[int, list[tuple[int, float]]]  # image -> its strongest (concept, value)
    heatmaps: dict[tuple[int, int], np.ndarray]  # (image, concept) -> activation per token
    tokens_seen: int

    def site_images(self) -> list[int]:
        return sorted(set(self.images[self.images >= 0].tolist()))


def _image_batches(loader: TokenStore, max_tokens: int):
    """(store image indices, their tokens (n, T, d)) in store order, a few images at a time."""
    t = len(loader.positions)
    per_batch = max(1, max_tokens // t)
    for unit, images in enumerate(loader.unit_images):
        if len(images) == 0:
            continue
        start, _ = loader.store.unit_bounds(unit)
        rows = loader.read_unit(unit).reshape(len(images), t, loader.d)
        for b in range(0, len(images), per_batch):
            yield start + images[b:b + per_batch], rows[b:b + per_batch]


@torch.no_grad()
def top_activations(fitdir, top: int = 16, per_image: int = 8, split: str = "all",
                    max_tokens: int = 8192, progress: bool = True) -> TopActivations:
    opened, config = fit_store(fitdir)
    model = load(fitdir)
    k = config["sae"]["concepts"]
    loader = TokenStore(opened, tokens="all", split=split, standardize=False,
                        heldout_fraction=config["fit"]["heldout"])

    def codes_of(rows: np.ndarray) -> torch.Tensor:
        x = (torch.from_numpy(rows).float() - model.input_mean) / model.input_std
        return model.encode(x.reshape(-1, loader.d)).dense.reshape(*rows.shape[:2], k)

    values = torch.zeros(top, k)
    images = torch.full((top, k), -1, dtype=torch.int64)
    fired = torch.zeros(k, dtype=torch.float64)
    total = torch.zeros(k, dtype=torch.float64)
    image_concepts: dict[int, list[tuple[int, float]]] = {}
    n_images = int(loader.image_mask.sum())
    with tqdm(total=n_images, unit="img", desc="top activations", disable=not progress) as bar:
        for index, rows in _image_batches(loader, max_tokens):
            z = codes_of(rows)  # (n, T, k)
            fired += (z > 0).sum((0, 1)).double()
            total += z.sum((0, 1)).double()
            best = z.amax(1)  # (n, k)
            merged_v = torch.cat([values, best])
            merged_i = torch.cat([images, torch.from_numpy(index).long()[:, None].expand(-1, k)])
            values, order = merged_v.topk(top, dim=0)
            images = merged_i.gather(0, order)
            strongest_v, strongest_c = best.topk(min(per_image, k), dim=1)
            for i, vs, cs in zip(index.tolist(), strongest_v.tolist(), strongest_c.tolist()):
                image_concepts[i] = [(c, v) for c, v in zip(cs, vs) if v > 0]
            bar.update(len(index))
    images[values <= 0] = -1
    values = values.T.numpy()
    images = images.T.numpy()
    result = TopActivations(values, images, (fired / max(loader.n_tokens, 1)).numpy(),
                            (total / fired.clamp_min(1)).numpy(), {}, {}, loader.n_tokens)
    # second pass, over the images shown only: per-token activations for their heatmaps
    wanted: dict[int, set[int]] = {}
    for c, row in enumerate(images):
        for i in row[row >= 0]:
            wanted.setdefault(int(i), set()).add(c)
    for i in wanted:
        wanted[i].update(c for c, _ in image_concepts.get(i, []))
        result.image_concepts[i] = image_concepts.get(i, [])
    for index, rows in _select(loader, sorted(wanted), max_tokens):
        z = codes_of(rows)
        for i, per_token in zip(index.tolist(), z):
            for c in wanted[i]:
                result.heatmaps[(i, c)] = per_token[:, c].numpy().copy()
    return result


def _select(loader: TokenStore, wanted: list[int], max_tokens: int):
    """Like _image_batches, for the given store image indices only (read unit by unit)."""
    wanted_set = set(wanted)
    t = len(loader.positions)
    per_batch = max(1, max_tokens // t)
    tokens = loader.store.tokens
    units = sorted({i // loader.store.chunk_images for i in wanted})
    for unit in units:
        start, stop = loader.store.unit_bounds(unit)
        idx = np.array([i for i in range(start, stop) if i in wanted_set])
        chunk = tokens[start:stop]
        for b in range(0, len(idx), per_batch):
            part = idx[b:b + per_batch]
            yield part, np.ascontiguousarray(chunk[part - start][:, loader.positions])
