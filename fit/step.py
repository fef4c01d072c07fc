"""One training step of an SAE: the loss (reconstruction, sparsity penalty, AuxK), Adam with
per-group learning rates on a warm-up (then constant, or a cosine decay), gradient clipping, then the
dictionary's constraint map. Everything a checkpoint must hold to resume lives here.

Dead codes: AuxK (Gao et al. 2024) for every encoder. The codes that have not fired for
`dead_tokens` tokens reconstruct the residual error through their own top-k_aux, which gives
them gradient without changing the main objective; it is the standard remedy for TopK SAEs
and, unlike the reference library's "reanimation" term, it does not push dead codes to fire
regardless of whether firing helps the reconstruction. Which codes are dead is read from the
device every `DEAD_CHECK_EVERY` steps, and until the next read AuxK runs on those codes alone
(the ones among them still dead): a few columns of the pre-activations and atoms instead of a
k-wide top-k, codes and decode, and nothing at all when none was dead.

On a GPU most steps are replayed from CUDA graphs (`archsae.fit.graphs`; `_graph_key` says which
are not), so a step updates its state in place and never replaces a tensor a graph reads.
"""

import math

import torch
import torch.nn.functional as F

from archsae.errors import UserError
from archsae.fit.dictionaries import restrict_to_candidates
from archsae.fit.encoders import Codes
from archsae.fit.graphs import StepGraphs
from archsae.fit.sae import SparseAutoencoder
from archsae.fit.settings import FitSettings, SAESettings
from archsae.ranks import Ranks


# Checkpoint key -> the archetypal dictionary's running sums of dL/d(W C): since W's update,
# since its candidates' choice
RUNNING_SUMS = (("hull_grad", "hull_grad_sum"), ("candidate_grad", "candidate_grad_sum"))
# Steps between reads of which codes are dead: each read waits for the device (on a GPU the
# host's launches run ahead of it otherwise); a code that dies waits at most this long for AuxK
DEAD_CHECK_EVERY = 64


def lr_factor(step: int, total: int, warmup: float, final: float) -> float:
    """Linear warm-up over `warmup` of the steps, then cosine decay to `final` x lr."""
    w = max(1, int(warmup * total))
    if step < w:
        return (step + 1) / w
    progress = min(1.0, (step - w) / max(1, total - w))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


class TrainingStep:
    """The model, its optimiser and the running state of training (step, dead-code counters,
    penalty coefficient). A step returns its metrics as tensors on the device: reading them
    (`float`) waits for the device, so callers read them only on the steps they log."""

    def __init__(self, sae: SAESettings, cfg: FitSettings, points: torch.Tensor | None,
                 total_steps: int, device: torch.device, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None, ranks: Ranks = Ranks(0, 1, False)):
        self.sae, self.cfg, self.total_steps, self.device = sae, cfg, total_steps, device
        self.ranks = ranks  # data-parallel: each process steps on its part of the batch
        if ranks.world > 1 and (sae.encoder != "topk" or cfg.batch_size % ranks.world):
            raise UserError(f"a data-parallel fit needs a TopK encoder (the others set thresholds "
                            f"from the whole batch) and a batch size divisible by the {ranks.world} "
                            f"processes, not {sae.encoder} and {cfg.batch_size}: change them, or "
                            "fit in one process")
        self.model = SparseAutoencoder(sae, points, torch.Generator().manual_seed(cfg.seed))
        if mean is not None:
            self.model.input_mean.copy_(mean)
            self.model.input_std.copy_(std)
        self.model.to(device)
        self.model.project_()
        # W and Lambda move on the scale of the simplex, not of the encoder: their own rate.
        # W's small eps lets its small-gradient entries move, and W's rate has its own decay
        # (far at first, then settling); Lambda is plain Adam, or it never leaves 0 (its
        # gradients are far below W's eps) and RA-SAE stays A-SAE (docs/fit.md).
        # JumpReLU thresholds must travel O(1) in a few hundred steps: 10 x lr.
        groups = {"model": {"params": [], "lr": cfg.lr},
                  "W": {"params": [], "lr": cfg.dictionary_lr, "eps": cfg.dictionary_eps},
                  "relax": {"params": [], "lr": cfg.dictionary_lr},
                  "threshold": {"params": [], "lr": 10 * cfg.lr}}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                group = ("W" if name == "dictionary.W" else "relax" if name == "dictionary.relax" else
                         "threshold" if name.endswith("log_threshold") else "model")
                groups[group]["params"].append(p)
        groups = [{**g, "name": n} for n, g in groups.items() if g["params"]]
        self.schedules = [(g["lr"], cfg.dictionary_final_lr if g["name"] == "W" else cfg.final_lr)
                          for g in groups]  # (base rate, final fraction) per group
        # fused: one kernel for all parameters (12x faster than the default on CPU for W); on a
        # GPU the rates are tensors there, set before each step, so a CUDA graph of it reads them
        cuda = device.type == "cuda"
        if cuda:
            groups = [{**g, "lr": torch.tensor(g["lr"], device=device)} for g in groups]
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-8,
                                          fused=device.type in ("cpu", "cuda"), capturable=cuda)
        self.graphs = StepGraphs(device) if cuda and cfg.cuda_graphs else None
        self.warmup = cfg.warmup_for(sae)
        self.step = 0
        self.hull_steps = 0  # steps whose dL/d(W C) the archetypal hull has summed since W's update
        # the codes dead at the last read (AuxK's candidates until the next); all before one
        self.dead_codes = torch.arange(sae.concepts, device=device)
        self.penalty_coef = torch.tensor(1e-2, dtype=torch.float64, device=device)
        self.silent_tokens = torch.zeros(sae.concepts, dtype=torch.int64, device=device)

    def __call__(self, x: torch.Tensor, metrics: bool = True) -> dict[str, torch.Tensor]:
        """One optimiser step on a batch of standardised tokens; returns its metrics (tensors),
        or {} without `metrics` (a dozen kernels fewer: on a GPU the host's launches bound a step).
        On a GPU the metrics of a step replayed from its CUDA graph are overwritten by the next."""
        for group, (base, final) in zip(self.optimizer.param_groups, self.schedules):
            rate = base * lr_factor(self.step, self.total_steps, self.warmup, final)
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(rate)
            else:
                group["lr"] = rate
        key = self._graph_key(x, metrics)
        if key is None:
            row = self._step(x, metrics)
        else:  # a graph with AuxK reads the dead codes
            reads = self.dead_codes if key[-1] else None
            row = self.graphs.run(key, reads, lambda static: self._step(static, metrics), x)
        self.step += 1
        return row

    def _graph_key(self, x: torch.Tensor, metrics: bool):
        """What a CUDA graph of this step depends on, or None where the step runs as Python: off
        a GPU; encoders other than TopK (BatchTopK asks the device for its threshold, the
        penalised ones steer a coefficient); data-parallel fits; W updated every few steps (its
        running sum and hull live across steps); steps that read which codes are dead, or choose
        W's candidate centroids anew."""
        if self.graphs is None or self.sae.encoder != "topk" or self.ranks.world > 1 or self.cfg.w_every > 1:
            return None
        aux, read = self._auxk_due(len(x))
        if read or (self.sae.dictionary == "archetypal" and self._refreshes_candidates()):
            return None
        return tuple(x.shape), x.dtype, metrics, aux and len(self.dead_codes) > 0

    def _auxk_due(self, batch: int) -> tuple[bool, bool]:
        """(AuxK may run this step, which codes are dead is read first): no code can be dead
        before `dead_tokens` tokens."""
        aux = self.step * batch >= self.cfg.dead_tokens
        return aux, aux and self.step % DEAD_CHECK_EVERY == 0

    def _refreshes_candidates(self) -> bool:
        """Whether this step's update of W chooses its candidate centroids anew."""
        return self.step // self.cfg.w_every % self.cfg.w_refresh == 0

    def _step(self, x: torch.Tensor, metrics: bool) -> dict[str, torch.Tensor]:
        s, cfg, model = self.sae, self.cfg, self.model
        # no autocast cache: a CUDA graph must not capture a cast made by an earlier step
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda",
                            cache_enabled=False):
            atoms = model.dictionary.weight()
            if model.encoder.penalised:  # their penalties read the pre-activations
                pre = model.pre_activations(x)
                codes = model.encoder(pre)
            else:
                codes = model.encode(x)
            x_hat = model.decode(codes, atoms)
            # mean over tokens of |x - x_hat|^2 / d (1 - R^2 for standardised data, roughly), in
            # one fused kernel each way rather than a chain of token x feature passes
            mse = F.mse_loss(x_hat.float(), x)
            loss = mse
            l0 = codes.l0() if metrics or model.encoder.penalised else None
            if model.encoder.penalised:
                penalty = model.encoder.penalty(pre, codes, atoms.norm(dim=-1)) / s.top_k
                loss = loss + self.penalty_coef.float() * penalty
            dead = self.silent_tokens >= cfg.dead_tokens
            aux = None
            batch = len(x) * self.ranks.world
            aux_due, read = self._auxk_due(batch)
            if aux_due:
                if read:
                    now = torch.nonzero(dead).flatten()
                    if not torch.equal(now, self.dead_codes):  # kept, a CUDA graph reads it
                        self.dead_codes = now
                if len(self.dead_codes):
                    aux = self._aux_loss(x, atoms, x - x_hat.detach().float(), dead)
                    loss = loss + cfg.aux_alpha * aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.ranks.world > 1:
            self._average_gradients()
        self.hull_steps += 1
        update_w = self.hull_steps == cfg.w_every or self.step + 1 == self.total_steps
        if s.dictionary == "archetypal":
            model.dictionary.collect_hull_gradient()
            if update_w:  # W's gradient, else W is left alone
                old = model.dictionary.hull_gradient_to_W(self.hull_steps, self._refreshes_candidates())
                if old is not None:
                    self._follow_candidates(old)
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        self.optimizer.step()
        model.project_(hull=update_w)
        if update_w:
            self.hull_steps = 0
        with torch.no_grad():
            fired = codes.fired(s.concepts)
            if self.ranks.world > 1:  # fired anywhere in the global batch
                fired = fired.to(torch.uint8)
                torch.distributed.all_reduce(fired, torch.distributed.ReduceOp.MAX)
                fired = fired.bool()
            self.silent_tokens.add_(batch).masked_fill_(fired, 0)  # in place: a graph reads it
            if model.encoder.penalised:  # steer the penalty towards the target L0
                ratio = (l0.double() / s.top_k - 1.0).clamp(-1.0, 1.0)
                self.penalty_coef = (self.penalty_coef * torch.exp(0.01 * ratio)).clamp(1e-6, 1e3)
        if not metrics:
            return {}
        with torch.no_grad():
            centred = x - x.mean(0)
            r2 = 1.0 - mse.detach() * x.numel() / centred.pow(2).sum().clamp_min(1e-12)
        return {"loss": loss.detach(), "mse": mse.detach(), "r2": r2, "l0": l0,
                "penalty_coef": self.penalty_coef, "dead": dead.float().mean(),
                "aux": aux.detach() if aux is not None else torch.zeros((), device=x.device)}

    def _follow_candidates(self, old: torch.Tensor) -> None:
        """Adam's state of W onto its new candidate centroids: kept where a column stays; a new
        one starts without momentum and with its gradient's square as second moment (as if seen
        once), so its first steps are small rather than a full-rate jump."""
        dictionary = self.model.dictionary
        state = self.optimizer.state.get(dictionary.W, {})
        new = dictionary.candidates
        if "exp_avg" in state:
            state["exp_avg"].copy_(restrict_to_candidates(state["exp_avg"], old, new))
            state["exp_avg_sq"].copy_(restrict_to_candidates(state["exp_avg_sq"], old, new,
                                                             dictionary.W.grad.square()))

    def _average_gradients(self) -> None:
        """Mean of every gradient over the processes (each a mean over its equal part of the
        batch: together the global batch's), one flat all-reduce; the archetypal W's is its
        hull's dL/d(W C), k x d, rather than W's own k x n'."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        hull = getattr(self.model.dictionary, "_hull", None)
        if hull is not None and hull.grad is not None:
            grads.append(hull.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.ranks.world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs besides the model and optimizer to resume this exact run."""
        tensors = {"silent_tokens": self.silent_tokens, "penalty_coef": self.penalty_coef,
                   "hull_steps": torch.tensor(self.hull_steps), "dead_codes": self.dead_codes}
        for key, name in RUNNING_SUMS:
            pending = getattr(self.model.dictionary, name, None)
            if pending is not None:
                tensors[key] = pending
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.graphs is not None:  # they read the tensors replaced below
            self.graphs = StepGraphs(self.device)
        self.silent_tokens = tensors["silent_tokens"].to(self.device)
        self.penalty_coef = tensors["penalty_coef"].to(self.device)
        self.hull_steps = int(tensors.get("hull_steps", 0))
        if "dead_codes" in tensors:
            self.dead_codes = tensors["dead_codes"].to(self.device)
        for key, name in RUNNING_SUMS:
            if key in tensors:
                setattr(self.model.dictionary, name, tensors[key].to(self.device))

    def _aux_loss(self, x, atoms, residual, dead):
        """AuxK: the dead codes' own top-k reconstructs the main reconstruction's error, from the
        pre-activations of the codes dead at the last read (computed for those columns alone).
        Without asking the device which of them are dead still (that would wait for it): the
        others are selected as relu(-inf) = 0, which gives them no gradient, and the loss is
        zeroed when none is, so it adds nothing then."""
        columns = self.dead_codes
        k_aux = min(len(columns), self.cfg.aux_k or 2 * self.sae.top_k)
        still = dead[columns]
        masked = self.model.pre_activations(x, columns).masked_fill(~still, float("-inf"))
        values, indices = masked.topk(k_aux, dim=-1)
        aux_hat = self.model.decode(Codes(None, indices, torch.relu(values)), atoms[columns], bias=False)
        return F.mse_loss(aux_hat.float(), residual) * still.any()

