"""Which device a stage computes on: the one asked for, else CUDA when present, else the CPU."""

import torch

from archsae.errors import UserError


def resolve_device(name: str | None = None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"device {name!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this machine has no usable CUDA GPU: "
                        "use cpu") from None
    return device
