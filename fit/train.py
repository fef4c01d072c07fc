"""Training an SAE from a store: Adam, warm-up then cosine decay, gradient clipping, the
constraint projection after each step, AuxK for dead codes, checkpoints that resume exactly.

Dead codes: AuxK (Gao et al. 2024) for every encoder. The codes that have not fired for
`dead_tokens` tokens reconstruct the residual error through their own top-k_aux, which gives
them gradient without changing the main objective; it is the standard remedy for TopK SAEs
and, unlike the reference library's "reanimation" term, it does not push dead codes to fire
regardless of whether firing helps the reconstruction.
"""

import hashlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from archsae.errors import UserError
from archsae.cache import TokenStore, open_store
from archsae.fit.centroids import centroid_name, compute_centroids, load_points
from archsae.fit.checkpoint import (SCHEMA_VERSION, load_checkpoint, read_config, restore_optimizer,
                                   save_checkpoint, write_json, write_tensors)
from archsae.fit.encoders import Codes
from archsae.fit.sae import SAESettings, SparseAutoencoder


@dataclass
class FitSettings:
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 5e-4
    dictionary_lr: float | None = None  # archetypal W and Lambda; None: see DEFAULT_DICTIONARY_LR
    warmup: float = 0.05  # fraction of the steps
    final_lr: float = 0.1  # fraction of lr reached at the end of the cosine decay
    clip_grad: float = 1.0
    aux_k: int | None = None  # None: 2 x top_k
    aux_alpha: float = 1 / 32
    dead_tokens: int = 1_000_000  # a code silent for this many tokens is dead
    tokens: str = "all"
    heldout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500  # steps
    log_every: int = 20
    device: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "FitSettings":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


DEFAULT_DICTIONARY_LR = 5e-3


def store_id(store) -> str:
    a = store.attrs
    key = json.dumps([a.get(k) for k in ("model", "timm_name", "weights", "layer", "source_hash",
                                         "shape", "dtype")])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def lr_factor(step: int, total: int, warmup: float, final: float) -> float:
    """Linear warm-up over `warmup` of the steps, then cosine decay to `final` x lr."""
    w = max(1, int(warmup * total))
    if step < w:
        return (step + 1) / w
    progress = min(1.0, (step - w) / max(1, total - w))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """One fit: the model, its optimiser and the position in the token stream."""

    def __init__(self, store_path, fitdir, sae: SAESettings, fit: FitSettings, progress=True):
        self.fitdir = Path(fitdir)
        self.store = open_store(store_path, mode="r+")
        self.sae, self.cfg, self.progress = sae, fit, progress
        if sae.d != self.store.d:
            raise UserError(f"the SAE expects d={sae.d} but {self.store.path} has d={self.store.d}")
        self.device = torch.device(fit.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.loader = TokenStore(self.store, tokens=fit.tokens, split="train", heldout_fraction=fit.heldout)
        self.steps_per_epoch = self.loader.num_batches(fit.batch_size)
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {fit.batch_size} is larger than the {self.loader.n_tokens} "
                            "training tokens: lower it")
        self.total_steps = self.steps_per_epoch * fit.epochs
        points = load_points(self.store, sae.centroids) if sae.needs_centroids else None
        torch.manual_seed(fit.seed)
        self.model = SparseAutoencoder(sae, points).to(self.device)
        self.model.project_()
        # W and Lambda move on the scale of the simplex, not of the encoder: their own rate;
        # JumpReLU thresholds must travel O(1) in a few hundred steps: 10 x lr.
        groups = {"model": {"params": [], "lr": fit.lr},
                  "archetypal": {"params": [], "lr": fit.dictionary_lr or DEFAULT_DICTIONARY_LR},
                  "threshold": {"params": [], "lr": 10 * fit.lr}}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                group = ("archetypal" if name in ("dictionary.W", "dictionary.relax") else
                         "threshold" if name.endswith("log_threshold") else "model")
                groups[group]["params"].append(p)
        groups = [{**g, "name": n} for n, g in groups.items() if g["params"]]
        self.base_lrs = [g["lr"] for g in groups]
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-8)
        self.step = 0
        self.penalty_coef = 1e-2
        self.silent_tokens = torch.zeros(sae.concepts, dtype=torch.int64, device=self.device)
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
        save_checkpoint(self.fitdir, self.step, self.model, self.optimizer,
                        {"silent_tokens": self.silent_tokens, "rng": torch.get_rng_state()},
                        {"step": self.step, "penalty_coef": self.penalty_coef})

    def resume(self) -> bool:
        ckpt = load_checkpoint(self.fitdir)
        if ckpt is None:
            return False
        model_t, opt_t, trainer_t, state = ckpt
        self.model.load_state_dict(model_t)
        restore_optimizer(self.optimizer, opt_t, state["optimizer"])
        self.silent_tokens = trainer_t["silent_tokens"].to(self.device)
        torch.set_rng_state(trainer_t["rng"])
        self.step, self.penalty_coef = state["step"], state["penalty_coef"]
        _truncate_metrics(self.fitdir / "metrics.jsonl", self.step)
        return True

    # -- training --------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor) -> dict:
        s, cfg, model = self.sae, self.cfg, self.model
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * lr_factor(self.step, self.total_steps, cfg.warmup, cfg.final_lr)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            atoms = model.dictionary.weight()
            pre = model.pre_activations(x)
            codes = model.encoder(pre)
            x_hat = model.decode(codes, atoms)
            err = (x_hat.float() - x)
            mse = err.pow(2).sum(-1).mean() / s.d  # 1 - R^2 for standardised data, roughly
            loss = mse
            l0 = (codes.dense > 0).float().sum(-1).mean()
            if model.encoder.penalised:
                penalty = model.encoder.penalty(pre, codes, atoms.norm(dim=-1)) / s.top_k
                loss = loss + self.penalty_coef * penalty
            dead = self.silent_tokens >= cfg.dead_tokens
            aux = self._aux_loss(pre, atoms, err.detach(), dead) if dead.any() else None
            if aux is not None:
                loss = loss + cfg.aux_alpha * aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        self.optimizer.step()
        model.project_()
        with torch.no_grad():
            fired = (codes.dense > 0).any(0)
            self.silent_tokens = torch.where(fired, 0, self.silent_tokens + len(x))
            if model.encoder.penalised:  # steer the penalty towards the target L0
                ratio = float(l0) / s.top_k - 1.0
                self.penalty_coef = min(1e3, max(1e-6, self.penalty_coef * math.exp(
                    0.01 * max(-1.0, min(1.0, ratio)))))
            centred = x - x.mean(0)
            r2 = 1.0 - float(err.pow(2).sum()) / max(float(centred.pow(2).sum()), 1e-12)
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), "mse": float(mse.detach()),
                "r2": r2, "l0": float(l0), "penalty_coef": self.penalty_coef,
                "dead": float(dead.float().mean()), "aux": float(aux) if aux is not None else 0.0,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def _aux_loss(self, pre, atoms, residual, dead):
        """AuxK: the dead codes' own top-k reconstructs the main reconstruction's error."""
        k_aux = min(int(dead.sum()), self.cfg.aux_k or 2 * self.sae.top_k)
        masked = pre.masked_fill(~dead, float("-inf"))
        values, indices = masked.topk(k_aux, dim=-1)
        values = torch.relu(values)
        aux_hat = self.model.decode(Codes(None, indices, values), atoms, bias=False)
        return (aux_hat.float() - residual).pow(2).sum(-1).mean() / self.sae.d

    def run(self) -> dict:
        self.fitdir.mkdir(parents=True, exist_ok=True)
        write_json(self.fitdir / "config.json", self.config(finished=False))
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        cfg = self.cfg
        try:
            with open(self.fitdir / "metrics.jsonl", "a") as log, \
                    tqdm(total=self.total_steps, initial=self.step, unit="step", desc=f"fit {self.sae.sae}",
                         disable=not self.progress, dynamic_ncols=True) as bar:
                t0, tokens = time.perf_counter(), 0
                while self.step < self.total_steps:
                    epoch, start = divmod(self.step, self.steps_per_epoch)
                    for x in self.loader.batches(cfg.batch_size, seed=cfg.seed, epoch=epoch, start=start):
                        row = self.train_step(x.to(self.device, non_blocking=True))
                        tokens += len(x)
                        rate = tokens / (time.perf_counter() - t0)
                        bar.update(1)
                        bar.set_postfix(r2=f"{row['r2']:.3f}", l0=f"{row['l0']:.0f}",
                                        dead=f"{row['dead']:.2f}", tok_s=f"{rate:.3g}")
                        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                            log.write(json.dumps({**row, "epoch": epoch, "tokens_per_s": rate}) + "\n")
                            log.flush()
                        if self.step % cfg.checkpoint_every == 0 or self.stop_requested:
                            self.save()
                        if self.stop_requested:
                            raise SystemExit(143)
        finally:
            signal.signal(signal.SIGTERM, previous)
        self.save()
        summary = self.evaluate_heldout()
        _, mean, std = self.store.feature_stats(cfg.tokens)
        tensors = {k: v for k, v in self.model.state_dict().items()}
        tensors["input_mean"] = torch.from_numpy(mean).float()
        tensors["input_std"] = torch.from_numpy(std).float()
        write_tensors(self.fitdir / "model.safetensors", tensors)
        write_json(self.fitdir / "config.json", {**self.config(finished=True), "heldout": summary})
        return summary

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True  # checkpoint at the end of this step, then exit

    @torch.no_grad()
    def evaluate_heldout(self) -> dict:
        """Pooled R^2 (per-feature mean, float64), mean L0 and dead fraction on the held-out split."""
        loader = TokenStore(self.store, tokens=self.cfg.tokens, split="heldout",
                            heldout_fraction=self.cfg.heldout)
        self.model.eval()
        sse, n, s1, s2 = 0.0, 0, 0.0, 0.0
        l0, fired = 0.0, torch.zeros(self.sae.concepts, dtype=torch.bool, device=self.device)
        for x in loader.batches(4096, shuffle=False, drop_last=False):
            x = x.to(self.device)
            x_hat, codes, _ = self.model(x)
            x64 = x.double()
            sse += float((x_hat.double() - x64).pow(2).sum())
            s1 = s1 + x64.sum(0)
            s2 = s2 + x64.pow(2).sum(0)
            n += len(x)
            l0 += float((codes.dense > 0).sum())
            fired |= (codes.dense > 0).any(0)
        self.model.train()
        sst = float((s2 - s1.pow(2) / n).sum())
        return {"r2": 1.0 - sse / sst, "l0": l0 / n, "dead": float((~fired).float().mean()),
                "tokens": n}


def _truncate_metrics(path: Path, step: int) -> None:
    if path.exists():
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def fit(store_path, fitdir, sae: SAESettings, cfg: FitSettings, resume: bool = False,
        n_centroids: int | None = None, progress: bool = True) -> dict:
    """Train (or resume) a fit; computes the centroids first when the SAE needs them and they
    are missing. Returns the held-out summary."""
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
            return old.get("heldout", {})
    elif sae.needs_centroids and sae.centroids is None:
        k = n_centroids or sae.concepts
        sae.centroids = compute_centroids(store_path, k, seed=0, tokens=cfg.tokens,
                                          progress=progress)
        sae.n_centroids = k
    trainer = Trainer(store_path, fitdir, sae, cfg, progress)
    if resume:
        trainer.resume()
    return trainer.run()
