"""BatchNorm folded into the convolution before it, for a frozen backbone.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it can live in the
convolution's weight and bias: the same function with one pass over each feature map fewer
(EfficientNet-Lite0 on 2 CPU cores: about 1.5x the images/s). The pairs are read from the
model's traced graph, never guessed from module names or order, and only a convolution whose
output goes to its BatchNorm alone is folded. Tokens change by float rounding only (about 1e-6
of their scale).
"""

from collections import Counter

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from timm.layers import BatchNormAct2d, Conv2dSame

# exact types only: a subclass may do more than an affine map (StdConv2d standardises its weight)
_CONVS = (nn.Conv2d, Conv2dSame)  # Conv2dSame: TF's "same" padding, computed from the input
_NORMS = (nn.BatchNorm2d, BatchNormAct2d)  # BatchNormAct2d (EfficientNet, ...): its activation stays


class _ConvBNTracer(fx.Tracer):
    """Keeps convolutions and batch norms as single nodes, so their pairs can be read."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in _CONVS + _NORMS or super().is_leaf_module(m, qualname)


def _after_norm(bn: nn.Module) -> nn.Module:
    """What is left of a BatchNorm once its affine map lives in the convolution."""
    return nn.Sequential(bn.drop, bn.act) if type(bn) is BatchNormAct2d else nn.Identity()


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) module names where the BatchNorm is the only reader of the
    convolution's output and each is called once; [] when the model cannot be traced. Models
    without a BatchNorm (ViTs) are not traced at all: tracing runs their forward."""
    if not any(type(m) in _NORMS for m in model.modules()):
        return []
    try:
        graph = _ConvBNTracer().trace(model)
    except Exception:  # data-dependent control flow and the like: nothing is folded
        return []
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in _NORMS:
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, fx.Node) and src.op == "call_module"
                and type(modules[src.target]) in _CONVS and len(src.users) == 1
                and calls[src.target] == 1 and calls[node.target] == 1
                and modules[node.target].running_mean is not None):
            pairs.append((src.target, node.target))
    return pairs


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every foldable BatchNorm of an eval-mode `model` into its convolution, in place;
    returns how many were folded."""
    if model.training:
        raise ValueError("BatchNorm is folded for inference only: call model.eval() first")
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        _replace(model, conv_name, fuse_conv_bn_eval(conv, bn))
        _replace(model, bn_name, _after_norm(bn))
    return len(pairs)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
