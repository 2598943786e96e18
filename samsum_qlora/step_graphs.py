"""A training step's forward and backward captured as a CUDA graph, one per batch shape, and replayed.

At the default 4,096-token batch a step is bound by the CPU: Python issues ~1,600 kernels (peft's
and PyTorch's code around each small LoRA matmul) while the GPU computes for a third of the time.
A replayed graph issues them in one launch. Bucketed batches (`train.bucket_shapes`) have few
shapes: the first batch of a shape runs eagerly on the capture stream (kernels compile, and it
trains as any step does), then the step is captured, and every later batch of that shape replays.
Everything around forward and backward (clipping, the optimizer, the scheduler, logging,
checkpoints) stays the Trainer's: the graph leaves its gradients where a backward would.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Static:
    """One shape's inputs at fixed addresses: a graph reads them where they were at capture."""

    input_ids: torch.Tensor
    at: torch.Tensor
    ids: torch.Tensor
    denominator: torch.Tensor

    @classmethod
    def like(cls, input_ids, at, ids) -> Static:
        return cls(
            torch.empty_like(input_ids),
            torch.empty_like(at),
            torch.empty_like(ids),
            torch.empty((), dtype=torch.float32, device=input_ids.device),
        )

    def fill(self, input_ids, at, ids, denominator) -> None:
        self.input_ids.copy_(input_ids, non_blocking=True)
        self.at.copy_(at, non_blocking=True)
        self.ids.copy_(ids, non_blocking=True)
        if isinstance(denominator, torch.Tensor):
            self.denominator.copy_(denominator, non_blocking=True)
        else:
            self.denominator.fill_(denominator)


LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class GraphedSteps:
    """Forward and backward of training micro-batches, through CUDA graphs keyed by shape.

    `loss_fn(model, input_ids, at, ids, denominator)` is the step's loss (no randomness, no reads
    of values on the CPU). `step` returns the micro-batch's loss with its gradients added to the
    trainable parameters' `.grad` (set, when the optimizer has just cleared them), or None when
    graphs are off and the caller runs the step itself. A capture that fails turns graphs off for
    the rest of the run, with one line saying so."""

    def __init__(self, loss_fn: LossFn):
        self.loss_fn = loss_fn
        self.on = True
        self.statics: dict[tuple, Static] = {}
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.params: list[torch.nn.Parameter] = []
        self.grads: list[torch.Tensor] = []  # what every graph writes its gradients into
        self.sums: list[torch.Tensor] = []  # handed to the optimizer as .grad: the micro-batches' sum
        self.pool = None  # one memory pool for all graphs: they never run at the same time
        self.stream: torch.cuda.Stream | None = None
        self.replays = 0

    def step(self, model, input_ids, at, ids, denominator) -> torch.Tensor | None:
        if not self.on:
            return None
        if not self.params:
            self._setup(model)
        key = (tuple(input_ids.shape), at.numel())
        static = self.statics.get(key)
        if static is None:
            static = self.statics[key] = Static.like(input_ids, at, ids)
        static.fill(input_ids, at, ids, denominator)
        try:
            if key in self.graphs:
                graph, loss = self.graphs[key]
                graph.replay()
                self.replays += 1
            else:
                loss = self._eager(model, static)
                self._capture(model, key, static)
        except RuntimeError as e:
            if "graph" not in str(e).lower() and "captur" not in str(e).lower():
                raise
            self.on = False
            print(
                f"note: CUDA graph capture failed ({str(e).splitlines()[0][:160]}); training without", file=sys.stderr
            )
            return None
        self._hand_over()
        return loss.clone()

    def _setup(self, model) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.sums = [torch.zeros_like(p) for p in self.params]
        if self.params and self.params[0].is_cuda:
            self.stream = torch.cuda.Stream()

    def _forward_backward(self, model, static: Static) -> torch.Tensor:
        loss = self.loss_fn(model, static.input_ids, static.at, static.ids, static.denominator)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None]
        torch._foreach_copy_([self.grads[i] for i in used], [grads[i] for i in used])
        return loss.detach()

    def _eager(self, model, static: Static) -> torch.Tensor:
        """The shape's first batch, run as captures run (on the side stream: what it sets up lazily,
        such as cuBLAS workspaces, is then there for the capture)."""
        if self.stream is None:  # a CPU: no streams, no graphs (what tests run)
            return self._forward_backward(model, static)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            loss = self._forward_backward(model, static)
        torch.cuda.current_stream().wait_stream(self.stream)
        return loss

    def _capture(self, model, key: tuple, static: Static) -> None:
        """Records the step for later batches of this shape; a capture computes nothing, so the
        gradients of the batch that just ran eagerly stay as they are."""
        graph = torch.cuda.CUDAGraph()
        # thread-local: a CUDA call by another thread (a data loader's) does not break the capture
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            loss = self._forward_backward(model, static)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = (graph, loss)

    def _hand_over(self) -> None:
        """The gradients where backward would have left them: set if the optimizer cleared them
        (set_to_none), else added."""
        cleared = [p.grad is None for p in self.params]
        if all(cleared):
            torch._foreach_copy_(self.sums, self.grads)
            for p, s in zip(self.params, self.sums):
                p.grad = s
            return
        for p, s, gone in zip(self.params, self.sums, cleared):
            if gone:
                p.grad = s.zero_()
        torch._foreach_add_([p.grad for p in self.params], self.grads)
