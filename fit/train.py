"""Training an SAE from a store: the loop over the token stream, progress, metrics,
checkpoints that resume exactly (SIGTERM checkpoints and stops), and the fit directory's
files. Held-out metrics are the evaluate stage's (`archsae.evaluate.run.evaluate_fit`). The maths of a step is in `archsae.fit.step`.
"""

import hashlib
import json
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from archsae.errors import UserError
from archsae.cache import TokenStore, open_store
from archsae.fit.centroids import compute_centroids, largest_sensible_k, load_points
from archsae.fit.checkpoint import (SCHEMA_VERSION, load_checkpoint, read_config, restore_optimizer,
                                   save_checkpoint, write_json, write_tensors)
from archsae.fit.sae import SAESettings
from archsae.fit.step import FitSettings, TrainingStep

PAPER_CENTROIDS = 32000  # K-means centroids per backbone in the paper


def store_id(store) -> str:
    a = store.attrs
    key = json.dumps([a.get(k) for k in ("model", "timm_name", "weights", "layer", "source_hash",
                                         "shape", "dtype")])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Trainer:
    """One fit: the model, its optimiser and the position in the token stream."""

    def __init__(self, store_path, fitdir, sae: SAESettings, fit: FitSettings, progress=True):
        self.fitdir = Path(fitdir)
        self.store = open_store(store_path, mode="r+")
        self.sae, self.cfg, self.progress = sae, fit, progress
        if sae.d != self.store.d:
            raise UserError(f"the SAE expects d={sae.d} but {self.store.path} has d={self.store.d}")
        self.device = torch.device(fit.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.loader = TokenStore(self.store, tokens=fit.tokens, split="train", heldout_fraction=fit.heldout,
                                 subset=fit.subset, subset_seed=fit.subset_seed)
        self.steps_per_epoch = self.loader.num_batches(fit.batch_size)
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {fit.batch_size} is larger than the {self.loader.n_tokens} "
                            "training tokens: lower it")
        self.total_steps = self.steps_per_epoch * fit.epochs
        # "dead" = silent for 1M tokens or one epoch, whichever is shorter (small stores)
        self.cfg = fit = replace(fit, dead_tokens=min(fit.dead_tokens, self.loader.n_tokens))
        points = load_points(self.store, sae.centroids) if sae.needs_centroids else None
        self.learner = TrainingStep(sae, fit, points, self.total_steps, self.device)
        self.stop_requested = False

    # -- state -----------------------------------------------------------------------------
    def config(self, finished: bool) -> dict:
        return {"schema_version": SCHEMA_VERSION, "finished": finished,
                "store": {"path": str(self.store.path.resolve()), "id": store_id(self.store),
                          "model": self.store.attrs.get("model"), "d": self.store.d},
                "centroids": self._centroid_info(),
                "standardisation": "input_mean / input_std in model.safetensors",
                "sae": self.sae.to_dict(), "fit": asdict(self.cfg),
                "steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch}

    def _centroid_info(self):
        if not self.sae.needs_centroids:
            return None
        points, attrs = self.store.load_centroids(self.sae.centroids)
        return {"name": self.sae.centroids, "id": hashlib.sha256(points.tobytes()).hexdigest()[:16],
                **attrs}

    def save(self) -> None:
        save_checkpoint(self.fitdir, self.learner.step, self.learner.model, self.learner.optimizer,
                        {"silent_tokens": self.learner.silent_tokens, "rng": torch.get_rng_state()},
                        {"step": self.learner.step, "penalty_coef": self.learner.penalty_coef})

    def resume(self) -> bool:
        ckpt = load_checkpoint(self.fitdir)
        if ckpt is None:
            return False
        model_t, opt_t, trainer_t, state = ckpt
        self.learner.model.load_state_dict(model_t)
        restore_optimizer(self.learner.optimizer, opt_t, state["optimizer"])
        self.learner.silent_tokens = trainer_t["silent_tokens"].to(self.device)
        torch.set_rng_state(trainer_t["rng"])
        self.learner.step, self.learner.penalty_coef = state["step"], state["penalty_coef"]
        _truncate_metrics(self.fitdir / "metrics.jsonl", self.learner.step)
        return True

    def run(self) -> None:
        self.fitdir.mkdir(parents=True, exist_ok=True)
        write_json(self.fitdir / "config.json", self.config(finished=False))
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        cfg = self.cfg
        try:
            with open(self.fitdir / "metrics.jsonl", "a") as log, \
                    tqdm(total=self.total_steps, initial=self.learner.step, unit="step", desc=f"fit {self.sae.sae}",
                         disable=not self.progress, dynamic_ncols=True) as bar:
                t0, tokens = time.perf_counter(), 0
                while self.learner.step < self.total_steps:
                    epoch, start = divmod(self.learner.step, self.steps_per_epoch)
                    for x in self.loader.batches(cfg.batch_size, seed=cfg.seed, epoch=epoch, start=start):
                        row = self.learner(x.to(self.device, non_blocking=True))
                        tokens += len(x)
                        rate = tokens / (time.perf_counter() - t0)
                        bar.update(1)
                        bar.set_postfix(r2=f"{row['r2']:.3f}", l0=f"{row['l0']:.0f}",
                                        dead=f"{row['dead']:.2f}", tok_s=f"{rate:.3g}")
                        if self.learner.step % cfg.log_every == 0 or self.learner.step == self.total_steps:
                            log.write(json.dumps({**row, "epoch": epoch, "tokens_per_s": rate}) + "\n")
                            log.flush()
                        if self.learner.step % cfg.checkpoint_every == 0 or self.stop_requested:
                            self.save()
                        if self.stop_requested:
                            raise SystemExit(143)
        finally:
            signal.signal(signal.SIGTERM, previous)
        self.save()
        _, mean, std = self.store.feature_stats(cfg.tokens)
        tensors = {k: v for k, v in self.learner.model.state_dict().items()}
        tensors["input_mean"] = torch.from_numpy(mean).float()
        tensors["input_std"] = torch.from_numpy(std).float()
        write_tensors(self.fitdir / "model.safetensors", tensors)
        write_json(self.fitdir / "config.json", self.config(finished=True))

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True  # checkpoint at the end of this step, then exit


def _truncate_metrics(path: Path, step: int) -> None:
    if path.exists():
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def ensure_centroids(store_path, sae: SAESettings, cfg: FitSettings, n_centroids: int | None = None,
                     progress: bool = True) -> None:
    """Give `sae` a centroid set when it needs one and names none: computed (or reused) with
    K = n_centroids, default min(32000, training tokens / 4)."""
    if not sae.needs_centroids or sae.centroids is not None:
        return
    n_train = TokenStore(store_path, tokens=cfg.tokens, heldout_fraction=cfg.heldout).n_tokens
    k = n_centroids or min(PAPER_CENTROIDS, largest_sensible_k(n_train))
    sae.centroids = compute_centroids(store_path, k, seed=0, tokens=cfg.tokens, progress=progress)
    sae.n_centroids = k


def fit(store_path, fitdir, sae: SAESettings, cfg: FitSettings, resume: bool = False,
        n_centroids: int | None = None, progress: bool = True) -> None:
    """Train (or resume) a fit; computes the centroids first when the SAE needs them and they
    are missing."""
    fitdir = Path(fitdir)
    store = open_store(store_path)
    if (fitdir / "config.json").exists():
        old = read_config(fitdir)
        if not resume:
            raise UserError(f"{fitdir} already holds a fit: pass --resume to continue it, or "
                            "another --out")
        if old["store"]["id"] != store_id(store) or old["store"]["d"] != store.d:
            raise UserError(f"{fitdir} was trained on another store ({old['store']['model']}, "
                            f"d={old['store']['d']}), not {store.path} ({store.attrs.get('model')}, "
                            f"d={store.d}): pass the store it was made from")
        sae = SAESettings.from_dict(old["sae"])
        cfg = FitSettings.from_dict({**old["fit"], "device": cfg.device})
        if old.get("finished"):
            return
    else:
        ensure_centroids(store_path, sae, cfg, n_centroids, progress)
    trainer = Trainer(store_path, fitdir, sae, cfg, progress)
    if resume:
        trainer.resume()
    trainer.run()


def fit_tensor(x: torch.Tensor, sae: SAESettings, cfg: FitSettings, points: torch.Tensor | None = None,
               progress: bool = False):
    """Train on standardised rows held in memory (small benchmark data such as pooled vectors
    of a few thousand images); the same step as a store fit, without checkpoints."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = min(cfg.batch_size, len(x))
    steps_per_epoch = len(x) // batch
    cfg = replace(cfg, dead_tokens=min(cfg.dead_tokens, len(x)))
    learner = TrainingStep(sae, cfg, points, steps_per_epoch * cfg.epochs, device)
    order = torch.Generator().manual_seed(cfg.seed)
    x = x.to(device)
    for _ in tqdm(range(cfg.epochs), unit="epoch", desc=f"fit {sae.sae}", disable=not progress):
        perm = torch.randperm(len(x), generator=order).to(device)
        for b in range(steps_per_epoch):
            learner(x[perm[b * batch:(b + 1) * batch]])
    return learner.model.eval()
