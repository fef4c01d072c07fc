"""Where each concept fires most: one streaming pass over a store, never an images x concepts
matrix in memory.

Images are encoded a few at a time; an image's activation of a concept is the maximum over its
tokens. A running top-N per concept (N x k values and image indices) and per-concept firing
counts and sums are all that is kept, so memory does not grow with the number of images. A
second pass re-encodes only the images that made some top list, for their strongest concepts
and per-token heatmaps.
"""

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from archsae.cache import TokenStore
from archsae.fit import fit_settings, load, open_fit_store


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


def _image_batches(loader: TokenStore, max_tokens: int, only: set[int] | None = None):
    """(store image indices, their tokens (n, T, d)) in store order, a few images at a time;
    `only` restricts them to those store image indices (units without any are not read)."""
    t = len(loader.positions)
    per_batch = max(1, max_tokens // t)
    only = None if only is None else np.fromiter(only, np.int64)
    for unit, images in enumerate(loader.unit_images):
        index = loader.store.unit_bounds(unit)[0] + images
        keep = np.isin(index, only) if only is not None else np.ones(len(index), bool)
        if not keep.any():
            continue
        rows = loader.read_unit(unit).reshape(len(images), t, loader.d)[keep]
        index = index[keep]
        for b in range(0, len(index), per_batch):
            yield index[b:b + per_batch], rows[b:b + per_batch]


@torch.no_grad()
def top_activations(fitdir, top: int = 16, per_image: int = 8, part: str = "all",
                    max_tokens: int = 8192, progress: bool = True) -> TopActivations:
    opened, config = open_fit_store(fitdir)
    model = load(fitdir)
    sae, cfg = fit_settings(config)
    k = sae.concepts
    loader = TokenStore(opened, tokens="all", part=part, split=cfg.split, standardize=False)

    def codes_of(rows: np.ndarray) -> torch.Tensor:
        x = model.standardise(loader.decode(torch.from_numpy(rows)))
        return model.encode(x.reshape(-1, loader.d)).dense.reshape(*rows.shape[:2], k)

    values = torch.zeros(top, k)
    images = torch.full((top, k), -1, dtype=torch.int64)
    fired = torch.zeros(k, dtype=torch.float64)
    total = torch.zeros(k, dtype=torch.float64)
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
            bar.update(len(index))
    images[values <= 0] = -1
    values = values.T.numpy()
    images = images.T.numpy()
    result = TopActivations(values, images, (fired / max(loader.n_tokens, 1)).numpy(),
                            (total / fired.clamp_min(1)).numpy(), {}, {}, loader.n_tokens)
    # second pass, over the images shown only: their strongest concepts and per-token heatmaps
    wanted: dict[int, set[int]] = {}
    for c, row in enumerate(images):
        for i in row[row >= 0]:
            wanted.setdefault(int(i), set()).add(c)
    for index, rows in _image_batches(loader, max_tokens, only=set(wanted)):
        z = codes_of(rows)
        strongest_v, strongest_c = z.amax(1).topk(min(per_image, k), dim=1)
        for i, per_token, vs, cs in zip(index.tolist(), z, strongest_v.tolist(), strongest_c.tolist()):
            result.image_concepts[i] = [(c, v) for c, v in zip(cs, vs) if v > 0]
            for c in wanted[i] | {c for c, _ in result.image_concepts[i]}:
                result.heatmaps[(i, c)] = per_token[:, c].numpy().copy()
    return result

