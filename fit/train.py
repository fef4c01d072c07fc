"""Training an SAE from a store: the loop over the token stream, progress, metrics,
checkpoints that resume exactly (SIGTERM checkpoints and stops), and the fit directory's
files (docs/fit-format.md). Held-out metrics are the evaluate stage's. The maths of a step is
in `archsae.fit.step`.
"""

import hashlib
import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from archsae.cache import TokenStore, is_store, open_store
from archsae.devices import resolve_device
from archsae.errors import InvalidSetting, UserError
from archsae.files import write_json
from archsae.fit.centroids import centroid_set, load_points
from archsae.fit.checkpoint import (SCHEMA_VERSION, check_store, fit_settings, load_checkpoint,
                                    read_config, restore_optimizer, save_checkpoint, write_tensors)
from archsae.fit.settings import CentroidSettings, FitSettings, SAESettings
from archsae.fit.step import TrainingStep
from archsae.ranks import Ranks, resolve_ranks


class Trainer:
    """One fit: the model, its optimiser and the position in the token stream."""

    def __init__(self, store_path, fitdir, sae: SAESettings, fit: FitSettings, progress=True,
                 ranks: Ranks = Ranks(0, 1, False)):
        self.fitdir = Path(fitdir)
        self.store = open_store(store_path, mode="r+")
        self.sae, self.cfg, self.ranks = sae, fit, ranks
        self.progress = progress and ranks.main
        if sae.d != self.store.d:
            raise UserError(f"the SAE expects d={sae.d} but {self.store.path} has d={self.store.d}")
        self.device = ranks.device(resolve_device(fit.device))
        self.loader = TokenStore(self.store, tokens=fit.tokens, part="train", split=fit.split,
                                 subset=fit.subset, subset_seed=fit.subset_seed)
        self.steps_per_epoch = self.loader.num_batches(fit.batch_size)
        if self.steps_per_epoch == 0:
            raise UserError(f"a batch of {fit.batch_size} tokens is larger than the "
                            f"{self.loader.n_tokens} training tokens: use a smaller batch size")
        self.total_steps = self.steps_per_epoch * fit.epochs
        # "dead" = silent for 1M tokens or one epoch, whichever is shorter (small stores)
        step_cfg = replace(fit, dead_tokens=min(fit.dead_tokens, self.loader.n_tokens))
        points = load_points(self.store, sae.centroids) if sae.needs_centroids else None
        self.learner = TrainingStep(sae, step_cfg, points, self.total_steps, self.device,
                                    self.loader.mean, self.loader.std, ranks)
        self.stop_requested = False

    # -- state -----------------------------------------------------------------------------
    def config(self, finished: bool) -> dict:
        return {"schema_version": SCHEMA_VERSION, "finished": finished,
                "store": {"path": str(self.store.path.resolve()), "id": self.store.id,
                          "model": self.store.attrs.get("model"), "d": self.store.d},
                "centroids": self._centroid_info(),
                "sae": self.sae.to_dict(), "fit": self.cfg.to_dict(),
                "steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "processes": self.ranks.world}

    def _centroid_info(self):
        if not self.sae.needs_centroids:
            return None
        points, attrs = self.store.load_centroids(self.sae.centroids)
        return {"name": self.sae.centroids, "id": hashlib.sha256(points.tobytes()).hexdigest()[:16],
                **attrs}

    def save(self) -> None:
        if not self.ranks.main:  # every process holds the same state: one writes it
            return
        save_checkpoint(self.fitdir, self.learner.step, self.learner.model, self.learner.optimizer,
                        self.learner.state_tensors(), {"step": self.learner.step})

    def resume(self) -> None:
        """Continue from the last checkpoint (or from the start when none was written)."""
        ckpt = load_checkpoint(self.fitdir)
        if ckpt is None:
            if self.ranks.main:
                _truncate_metrics(self.fitdir / "metrics.jsonl", 0)
            return
        model_t, opt_t, trainer_t, state = ckpt
        self.learner.model.load_state_dict(model_t)
        restore_optimizer(self.learner.optimizer, opt_t, state["optimizer"])
        self.learner.load_state_tensors(trainer_t)
        self.learner.step = state["step"]
        if self.ranks.main:
            _truncate_metrics(self.fitdir / "metrics.jsonl", self.learner.step)

    def run(self) -> None:
        main = self.ranks.main  # writes the fit folder; the other processes only compute
        if main:
            self.fitdir.mkdir(parents=True, exist_ok=True)
            write_json(self.fitdir / "config.json", self.config(finished=False))
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            with open(self.fitdir / "metrics.jsonl" if main else os.devnull, "a") as log, \
                    tqdm(total=self.total_steps, initial=self.learner.step, unit="step",
                         desc=f"fit {self.sae.name}", disable=not self.progress, dynamic_ncols=True) as bar:
                self._train(log, bar)
        finally:
            signal.signal(signal.SIGTERM, previous)
        self.save()
        if main:
            write_tensors(self.fitdir / "model.safetensors", self.learner.model.state_dict())
            write_json(self.fitdir / "config.json", self.config(finished=True))
        self.ranks.barrier()

    def _train(self, log, bar) -> None:
        """Steps until the end (or a SIGTERM); metrics are read off the device only when logged."""
        cfg, learner = self.cfg, self.learner
        t0, tokens = time.perf_counter(), 0
        while learner.step < self.total_steps:
            epoch, start = divmod(learner.step, self.steps_per_epoch)
            # on a GPU the stored values travel (whole windows, half the bytes) and are shuffled,
            # decoded and standardised there
            device = self.device if self.device.type == "cuda" else None
            part = (self.ranks.rank, self.ranks.world)
            for x in self.loader.batches(cfg.batch_size, seed=cfg.seed, epoch=epoch, start=start,
                                         device=device, part=part):
                logged = (learner.step + 1) % cfg.log_every == 0 or learner.step + 1 == self.total_steps
                row = learner(x if device is None else learner.model.standardise(self.loader.decode(x)),
                              metrics=logged)
                tokens += len(x) * self.ranks.world
                bar.update(1)
                if logged:
                    rate = tokens / (time.perf_counter() - t0)
                    row = {"step": learner.step, **{k: float(v) for k, v in row.items()},
                           "lr": float(learner.optimizer.param_groups[0]["lr"]), "epoch": epoch,
                           "tokens_per_s": rate}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    bar.set_postfix(r2=f"{row['r2']:.3f}", l0=f"{row['l0']:.0f}",
                                    dead=f"{row['dead']:.2f}", tok_s=f"{rate:.3g}")
                if learner.step % cfg.checkpoint_every == 0 or self.stop_requested:
                    self.save()
                if self.stop_requested:
                    raise SystemExit(143)

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True  # checkpoint at the end of this step, then exit


def _truncate_metrics(path: Path, step: int) -> None:
    if path.exists():
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def with_centroids(store_path, sae: SAESettings, cfg: FitSettings,
                   centroids: CentroidSettings = CentroidSettings(), progress: bool = True) -> SAESettings:
    """`sae` with a centroid set when it needs one and names none: computed (or reused) on
    the train split of `cfg`, K = centroids.n_centroids (default min(32000, train tokens / 4))."""
    if not sae.needs_centroids or sae.centroids is not None:
        return sae
    return replace(sae, centroids=centroid_set(store_path, centroids, cfg.tokens, cfg.split, progress))


def _check_output(fitdir: Path) -> None:
    """A fit writes only into a new folder, an empty one, or a fit folder: never into a store
    or a folder of someone else's files."""
    for folder in (fitdir, *fitdir.resolve().parents):
        if is_store(folder):
            raise InvalidSetting("out", f"{fitdir} is {'' if folder == fitdir else 'inside '}the "
                                        f"activation store {folder}: pass another {{name}} for the fit")
    if fitdir.exists() and (not fitdir.is_dir() or (any(fitdir.iterdir()) and not (fitdir / "config.json").exists())):
        raise InvalidSetting("out", f"{fitdir} exists and is not a fit folder: pass another {{name}} "
                                    "(a new or empty folder)")


def _differences(old, new, ignore=()) -> list[str]:
    a, b = old.to_dict(), new.to_dict()
    return [f"{k} {a[k]!r}, not {b[k]!r}" for k in a if k not in ignore and a[k] != b[k]]


def fit(store_path, fitdir, sae: SAESettings, cfg: FitSettings, resume: bool = False,
        centroids: CentroidSettings = CentroidSettings(), progress: bool = True) -> None:
    """Train a fit, or continue an unfinished one from its last checkpoint (it must have the
    same settings). A finished fit is refused unless `resume` (then there is nothing to do).
    Computes the centroids first when the SAE needs them and they are missing."""
    fitdir = Path(fitdir)
    store = open_store(store_path)
    _check_output(fitdir)
    resolve_device(cfg.device)  # refuse a device this machine lacks before any work
    ranks = resolve_ranks()  # under torchrun: one process per part of each batch
    try:
        new = not (fitdir / "config.json").exists()
        ranks.barrier()  # every process has looked before the first one writes
        if new:
            if ranks.main:  # the centroids are computed once; the others then find them
                sae = with_centroids(store_path, sae, cfg, centroids, progress)
            ranks.barrier()
            if not ranks.main:
                sae = with_centroids(store_path, sae, cfg, centroids, progress=False)
            Trainer(store_path, fitdir, sae, cfg, progress, ranks).run()
            return
        old = read_config(fitdir)
        check_store(fitdir, old, store)
        old_sae, old_cfg = fit_settings(old)
        differ = (_differences(old_sae, sae, ignore=() if sae.centroids else ("centroids",))
                  + _differences(old_cfg, cfg, ignore=FitSettings.RUNTIME))
        if differ:
            raise UserError(f"{fitdir} holds a fit with other settings ({'; '.join(differ)}): "
                            "continue it with its own settings, or write to another folder")
        if old.get("finished"):
            if not resume:
                raise UserError(f"{fitdir} already holds a finished fit: write to another folder")
            return
        runtime = {key: getattr(cfg, key) for key in FitSettings.RUNTIME}
        trainer = Trainer(store_path, fitdir, old_sae, replace(old_cfg, **runtime), progress, ranks)
        trainer.resume()
        trainer.run()
    finally:
        ranks.close()


def resumed_settings(fitdir, sae_values: dict, fit_values: dict) -> tuple[SAESettings, FitSettings]:
    """The settings recorded in an existing fit folder with the given values put in: what a
    command that names only some settings asks to continue (any that differ are then refused)."""
    sae, cfg = fit_settings(read_config(fitdir))
    return replace(sae, **sae_values), replace(cfg, **fit_values)


def fit_tensor(x: torch.Tensor, sae: SAESettings, cfg: FitSettings, points: torch.Tensor | None = None,
               progress: bool = False):
    """Train on standardised rows held in memory (small benchmark data such as pooled vectors
    of a few thousand images); the same step as a store fit, without checkpoints."""
    device = resolve_device(cfg.device)
    batch = min(cfg.batch_size, len(x))
    steps_per_epoch = len(x) // batch
    cfg = replace(cfg, dead_tokens=min(cfg.dead_tokens, len(x)))
    learner = TrainingStep(sae, cfg, points, steps_per_epoch * cfg.epochs, device)
    order = torch.Generator().manual_seed(cfg.seed)
    x = x.to(device)
    for _ in tqdm(range(cfg.epochs), unit="epoch", desc=f"fit {sae.name}", disable=not progress):
        perm = torch.randperm(len(x), generator=order).to(device)
        for b in range(steps_per_epoch):
            learner(x[perm[b * batch:(b + 1) * batch]], metrics=False)
    return learner.model.eval()
