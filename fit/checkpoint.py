"""Fit directories: safetensors + JSON, written atomically; no pickles anywhere. The layout is
written down in docs/fit-format.md (normative).

FITDIR/
  config.json          schema version, store and centroid ids, every setting
  model.safetensors    the SAE's tensors, input_mean / input_std (standardisation) included
  metrics.jsonl        one JSON object per logged step
  checkpoint.json      which checkpoint-<step>/ is the latest (while training, and after)
  checkpoint-<step>/   model, optimizer and trainer tensors + state.json, to resume
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from archsae.cache import is_store, open_store
from archsae.errors import InvalidSetting, UserError
from archsae.files import replaced_atomically, write_json
from archsae.fit.settings import FitSettings, SAESettings

SCHEMA_VERSION = 3
CONFIG_KEYS = ("schema_version", "finished", "store", "centroids", "sae", "fit", "steps", "steps_per_epoch")


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    with replaced_atomically(path) as tmp:
        _save(tensors, tmp, metadata)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An optimizer state as flat tensors plus JSON (param groups, which entries exist)."""
    state = optimizer.state_dict()
    tensors, layout = {}, {}
    for idx, entry in state["state"].items():
        layout[str(idx)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
                layout[str(idx)][key] = "tensor"
            else:
                layout[str(idx)][key] = value
    groups = [{k: float(v) if torch.is_tensor(v) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "layout": layout}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state = {}
    for idx, entry in meta["layout"].items():
        state[int(idx)] = {k: tensors[f"{idx}.{k}"] if v == "tensor" else v for k, v in entry.items()}
    # how this process steps (a GPU's rates are tensors there, read by CUDA graphs) stays its own
    live = [{k: g[k] for k in ("lr", "fused", "capturable")} for g in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group, own in zip(optimizer.param_groups, live):
        group.update(own)


def save_checkpoint(fitdir: Path, step: int, model, optimizer, trainer_tensors: dict,
                    state: dict) -> None:
    """Write checkpoint-<step>/ whole, then point checkpoint.json at it, then drop older ones."""
    name = f"checkpoint-{step:09d}"
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    with replaced_atomically(fitdir / name, folder=True) as tmp:
        _save(model.state_dict(), tmp / "model.safetensors")
        _save(opt_tensors, tmp / "optimizer.safetensors")
        _save(trainer_tensors, tmp / "trainer.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}))
    write_json(fitdir / "checkpoint.json", {"latest": name, "step": step})
    for old in fitdir.glob("checkpoint-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(fitdir: Path):
    """(model tensors, optimizer tensors, trainer tensors, state) of the latest checkpoint."""
    pointer = fitdir / "checkpoint.json"
    if not pointer.exists():
        return None
    try:
        ckpt = fitdir / json.loads(pointer.read_text())["latest"]
        return (load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "optimizer.safetensors")),
                load_file(str(ckpt / "trainer.safetensors")), json.loads((ckpt / "state.json").read_text()))
    except Exception as exc:
        raise UserError(f"the last checkpoint of {fitdir} is damaged ({type(exc).__name__}: "
                        f"{str(exc)[:120]}): fit again into a new folder") from None


def read_config(fitdir) -> dict:
    path = Path(fitdir) / "config.json"
    if not path.exists():
        raise UserError(f"{fitdir} is not a fit directory (no config.json): pass a folder made by "
                        "`archsae fit`")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged (not valid JSON: {exc}): fit again into a new folder") from None
    if not isinstance(config, dict) or config.get("schema_version") != SCHEMA_VERSION:
        version = config.get("schema_version") if isinstance(config, dict) else None
        raise UserError(f"{fitdir} has fit schema {version}, this archsae reads {SCHEMA_VERSION}: "
                        "refit or use a matching archsae")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise UserError(f"{path} is damaged (no {', '.join(missing)}): fit again into a new folder")
    try:
        fit_settings(config)  # every setting checked, so later reads can trust them
    except UserError as exc:
        raise UserError(f"{path} is damaged ({exc}): fit again into a new folder") from None
    return config


def fit_settings(config: dict) -> tuple[SAESettings, FitSettings]:
    """The settings a fit directory's config.json records."""
    if not isinstance(config["sae"], dict) or not isinstance(config["fit"], dict):
        raise UserError("a fit's config.json is damaged (sae and fit are not objects): fit again")
    # schema-3 fits written before `pre_bias` was a setting learned it: resume them as they were
    return SAESettings.from_dict({"pre_bias": True, **config["sae"]}), FitSettings.from_dict(config["fit"])


def check_store(fitdir, config: dict, store) -> None:
    """Refuse a store that is not the one the fit recorded."""
    if store.id != config["store"]["id"]:
        raise UserError(f"{fitdir} was trained on another store ({config['store']['model']}, "
                        f"d={config['store']['d']}, id {config['store']['id']}), not {store.path} "
                        f"({store.attrs.get('model')}, d={store.d}, id {store.id}): pass the store "
                        "it was made from")


def open_fit_store(fitdir, store=None):
    """(the store a fit was trained on, or `store` checked to be that one; the fit's config)."""
    config = read_config(fitdir)
    if store is None and not is_store(config["store"]["path"]):
        raise InvalidSetting("store", f"the store {fitdir} was trained on is no longer at "
                                      f"{config['store']['path']}: pass {{name}} with where it is now")
    opened = open_store(store or config["store"]["path"])
    check_store(fitdir, config, opened)
    return opened, config


def load(fitdir, device: str | torch.device = "cpu"):
    """The trained SAE of a fit directory, in eval mode (archetypal dictionaries fused)."""
    from archsae.fit.sae import SparseAutoencoder

    config = read_config(fitdir)
    if not config.get("finished"):
        raise UserError(f"{fitdir} has not finished training: resume the fit to finish it")
    settings, _ = fit_settings(config)
    if settings.dictionary == "free":  # the trained atoms replace any initial ones
        settings.decoder_init = "random"
    path = Path(fitdir) / "model.safetensors"
    try:
        tensors = load_file(str(path))
        model = SparseAutoencoder(settings, tensors.get("dictionary.points"))
        model.load_state_dict(tensors)
    except Exception as exc:  # truncated, not safetensors, or tensors of other names or shapes
        raise UserError(f"{path} does not hold this fit's model ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160]}): fit again into a new folder") from None
    return model.to(device).eval()


def export(fitdir, out) -> Path:
    """Plain tensors any framework can use: x_std = (x - input_mean) / input_std;
    z = rule(x_std - pre_bias) @ encoder_weight.T + encoder_bias); x_hat_std = z @ decoder + pre_bias."""
    config = read_config(fitdir)
    model = load(fitdir)
    settings, _ = fit_settings(config)
    tensors = {
        "encoder_weight": model.enc.weight, "encoder_bias": model.enc.bias,
        "pre_bias": model.pre_bias, "decoder": model.dictionary.weight(),
        "input_mean": model.input_mean, "input_std": model.input_std,
    }
    if hasattr(model.encoder, "threshold"):
        tensors["threshold"] = model.encoder.threshold.reshape(1)
    if hasattr(model.encoder, "log_threshold"):
        tensors["threshold"] = model.encoder.log_threshold.exp()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(out, tensors, {"encoder": settings.encoder, "top_k": settings.top_k,
                                 "sae": settings.name, "store": config["store"]})
    return out
