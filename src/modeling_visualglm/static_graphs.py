"""A call replayed from a CUDA graph over static input buffers: what the decode step (decode_graphs.py) and the
prefill (prefill_graphs.py) share."""

from __future__ import annotations

from typing import Callable

import torch


class StaticGraph:
    """The static input buffers, the captured graph and its output, for one input signature at a time. On the CPU
    (no graph) the same buffers feed an eager run: the tests run the buffer machinery there."""

    def __init__(self):
        self.signature = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.output = None
        self.graph = None
        self.captures = 0  # how often a call was captured (tests and benchmarks read it)

    def replay(self, tensors: dict, signature, capture: Callable[[], None], run: Callable[[], object]):
        """Copy ``tensors`` into the buffers and replay the graph; a new ``signature`` first makes new buffers (and
        frees the old graph) and calls ``capture()``. Without a graph (the CPU), ``run()`` on the buffers."""
        if signature != self.signature:
            self.signature = None  # a capture that fails leaves no stale signature
            self.graph = self.output = None
            self.inputs = {k: v.clone() for k, v in tensors.items()}
            self.captures += 1
            capture()
            self.signature = signature
        for name, value in tensors.items():
            self.inputs[name].copy_(value, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            return self.output
        return run()

    def record(self, run: Callable[[], object], warmups: int, undo: Callable[[], None] = lambda: None) -> None:
        """Warm ``run`` up ``warmups`` times on a side stream (cuBLAS workspaces, autotuning, lazy kernels; ``undo``
        after each takes back its effects on the cache), then capture it: the capture only records, nothing runs."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                run()
                undo()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.output = run()
        self.graph = graph
