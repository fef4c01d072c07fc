"""Which process of a multi-process run this is: `--rank/--world` given by hand, or torchrun's
environment (a process group: gloo on CPU, nccl on CUDA), or a single process."""

import os
from dataclasses import dataclass

import torch

from archsae.errors import InvalidSetting


@dataclass
class Ranks:
    rank: int
    world: int
    distributed: bool  # launched by torchrun: a process group exists

    @property
    def main(self) -> bool:
        """The process that writes what is written once (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group: a process that exits without it can abort on its peer's exit."""
        if self.distributed:
            torch.distributed.destroy_process_group()

    def device(self, device: torch.device) -> torch.device:
        """Under torchrun each process takes the GPU of its local rank."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device


def resolve_ranks(rank: int | None = None, world: int | None = None) -> Ranks:
    """--rank/--world as given, else torchrun's environment (gloo on CPU, nccl on CUDA)."""
    if rank is not None or world is not None:
        rank, world = (0 if rank is None else rank), (1 if world is None else world)
        if world < 1:
            raise InvalidSetting("world", f"{{name}} {world} must be at least 1 process")
        if not 0 <= rank < world:
            raise InvalidSetting("rank", f"{{name}} {rank} is not in 0..{world - 1}: give 0 <= rank < world")
        return Ranks(rank, world, False)
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend)
        return Ranks(torch.distributed.get_rank(), env_world, True)
    return Ranks(0, 1, False)
