"""CUDA graphs of the training step. On a GPU the host's launches bound a step: at the paper's
size the host took 4.4 ms to launch an RA-SAE step whose kernels ran for 3.6 ms (H200, session
24's profile), so the device sat idle for part of every step. A captured step is replayed with
one launch.

A graph replays the kernels on the addresses it captured: every tensor a step updates must be
updated in place, and a step that changes the work's structure or asks the device a question
runs as Python (`TrainingStep` says which). A graph is captured the second time its key is
seen (the first run is the warm-up: lazily made state, Adam's moments, cuBLAS's workspace),
and again whenever a tensor it reads was replaced (`StepGraphs.run`'s generation).
"""

from typing import Callable

import torch


class StepGraphs:
    """Captured steps by key, each with its static input and outputs. `generation`: the tensors
    the captured steps read that a Python step may replace (the dead codes AuxK works on); when
    one is replaced, every graph is dropped."""

    def __init__(self, device: torch.device):
        self.device = device
        self.graphs: dict = {}  # key -> (graph, static input, outputs)
        self.seen: set = set()
        self.generation: tuple = ()
        self.stream = torch.cuda.Stream(device)

    def run(self, key, generation: tuple, step: Callable[[torch.Tensor], dict], x: torch.Tensor) -> dict:
        """step(x), from its graph when one is captured; its outputs are overwritten by the next
        replay."""
        if len(generation) != len(self.generation) or any(a is not b for a, b in zip(generation, self.generation)):
            self.graphs.clear()
            self.generation = generation
        with torch.cuda.device(self.device):
            return self._run(key, step, x)

    def _run(self, key, step, x):
        if key in self.graphs:
            graph, static, out = self.graphs[key]
            static.copy_(x)
            graph.replay()
            return out
        self.stream.wait_stream(torch.cuda.current_stream())
        if key not in self.seen:  # warm-up, on the stream the capture will use
            self.seen.add(key)
            with torch.cuda.stream(self.stream):
                out = step(x)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        static = x.clone()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's thread may pin memory while this one captures
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            out = step(static)
        self.graphs[key] = (graph, static, out)
        graph.replay()
        return out
