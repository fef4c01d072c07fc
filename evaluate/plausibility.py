"""Plausibility (PAPER.md): how close the dictionary's atoms come to the directions the
backbone's own classifier reads, mean over classes of max_j cos(v_i, D_j).

The space mismatch, handled here: atoms live in the standardised token space of the store; the
head reads pooled (averaged or CLS) tokens, sometimes through a LayerNorm. Pooling is linear, so
a concept adds the same direction to the pooled vector as to its token. A LayerNorm with scale
gamma centres its input and divides by a positive per-image scale, so the image-independent
part of the raw (unstandardised) token direction class i reads is r_i = centre(gamma * v_i) (the
rest depends on the image and is left out); without a norm, r_i = v_i. An atom D_j (standardised) adds D_j * std to a raw token. Plausibility is therefore
mean_i max_j cos(r_i, D_j * std), in the raw token space where the head acts. Random atoms
(Gaussian in the standardised space) give the chance level it is printed beside. Heads with a
hidden layer (not a linear read-out) are refused.
"""

import torch

from archsae.errors import UserError
from archsae.fit import unit_rows


def head_rows(model: torch.nn.Module) -> tuple[torch.Tensor, str]:
    """(class directions r (c, d) in the raw space of the head's input tokens, what was done)."""
    head = model.get_classifier()
    if not isinstance(head, torch.nn.Linear) or head.out_features == 0:
        raise UserError(f"{type(model).__name__} has no linear classifier head: plausibility needs "
                        "a backbone with one (vit, convnext, resnet50, efficientnet_lite0 presets)")
    inner = getattr(model, "head", None)
    if isinstance(getattr(inner, "pre_logits", None), torch.nn.Linear) or \
            isinstance(getattr(getattr(inner, "pre_logits", None), "fc", None), torch.nn.Linear):
        raise UserError("the classifier head has a hidden layer: its classes are not linear "
                        "directions of the tokens, so plausibility is not defined for it")
    rows = head.weight.detach().double()
    for norm in (getattr(model, "fc_norm", None), getattr(inner, "norm", None)):
        if isinstance(norm, torch.nn.LayerNorm):  # timm's LayerNorm2d is a subclass
            if norm.weight is not None:
                rows = rows * norm.weight.detach().double()
            return rows - rows.mean(-1, keepdim=True), "LayerNorm before the head: centre(gamma * v)"
    return rows, "linear head on pooled tokens: v"


def plausibility(rows: torch.Tensor, atoms: torch.Tensor, std: torch.Tensor) -> float:
    """mean over classes of the best cosine between a class direction and a raw-space atom."""
    raw = atoms.detach().double() * std.double()
    cos = unit_rows(rows.detach().double()) @ unit_rows(raw).T
    return float(cos.max(dim=1).values.mean())


def random_plausibility(rows: torch.Tensor, k: int, std: torch.Tensor, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    return plausibility(rows, torch.randn(k, len(std), generator=g, dtype=torch.float64), std)


def format_plausibility(report: dict) -> str:
    lines = [f"plausibility ({report['model']}, {report['weights']}, {report['classes']} classes; "
             f"head: {report['head']}):",
             f"  {'dictionary':20s} {'concepts':>8s} {'delta':>6s} {'plausibility':>12s}"]
    for r in report["rows"]:
        delta = "" if r["delta"] is None else f"{r['delta']:g}"
        lines.append(f"  {r['sae']:20s} {r['concepts']:8d} {delta:>6s} {r['plausibility']:12.4f}")
    return "\n".join(lines)
