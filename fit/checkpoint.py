"""Fit directories: safetensors + JSON, written atomically; no pickles anywhere.

FITDIR/
  config.json          schema version, store and centroid ids, every setting
  model.safetensors    the SAE's tensors + input_mean / input_std (standardisation)
  metrics.jsonl        one JSON object per logged step
  checkpoint.json      which checkpoint-<step>/ is the latest (while training, and after)
  checkpoint-<step>/   model, optimizer and trainer tensors + state.json, to resume
"""

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from archsae.errors import UserError

SCHEMA_VERSION = 1


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    _save(tensors, tmp, metadata)
    os.replace(tmp, path)


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
    return tensors, {"param_groups": state["param_groups"], "layout": layout}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state = {}
    for idx, entry in meta["layout"].items():
        state[int(idx)] = {k: tensors[f"{idx}.{k}"] if v == "tensor" else v for k, v in entry.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(fitdir: Path, step: int, model, optimizer, trainer_tensors: dict,
                    state: dict) -> None:
    """Write checkpoint-<step>/ whole, then point checkpoint.json at it, then drop older ones."""
    name = f"checkpoint-{step:09d}"
    tmp = fitdir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    _save(model.state_dict(), tmp / "model.safetensors")
    _save(opt_tensors, tmp / "optimizer.safetensors")
    _save(trainer_tensors, tmp / "trainer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}))
    shutil.rmtree(fitdir / name, ignore_errors=True)
    os.replace(tmp, fitdir / name)
    write_json(fitdir / "checkpoint.json", {"latest": name, "step": step})
    for old in fitdir.glob("checkpoint-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(fitdir: Path):
    """(model tensors, optimizer tensors, trainer tensors, state) of the latest checkpoint."""
    pointer = fitdir / "checkpoint.json"
    if not pointer.exists():
        return None
    ckpt = fitdir / json.loads(pointer.read_text())["latest"]
    return (load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "optimizer.safetensors")),
            load_file(str(ckpt / "trainer.safetensors")), json.loads((ckpt / "state.json").read_text()))


def read_config(fitdir) -> dict:
    path = Path(fitdir) / "config.json"
    if not path.exists():
        raise UserError(f"{fitdir} is not a fit directory (no config.json): pass a folder made by "
                        "`archsae fit`")
    config = json.loads(path.read_text())
    if config.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{fitdir} has fit schema {config.get('schema_version')}, this archsae "
                        f"reads {SCHEMA_VERSION}: refit or use a matching archsae")
    return config


def load(fitdir, device: str | torch.device = "cpu"):
    """The trained SAE of a fit directory, in eval mode (archetypal dictionaries fused)."""
    from archsae.fit.sae import SAESettings, SparseAutoencoder

    config = read_config(fitdir)
    if not config.get("finished"):
        raise UserError(f"{fitdir} has not finished training: rerun `archsae fit ... --resume`")
    tensors = load_file(str(Path(fitdir) / "model.safetensors"))
    settings = SAESettings.from_dict(config["sae"])
    if settings.dictionary == "free":  # the trained atoms replace any initial ones
        settings.decoder_init = "random"
    model = SparseAutoencoder(settings, tensors.get("dictionary.points"))
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("input_")})
    model.input_mean, model.input_std = tensors["input_mean"], tensors["input_std"]
    return model.to(device).eval()


def export(fitdir, out) -> Path:
    """Plain tensors any framework can use: x_std = (x - input_mean) / input_std;
    z = rule(x_std - pre_bias) @ encoder_weight.T + encoder_bias); x_hat_std = z @ decoder + pre_bias."""
    config = read_config(fitdir)
    model = load(fitdir)
    tensors = {
        "encoder_weight": model.enc.weight, "encoder_bias": model.enc.bias,
        "pre_bias": model.pre_bias, "decoder": model.dictionary.weight(),
        "input_mean": model.input_mean, "input_std": model.input_std,
    }
    if hasattr(model.encoder, "threshold"):
        tensors["threshold"] = model.encoder.threshold.reshape(1)
    if hasattr(model.encoder, "log_threshold"):
        tensors["threshold"] = model.encoder.log_threshold.exp()
    sae = config["sae"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(out, tensors, {"encoder": sae["encoder"], "top_k": sae["top_k"],
                                 "sae": sae["sae"], "store": config["store"]})
    return out
