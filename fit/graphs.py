"""CUDA graphs of the training step. On a GPU the host's launches bound a step: at the paper's
size the host took 4.4 ms to launch an RA-SAE step whose kernels ran for 3.6 ms (H200, session
24's profile), so the device sat idle for part of every step. A captured step is replayed with
one launch.

A graph replays the kernels on the addresses it captured: every tensor a step updates must be
updated in place, and a step that changes the work's structure or asks the device a question
runs as Python (`TrainingStep` says which). A graph is captured the second time its key is
seen (the first run is the warm-up: lazily made state, Adam's moments, cuBLAS's workspace),
and again whenever a tensor it reads was replaced (`StepGraphs.run`'s `reads`).
"""

from typing import Callable

import torch

from archsae.errors import UserError


class StepGraphs:
    """Captured steps by key, each with its static input and outputs, and the tensor it reads
    that a Python step may replace (the dead codes AuxK works on; None for the others). A graph
    whose tensor was replaced is captured anew."""

    def __init__(self, device: torch.device):
        self.device = device
        self.graphs: dict = {}  # key -> (graph, static input, outputs, the replaceable tensor read)
        self.seen: set = set()
        self.stream = torch.cuda.Stream(device)

    def run(self, key, reads: torch.Tensor | None, step: Callable[[torch.Tensor], dict],
            x: torch.Tensor) -> dict:
        """step(x), from its graph when one is captured; its outputs are overwritten by the next
        replay."""
        with torch.cuda.device(self.device):
            entry = self.graphs.get(key)
            if entry is not None and entry[3] is reads:
                graph, static, out, _ = entry
                static.copy_(x)
                graph.replay()
                return out
            self.graphs.pop(key, None)  # its memory goes back before the next capture
            return self._capture(key, reads, step, x)

    def _capture(self, key, reads, step, x):
        self.stream.wait_stream(torch.cuda.current_stream())
        if key not in self.seen:  # warm-up, on the stream the capture will use
            self.seen.add(key)
            with torch.cuda.stream(self.stream):
                out = step(x)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        static = x.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # not `torch.cuda.graph`, which empties the device's and the pinned host memory's caches
        # first (page-locked memory then goes back to cudaHostAlloc); thread_local: the
        # loader's thread copies windows to the device while this one captures
        try:
            with torch.cuda.stream(self.stream):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    out = step(static)
                finally:
                    graph.capture_end()
        except Exception as exc:  # the step's own state is half-updated: no going on from here
            raise UserError(f"capturing the training step as a CUDA graph failed ({type(exc).__name__}: "
                            f"{str(exc)[:200]}): resume with --no-cuda-graphs (the last checkpoint is "
                            "intact)") from exc
        self.graphs[key] = (graph, static, out, reads)
        graph.replay()
        return out
