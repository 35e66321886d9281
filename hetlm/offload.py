"""AdamW with its fp32 master weights and moments in CPU RAM, stepped by a CPU thread while backward runs.

The accelerator keeps the weights it computes with and their gradients; the optimizer state, three times the
weights' size, lives in RAM. On the last micro-batch of a step, each parameter's gradient is copied to a
(pinned, on CUDA) CPU buffer the moment backward has produced it, and once every gradient of a unit (the
embedding, a block, the head) has arrived a CPU thread steps that unit, while backward goes on for the earlier
blocks. The updated weights are copied back before the next forward.

Exact, not ZeRO-Offload's one-step-stale update: clipping needs the global gradient norm before any update, so
the thread steps *speculatively*, as if no clipping were needed, keeping a copy of what it changed. When
backward ends the norm is known: if it is within ``train.grad_clip`` (the plain path's scale is then exactly
1.0) the speculative steps stand; if it clips, or a gradient or the loss is not finite, every unit is put back
and the step is made again with the clipped gradients (or skipped). The result is bitwise the plain path's in
fp32 where the ops are the same (a test holds the two together), because AdamW is elementwise and the norm is
taken by the same torch functions in the same parameter order. Speculation pays when clipping is rare; a step
that clips costs a second CPU step after backward.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

from hetlm.config import TrainConfig


def units(model: torch.nn.Module) -> Iterator[list[torch.nn.Parameter]]:
    """The model's parameters in the groups backward completes together: the head, each block (last first), the rest."""
    seen: set[int] = set()

    def fresh(params: Any) -> list[torch.nn.Parameter]:
        out = [p for p in params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in out)
        return out

    yield fresh([*model.lm_head.parameters(), *model.model.norm.parameters()])
    for block in reversed(model.model.layers):
        yield fresh(block.parameters())
    yield fresh(model.parameters())


class OptimizerOffload:
    """Owns the CPU AdamW (``optimizer``: its state_dict is the plain path's format) and the copies to and fro."""

    def __init__(self, model: torch.nn.Module, train: TrainConfig, make_optimizer: Any, speculative: bool = True,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.train = train
        self.speculative = speculative
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        pin = self.device.type == "cuda"
        self.master: dict[torch.nn.Parameter, torch.nn.Parameter] = {}
        self.buffers: dict[torch.nn.Parameter, torch.Tensor] = {}
        for p in self.params:
            self.master[p] = torch.nn.Parameter(p.detach().to("cpu", torch.float32, copy=True))
            self.buffers[p] = torch.zeros(p.shape, dtype=torch.float32, pin_memory=pin)
        # The optimizer sees the master weights under the model's names, so its groups and state are the plain path's.
        named = [(name, self.master[p]) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.optimizer: torch.optim.AdamW = make_optimizer(named, train, torch.device("cpu"))
        # The device computes with weights (and gets gradients) in the plan's dtype; only the masters are fp32.
        with torch.no_grad():
            for p in self.params:
                p.data = p.data.to(compute_dtype)
        self.units = [unit for unit in units(model) if unit]
        self.unit_of = {p: i for i, unit in enumerate(self.units) for p in unit}
        self.pending: list[int] = []
        self.armed = False
        self.undo: list[Any] = []
        self.work: queue.Queue = queue.Queue()
        self.failure: BaseException | None = None
        self.hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
        self.thread = threading.Thread(target=self._serve, name="hetlm-optimizer-offload", daemon=True)
        self.thread.start()

    # -- the main thread

    def arm(self, lr: float) -> None:
        """The next backward is a step's last: copy its gradients out and step units as they complete."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.pending = [len(unit) for unit in self.units]
        self.undo = []
        self.armed = True

    def finish(self, loss: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """After the last backward: settle the step exactly; returns (gradient norm, whether the step was bad)."""
        self.armed = False
        self.work.join()
        if self.failure is not None:
            raise self.failure
        grads = [self.buffers[p] for p in self.params]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        bad = ~(torch.isfinite(loss.cpu()) & torch.isfinite(norm))
        scale = max_norm / (norm + 1e-6)
        if bool(bad) or not self.speculative or float(torch.clamp(scale, max=1.0)) != 1.0:
            self._put_back()
            if not bool(bad):
                masters = [self.master[p] for p in self.params]
                self._attach(self.params)
                torch.nn.utils.clip_grads_with_norm_(masters, max_norm, norm, foreach=True)
                self.optimizer.step()
        with torch.no_grad():
            for p in self.params:
                p.copy_(self.master[p], non_blocking=True)
        return norm, bad

    def weights(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights under the model's names: what a checkpoint stores."""
        return {name: self.master[p].detach() for name, p in zip(self.names, self.params, strict=True)}

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.work.put(None)
        self.thread.join(timeout=60)

    # -- backward's hooks and the CPU thread

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if not self.armed:
            return
        self.buffers[p].copy_(p.grad, non_blocking=True)
        unit = self.unit_of[p]
        self.pending[unit] -= 1
        if self.pending[unit] == 0:
            event = None
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            self.work.put((unit, event))

    def _serve(self) -> None:
        while True:
            item = self.work.get()
            try:
                if item is None:
                    return
                unit, event = item
                if event is not None:
                    event.synchronize()
                if self.speculative and self.failure is None:
                    self._step(self.units[unit])
            except BaseException as exc:  # reported to the main thread by finish()
                self.failure = exc
            finally:
                self.work.task_done()

    def _step(self, unit: list[torch.nn.Parameter]) -> None:
        saved = []
        for p in unit:
            master = self.master[p]
            state = self.optimizer.state.get(master)
            saved.append((master, master.detach().clone(), {k: v.clone() for k, v in state.items()} if state else None))
        self.undo.append(saved)
        self._attach(unit)
        self.optimizer.step()

    def _attach(self, params: list[torch.nn.Parameter]) -> None:
        """Give the optimizer the gradients of ``params`` only: it steps exactly the parameters that have one."""
        chosen = {id(p) for p in params}
        for p in self.params:
            self.master[p].grad = self.buffers[p] if id(p) in chosen else None

    def _put_back(self) -> None:
        with torch.no_grad():
            for saved in reversed(self.undo):
                for master, weights, state in saved:
                    master.copy_(weights)
                    if state is None:
                        self.optimizer.state.pop(master, None)
                    else:
                        for key, value in state.items():
                            self.optimizer.state[master][key].copy_(value)
        self.undo = []
