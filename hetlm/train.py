"""``hetlm train``: the training loop, its checkpoints, and resuming them bit for bit.

Everything a step depends on is either in the weights or in ``trainer.pt``: optimizer moments and a
``TrainState`` (the step counter, the schedule length fitted to train.max_time and the segments of a
re-planned schedule, of which with the config the learning rate is a pure function; the gradient scaler;
the Python, numpy, torch and CUDA RNG states (dropout) and the data generator of every rank). Checkpoints
are taken only between optimizer steps, so no gradient-accumulation state is ever half done, and
evaluation draws no random numbers. A run killed at any moment and resumed from its newest complete
checkpoint therefore replays exactly the steps it lost.

The step avoids host synchronisation: losses and bad-step counters accumulate on the device and
are read once per log interval; a non-finite loss or gradient skips the update inside the fused
AdamW kernel through its ``found_inf`` input rather than through a Python branch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from hetlm.build import InitSource, build_run, check_compatible, config_changes, default_run_dir, resolve_config
from hetlm.config import Config, TrainConfig, parse_duration
from hetlm.data import (
    MaskedBatch,
    PrefetchLoader,
    fixed_starts,
    gather_target_masks,
    gather_windows,
    split_inputs_targets,
    split_masked,
)
from hetlm.errors import HetlmError, UsageError
from hetlm.evaluate import count_bytes, token_byte_lengths
from hetlm.io import disk_full_errors
from hetlm.metrics import MetricsLog, eval_record, finite, plot_losses
from hetlm.model import flops_per_token, next_token_loss
from hetlm.offload import OptimizerOffload
from hetlm.parallel import full_optimizer_state, full_weights, global_norm, load_sharded_optimizer_state, replicate, shard
from hetlm.planner import Plan, RankProfile, agreed_profiles, lay_out_ranks, share_weights, step_sequences
from hetlm.reporting import NullReporter, Reporter
from hetlm.store import Checkpoint, DataFolder, RunDir, resolve
from hetlm.tokenizer import Tokenizer

# trainer.pt's layout: TrainState.state_dict() plus "optimizer"; format 1 is read as is.
STATE_FORMAT = 1
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


# Fitting the schedule to train.max_time: skip the first steps (compilation), then time at least
# FIT_MIN_STEPS steps over max(FIT_MIN_SECONDS, FIT_FRACTION of the budget) while the rate is still near its peak.
FIT_SKIP, FIT_MIN_STEPS, FIT_MIN_SECONDS, FIT_FRACTION = 5, 5, 1.0, 0.1
# train.rank_shares=measure: untimed forward/backward passes (allocator and kernel warm-up), then timed ones.
MEASURE_WARMUP, MEASURE_STEPS = 1, 3


# --- pure pieces -----------------------------------------------------------------------------------


def learning_rate_at(step: int, train: TrainConfig, fitted_steps: int = 0,
                     segments: tuple[Segment, ...] | list[Segment] = ()) -> float:
    """Learning rate of the update made at 0-based ``step``: linear warmup, then cosine decay to min_lr.

    The decay ends at train.decay_steps, else at ``fitted_steps`` (the steps a train.max_time budget
    was measured to allow; see ``fit_decay_steps``), else at train.max_steps. From the start of a
    re-planned ``segment`` on (a continued run, see ``replan``), that segment's own schedule applies.
    """
    active = [segment for segment in segments if segment.start <= step]
    if active:
        return active[-1].rate(step, train.max_steps)
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    decay_end = train.decay_steps or fitted_steps or train.max_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, decay_end - train.warmup_steps))
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (train.learning_rate - train.min_lr)


# A continued run whose rate is within this share of the (peak - min_lr) range above min_lr restarts with a warmup.
RESTART_BELOW = 0.1


@dataclass(frozen=True)
class Segment:
    """The schedule of a continued run from step ``start`` on: warmup from ``from_lr`` to ``peak``, then cosine to min_lr.

    ``end`` is where the decay reaches ``min_lr``; 0 while a train.max_time budget is still being timed (the decay
    is then provisionally aimed at train.max_steps). ``learning_rate`` is the train.learning_rate it was planned for.
    """

    start: int
    end: int
    from_lr: float
    peak: float
    min_lr: float
    warmup: int
    learning_rate: float

    def rate(self, step: int, max_steps: int) -> float:
        done = step - self.start
        if done < self.warmup:
            return self.from_lr + (self.peak - self.from_lr) * (done + 1) / self.warmup
        end = self.end or max_steps
        progress = min(1.0, (done - self.warmup) / max(1, end - self.start - self.warmup))
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.peak - self.min_lr)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Segment:
        return cls(int(values["start"]), int(values["end"]), float(values["from_lr"]), float(values["peak"]),
                   float(values["min_lr"]), int(values["warmup"]), float(values["learning_rate"]))

    def describe(self) -> str:
        end = f"step {self.end}" if self.end else "the step train.max_time will stop at (timed over the next steps)"
        if self.warmup:
            return (f"the learning rate restarts: {self.warmup}-step warmup from {self.from_lr:.2e} to {self.peak:.2e}, "
                    f"then cosine decay to {self.min_lr:.2e} by {end}")
        return f"the learning rate decays from its current {self.from_lr:.2e} to {self.min_lr:.2e} by {end}"


def replan(step: int, previous: TrainConfig, fitted_steps: int, segments: list[Segment], train: TrainConfig,
           fit: bool) -> Segment | None:
    """The schedule segment a run continued at ``step`` with ``train`` needs, or None when its schedule stands.

    ``previous`` is the configuration the run's schedule so far was made for. The schedule is re-planned when
    the decay's end, the peak or the floor changes, and always under a time budget (``fit``: train.max_time
    without train.decay_steps), which belongs to one invocation. The new segment starts at the current rate, so
    the rate never jumps: mid-decay, it decays from there to min_lr by the new end; within RESTART_BELOW of the
    floor (a finished schedule) or during the warmup, it warms up to train.learning_rate first (over the rest of
    the warmup, else over train.warmup_steps but at most a tenth of the new steps).
    """
    if step == 0:
        return None
    current = learning_rate_at(step, previous, fitted_steps, segments)
    if segments:
        last = segments[-1]
        end, peak, floor, warm_until = last.end, last.learning_rate, last.min_lr, last.start + last.warmup
        # A segment's warmup is its own; the base schedule's is read from the config, so changing it re-plans.
        same_warmup = True
    else:
        end = previous.decay_steps or fitted_steps or previous.max_steps
        peak, floor, warm_until = previous.learning_rate, previous.min_lr, previous.warmup_steps
        same_warmup = train.warmup_steps == previous.warmup_steps
    new_end = 0 if fit else (train.decay_steps or train.max_steps)
    if not fit and same_warmup and (new_end, train.learning_rate, train.min_lr) == (end, peak, floor):
        return None
    if step < warm_until:
        warmup = warm_until - step
    elif current - train.min_lr <= RESTART_BELOW * (train.learning_rate - train.min_lr):
        warmup = max(1, min(train.warmup_steps, ((new_end or train.max_steps) - step) // 10))
    else:
        warmup = 0
    peak = train.learning_rate if warmup else current
    return Segment(step, new_end, current, peak, train.min_lr, warmup, train.learning_rate)


def fit_decay_steps(step: int, seconds_per_step: float, seconds_left: float, train: TrainConfig) -> int:
    """Steps a time budget allows: the cosine then ends where the clock will stop the run, not at max_steps."""
    return max(step + 1, min(train.max_steps, step + int(seconds_left / seconds_per_step)))


def make_optimizer(named_parameters: Any, train: TrainConfig, device: torch.device, fused: bool = True) -> torch.optim.AdamW:
    """AdamW without weight decay on norms and embeddings; the fused kernel where torch has one for ``device``
    (unless ``fused`` is off: FSDP2's sharded parameters take the foreach kernel)."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "embed_tokens" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": train.learning_rate, "betas": (train.beta1, train.beta2)}
    if fused:
        with contextlib.suppress(RuntimeError, ValueError):
            return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, windows: torch.Tensor, autocast: Any, batch_size: int,
              masks: torch.Tensor | None = None) -> float:
    """Mean next-token loss over fixed ``windows`` (N, T + 1); draws no random numbers.

    With ``masks`` (N, T), which targets are learned (chat data), the mean is over those targets alone: the
    loss of the replies, which is what training lowers, not of the prompts around them.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=windows.device)
    for start in range(0, len(windows), batch_size):
        rows = slice(start, start + batch_size)
        if masks is not None:
            x, y = split_masked(windows[rows], masks[rows])
            with autocast():
                logits, _ = model(x)
            total += next_token_loss(logits, y, "sum").double()
            continue
        x, y = split_inputs_targets(windows[rows])
        with autocast():
            _, loss = model(x, y)
        total += loss.double() * len(x)
    model.train(was_training)
    return (total / (masks.sum() if masks is not None else len(windows))).item()


class TrainStep:
    """One optimizer step: accumulated micro-batches under autocast, loss scaling, clipping, AdamW.

    A step whose loss or gradient norm is not finite changes no weights and counts as bad. Loss and
    bad-step counters stay on the device until ``read``, so a step never waits for the host.
    ``step_model`` is what runs the forward pass (the model, or its DDP wrapper). ``reduce_scale`` cancels the
    gradient reduction's mean: the world size under DDP, 1 where the reduction sums (FSDP2, one process).

    A step called with ``timed`` measures this process's busy time (``busy_s``): its wall time less what it
    waited for the others, taken at a barrier before its last backward pass, where a process with a smaller
    share would otherwise wait inside the gradient reduction. It costs a device sync and one tiny collective,
    so the trainer times only the steps it logs.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, plan: Plan,
                 train: TrainConfig, accumulation: int = 1, step_model: torch.nn.Module | None = None, ddp: Any = None,
                 world_size: int = 1, offload: OptimizerOffload | None = None, micro_sizes: list[int] | None = None,
                 step_sequences: int | None = None, reduce_scale: int | None = None, control: Any = None) -> None:
        self.model, self.optimizer, self.scaler, self.plan, self.train = model, optimizer, scaler, plan, train
        # This process's micro-batches (sequences each) and the sequences of the whole step across processes.
        self.micro_sizes = micro_sizes or [0] * accumulation
        self.accumulation = len(self.micro_sizes)
        self.step_sequences = step_sequences
        self.offload = offload
        self.step_model = step_model if step_model is not None else model
        self.ddp = ddp
        self.world_size = world_size
        self.reduce_scale = world_size if reduce_scale is None else reduce_scale
        self.control = control
        self.busy_s = 0.0
        self.fused = bool(optimizer.param_groups[0].get("fused"))
        device = next(model.parameters()).device
        self.loss_sum = torch.zeros((), device=device)
        self.good = torch.zeros((), device=device)
        self.bad_new = torch.zeros((), device=device)
        self.bad_run = torch.zeros((), device=device)
        self.bad_worst = torch.zeros((), device=device)

    def __call__(self, lr: float, batches: Any, timed: bool = False) -> None:
        """Make one update at learning rate ``lr`` from ``accumulation`` batches of windows (B, T + 1)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros_like(self.loss_sum)
        waited = 0.0
        if timed:
            _wait(self.loss_sum.device)
            began = time.monotonic()
        for micro in range(self.accumulation):
            batch = next(batches)
            masked = isinstance(batch, MaskedBatch)
            x, y = batch.inputs_targets() if masked else split_inputs_targets(batch)
            last = micro == self.accumulation - 1
            if last and self.offload is not None:
                self.offload.arm(lr)
            # Each micro-batch's mean loss weighs by its share of the step's tokens, so uneven micro-batches and
            # uneven processes give the gradient of one mean over the whole step; DDP's average over processes is
            # cancelled by ``reduce_scale``. Under DDP only each process's last micro-batch synchronises, however
            # many it has.
            # With a loss mask the step's loss is the mean over its learned targets: each micro-batch's sum over
            # its own weighs by 1 / the step's count (which the loader has from all the step's windows), and a step
            # with none has a zero loss and gradient instead of 0/0 (AdamW's momentum still moves the weights).
            share = len(x) / self.step_sequences if self.step_sequences else 1 / self.accumulation
            sync = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()
            with sync:
                with self.plan.autocast():
                    if masked:
                        logits, _ = self.step_model(x)
                        loss = next_token_loss(logits, y, "sum")
                        share = 1 / max(batch.step_targets, 1)
                    else:
                        _, loss = self.step_model(x, y)
                if timed and last and self.world_size > 1:
                    # After the forward pass: DDP's first bucket rebuild and FSDP2's gathers are collectives there,
                    # which every process must reach in the same order as this one.
                    _wait(self.loss_sum.device)
                    arrived = time.monotonic()
                    tdist.all_reduce(torch.zeros(1), group=self.control)
                    waited = time.monotonic() - arrived
                step_loss += loss.detach() * share
                self.scaler.scale(loss * (share * self.reduce_scale)).backward()
        if self.world_size > 1:
            # The global mean loss: every rank then takes the same skip decision and logs the same figure.
            tdist.all_reduce(step_loss)
        if self.offload is not None:
            # The CPU has stepped (or put back and stepped again) and the new weights are on their way.
            bad = self.offload.finish(step_loss, self.train.grad_clip or math.inf)[1].to(step_loss.device)
            self.model.zero_grad(set_to_none=True)
        else:
            bad = self._step_on_device(step_loss)

        badf = bad.float()
        self.loss_sum += torch.where(bad, 0.0, step_loss)
        self.good += 1.0 - badf
        self.bad_new += badf
        self.bad_run.mul_(badf).add_(badf)
        torch.maximum(self.bad_worst, self.bad_run, out=self.bad_worst)
        if timed:
            _wait(self.loss_sum.device)
            self.busy_s = time.monotonic() - began - waited

    def _step_on_device(self, step_loss: torch.Tensor) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)
        norm = global_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip or math.inf,
                                                          foreach=True))
        bad = ~(torch.isfinite(step_loss) & torch.isfinite(norm))
        if self.scaler.is_enabled():
            # The scaler skips steps with non-finite gradients itself (and lowers its scale).
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.fused:
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
        elif not bad.item():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return bad

    def read(self, reset: bool = True) -> tuple[float | None, int, int]:
        """(mean loss of the good steps since the last reset, bad steps since the last read, longest bad run)."""
        loss_sum, good, new, worst = torch.stack([self.loss_sum, self.good, self.bad_new, self.bad_worst]).tolist()
        self.bad_new.zero_()
        if reset:
            self.loss_sum.zero_()
            self.good.zero_()
            self.bad_worst.copy_(self.bad_run)
        return (loss_sum / good if good else None), int(new), int(worst)


# --- RNG state that survives torch.load(weights_only=True) ------------------------------------------


def capture_rng_states(data_generator: torch.Tensor) -> dict[str, Any]:
    """This process's random states as tensors, lists, ints and floats."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "data": data_generator,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: dict[str, Any]) -> torch.Tensor:
    """Restore the global RNGs; returns the data generator state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return state["data"]


# --- processes ---------------------------------------------------------------------------------------


@dataclass
class Processes:
    """This process's place under torchrun (a world of one otherwise)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Host-side group for stop decisions and gathering RNG states (gloo even when gradients go over NCCL).
    control: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def process_layout() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _start_processes(device: torch.device) -> Processes:
    rank, world_size, local_rank = process_layout()
    procs = Processes(rank, world_size, local_rank)
    if procs.distributed and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, rank=rank, world_size=world_size)
        procs.control = tdist.new_group(backend="gloo") if backend != "gloo" else tdist.group.WORLD
    elif procs.distributed:
        procs.control = tdist.group.WORLD
    return procs


# --- state that survives a checkpoint ----------------------------------------------------------------


@dataclass
class TrainState:
    """What a resumed run needs besides the weights and optimizer moments; saved in trainer.pt."""

    step: int = 0
    tokens: int = 0
    # The steps a train.max_time budget was measured to allow (0 until fitted): where the cosine ends.
    fitted_steps: int = 0
    # The schedule's re-plans when a run was continued with another target, oldest first.
    segments: list[Segment] = field(default_factory=list)
    bad_steps: int = 0
    # Time spent in steps, evaluation and checkpoints excluded.
    train_seconds: float = 0.0
    # (val_loss, step) of the best evaluation so far.
    best: tuple[float, int] | None = None
    world_size: int = 1
    accumulation: int = 1
    # Each process's sequences of a step, so a resumed train.rank_shares=measure run keeps its layout.
    shares: list[int] = field(default_factory=list)
    scaler: dict[str, Any] = field(default_factory=dict)
    # Per rank: its Python, numpy, torch and CUDA RNG states and its data generator (the data cursor).
    ranks: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "schedule": {"fitted_steps": self.fitted_steps, "segments": [s.to_dict() for s in self.segments]},
            "bad_steps": self.bad_steps,
            "train_seconds": self.train_seconds,
            "best": list(self.best) if self.best is not None else None,
            "world_size": self.world_size,
            "accumulation": self.accumulation,
            "shares": self.shares,
            "scaler": self.scaler,
            "ranks": self.ranks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.fitted_steps = int(state["schedule"]["fitted_steps"])
        # Format 1 files from before re-planning have no segments.
        self.segments = [Segment.from_dict(s) for s in state["schedule"].get("segments", [])]
        self.bad_steps = int(state["bad_steps"])
        self.train_seconds = float(state["train_seconds"])
        self.best = (float(state["best"][0]), int(state["best"][1])) if state["best"] is not None else None
        self.world_size = int(state["world_size"])
        self.accumulation = int(state["accumulation"])
        # Files from before uneven shares have none.
        self.shares = [int(share) for share in state.get("shares", [])]
        self.scaler = dict(state["scaler"] or {})
        self.ranks = list(state["ranks"])


# --- results ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    rank: int
    world_size: int
    start_step: int
    step: int
    max_steps: int
    tokens: int
    # Wall time of this invocation, and tokens per second of its steps (evaluation and checkpoints excluded).
    elapsed_s: float
    tokens_per_s: float
    # "max_steps", "max_time", "SIGINT", "SIGTERM" or "done" (nothing left to train).
    stopped_by: str
    exit_code: int
    bad_steps: int
    train_loss: float | None = None
    eval: dict[str, Any] | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    checkpoint: Path | None = None
    outputs: dict[str, Path] = field(default_factory=dict)
    # Under torchrun: each process's sequences per step and its busy seconds in the last timed step.
    shares: list[int] | None = None
    rank_step_s: list[float] | None = None


@dataclass
class _LoopEnd:
    stopped_by: str
    checkpoint: Path | None
    last_eval: dict[str, Any] | None
    train_loss: float | None
    step_seconds: float


# --- the loop -------------------------------------------------------------------------------------------


class _StopFlag:
    """SIGINT/SIGTERM ask for a clean stop after the current step; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = name

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()


def train(config: Config, plan: Plan, out: Path | None = None, resume: str = "auto",
          reporter: Reporter = NullReporter(), init: InitSource | None = None) -> TrainResult:
    """Train the model of ``config`` on its data folder into the run folder ``out`` (default runs/<name>).

    ``plan`` is the planner's Plan for this process. ``resume`` is "auto" (continue from the newest
    complete checkpoint of the run, or start from its step-0 build), "never" (start over, removing the
    run's checkpoints) or the path of a checkpoint or run to continue from. Under torchrun each process
    calls this; only rank 0 reports, writes checkpoints and logs, and holds the run's lock. ``init`` starts a
    new run (or, with "never", this one over) from its weights with a fresh optimizer and schedule.
    """
    procs = _start_processes(plan.torch_device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    run_dir = Path(out) if out is not None else default_run_dir(config)
    try:
        if config.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        with contextlib.ExitStack() as held, disk_full_errors(run_dir):
            trainer = Trainer(config, plan, out, resume, reporter if procs.main else NullReporter(), procs, held, init)
            try:
                result = trainer.run()
            finally:
                trainer.close()
        if procs.distributed:
            # Rank 0 may still be writing the last checkpoint. A process that tears its gloo group down and exits
            # meanwhile was seen to abort in gloo's threads at exit ("terminate called without an active exception").
            tdist.barrier(group=procs.control)
        return result
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if procs.distributed and tdist.is_initialized():
            tdist.destroy_process_group()


class Trainer:
    """One process's training run: built whole from the run folder's checkpoint, then ``run``."""

    def __init__(self, config: Config, plan: Plan, out: Path | None, resume: str, reporter: Reporter,
                 procs: Processes, held: contextlib.ExitStack, init: InitSource | None = None) -> None:
        self.plan = plan
        self.init = init
        self.reporter = reporter
        self.procs = procs
        self.device = plan.torch_device
        self.data = DataFolder.open(config.data.dir)
        self.config = resolve_config(config, self.data)
        self.train_cfg = tc = self.config.train
        self.run_dir = RunDir(Path(out) if out is not None else default_run_dir(self.config))
        self.max_time = parse_duration(tc.max_time, "train.max_time") if tc.max_time else None
        T = self.config.model.context_length
        if not plan.fits:
            # Authoritative: nothing is written or removed for a run that would run out of memory.
            reason = next((d.reason for d in plan.decisions if d.stage == "memory"), "")
            raise UsageError(f"the plan does not fit in memory: {reason}")
        if plan.optimizer_offload and procs.distributed:
            raise UsageError("train.optimizer_offload works in a single process for now: set it off under torchrun")
        plan.apply()
        self.micro_batch = plan.micro_batch_size
        # The step's sequences across processes, this process's slice of them, and its micro-batches.
        self.step_sequences = step_sequences(self.config, plan, procs.world_size)
        # Every process learns every other's device once, so all of them compute the same layout.
        self.peers = agreed_profiles(self._gather(RankProfile.of(plan)))
        self.parallel = self.peers[0].parallel
        dtypes = sorted({peer.dtype for peer in self.peers})
        if len(dtypes) > 1 and (self.parallel == "fsdp" or "fp16" in dtypes):
            # FSDP2 gathers one dtype from all, and a scaled fp16 gradient cannot be summed with unscaled ones.
            raise UsageError(f"the processes planned different dtypes ({', '.join(dtypes)}): set device.dtype to one "
                             "every device supports")
        if self.parallel == "fsdp" and plan.grad_scaler:
            raise UsageError("fp16's gradient scaler is not combined with FSDP2 here: set device.dtype=bf16 or fp32")
        if self.parallel == "fsdp" and tc.rank_shares == "measure":
            raise UsageError("train.rank_shares=measure times each process on the whole model, which FSDP2 exists not "
                             "to hold: give the shares as weights (such as 1,3), or auto")
        self._lay_out(share_weights(self.config, self.peers))
        self.tokens_per_step = self.step_sequences * T

        # Before the run is touched: a split too short for training rejects the command with nothing removed.
        self.train_tokens, self.val_windows, self.val_bytes = self._open_data()
        # Rank 0 takes the run's lock into ``held``, whose owner releases it when training is over.
        self.loaded_from, saved = self._prepare_run(resume, held)
        check_compatible(self.loaded_from, self.config, self.data, self.run_dir.path)
        self.model = self.loaded_from.model(self.device).train()
        plan.prepare_model(self.model)
        if tc.rank_shares == "measure" and procs.distributed and not self.loaded_from.has_trainer_state:
            # A resumed run keeps the shares measured when it began (load_state_dict): timing noise must not
            # change the layout, which with dropout would change which random numbers meet which sequences.
            self._lay_out(self._gather(self._measure_speed()), measured=True)
        # Compiled before sharding or wrapping (several processes compile each block in place): dynamo skips the
        # FSDP2 hooks registered after, so each block's graph holds its own math and the gathers stay outside it.
        forward = plan.compile_model(self.model)
        if self.parallel == "fsdp":
            shard(self.model, plan.autocast_dtype)
        compute = plan.autocast_dtype or torch.float32
        self.offload = OptimizerOffload(self.model, tc, make_optimizer, speculative=tc.grad_clip > 0,
                                        compute_dtype=compute) if plan.optimizer_offload else None
        self.optimizer = self.offload.optimizer if self.offload is not None else \
            make_optimizer(self.model.named_parameters(), tc, self.device, fused=self.parallel != "fsdp")
        self.fused = bool(self.optimizer.param_groups[0].get("fused"))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=bool(plan.grad_scaler))
        self.generator = torch.Generator()
        self.state = TrainState(world_size=procs.world_size, accumulation=self.accumulation)
        if self.loaded_from.has_trainer_state:
            self.load_state_dict(self.loaded_from.trainer_state())
        else:
            self._seed()
        self.start_step = self.state.step
        fit = self.max_time is not None and not tc.decay_steps
        self.replanned = replan(self.state.step, self.loaded_from.config().train, self.state.fitted_steps,
                                self.state.segments, tc, fit)
        if self.replanned is not None:
            self.state.segments.append(self.replanned)
        self.changes: list[tuple[str, Any, Any]] = []
        if procs.main:
            # Only now that the command is accepted does the run's config change.
            self.changes = config_changes(saved, self.config) if saved is not None else []
            self.run_dir.save_config(self.config)
            if self.changes:
                self.run_dir.record_changes(self.state.step, self.changes)
        self.ddp = replicate(self.model, self.device) if self.parallel == "ddp" else None
        self.stepper = TrainStep(self.model, self.optimizer, self.scaler, plan, tc, self.accumulation, offload=self.offload,
                                 micro_sizes=self.micro_sizes, step_sequences=self.step_sequences,
                                 step_model=self.ddp if self.ddp is not None else forward, ddp=self.ddp,
                                 world_size=procs.world_size, reduce_scale=procs.world_size if self.ddp else 1,
                                 control=procs.control)
        # Started by ``run``: the loader's thread draws from the generator from then on.
        self.loader: PrefetchLoader | None = None
        self.rank_step_s: list[float] | None = None

    def close(self) -> None:
        if self.offload is not None:
            self.offload.close()

    def _gather(self, mine: Any) -> list[Any]:
        """Every process's ``mine``, in rank order."""
        if not self.procs.distributed:
            return [mine]
        everyone: list[Any] = [None] * self.procs.world_size
        tdist.all_gather_object(everyone, mine, group=self.procs.control)
        return everyone

    def _lay_out(self, weights: list[float] | None, measured: bool = False) -> None:
        """This process's slice of each step and its micro-batches, from every process's weight."""
        layout = lay_out_ranks(self.config, self.peers, weights, self.step_sequences)
        self.shares = [part.sequences for part in layout]
        if measured:
            self.reporter.info("train.rank_shares=measure: " + ", ".join(
                f"rank {r} {w:.3g} sequences/s" for r, w in enumerate(weights)) + " -> shares "
                + "/".join(map(str, self.shares)))
        rank = self.procs.rank
        self.take = (sum(self.shares[:rank]), self.shares[rank])
        self.micro_sizes = list(layout[rank].micro_sizes)
        self.accumulation = len(self.micro_sizes)

    def _measure_speed(self) -> float:
        """Sequences per second of this process's forward and backward at its micro-batch, on random tokens.

        Timed before the run on the bare model, inside a forked RNG, so that nothing it draws reaches training.
        """
        T, vocab = self.config.model.context_length, self.config.model.vocab_size
        micro = self.micro_sizes[0]
        windows = torch.randint(0, vocab, (micro, T + 1), generator=torch.Generator().manual_seed(0)).to(self.device)
        x, y = split_inputs_targets(windows)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for repeat in range(MEASURE_WARMUP + MEASURE_STEPS):
                if repeat == MEASURE_WARMUP:
                    _wait(self.device)
                    began = time.monotonic()
                with self.plan.autocast():
                    _, loss = self.model(x, y)
                loss.backward()
            _wait(self.device)
            seconds = time.monotonic() - began
        self.model.zero_grad(set_to_none=True)
        return MEASURE_STEPS * micro / seconds

    # -- setup

    def _prepare_run(self, resume: str, held: contextlib.ExitStack) -> tuple[Checkpoint, Config | None]:
        """Rank 0 locks and readies the run folder; every rank then returns the checkpoint to start from.

        Also returns the run's saved config (None on other ranks and for a new or restarted run), which the
        changes of this invocation are recorded against.
        """
        run = self.run_dir
        failure: Exception | None = None
        saved: Config | None = None
        if self.procs.main:
            try:
                held.enter_context(run.claim(self.reporter))
                if self.init is not None and resume != "never" and run.checkpoints(verify=False):
                    raise UsageError(f"run {run.path} already has checkpoints, and --init starts a new run: use a new "
                                     "--out, or --resume never to start this one over")
                if resume == "never" and RunDir.is_run(run.path):
                    removed = run.start_over()
                    self.reporter.warning(f"--resume never: starting {run.path} over ({removed} checkpoint(s) removed)")
                else:
                    saved = run.saved_config()
                if resume in ("auto", "never") and not run.checkpoints(verify=False):
                    build_run(self.config, run.path, self.reporter, data=self.data, init=self.init)
            except Exception as exc:
                failure = exc
        self._share_failure(failure)
        if resume in ("auto", "never"):
            found = run.checkpoints(self.reporter)
            if not found:
                raise HetlmError(f"run {run.path} has no complete checkpoint to start from")
            return found[-1], saved
        return Checkpoint.read(resolve(Path(resume), prefer="latest", reporter=self.reporter), verify=False), saved

    def _share_failure(self, failure: Exception | None) -> None:
        """Raise rank 0's ``failure`` on every rank (a barrier otherwise): no rank waits for a run that is not coming."""
        if self.procs.distributed:
            shared = [None if failure is None else (str(failure), getattr(failure, "exit_code", 1))]
            tdist.broadcast_object_list(shared, src=0, group=self.procs.control)
            if shared[0] is not None and failure is None:
                message, code = shared[0]
                failure = (UsageError if code == UsageError.exit_code else HetlmError)(f"rank 0: {message}")
        if failure is not None:
            raise failure

    def _seed(self) -> None:
        seed = self.train_cfg.seed + self.procs.rank
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        # One data stream for every process (each takes its slice of a step); the offset keeps it apart from the
        # weight-init seed.
        self.generator.manual_seed(self.train_cfg.seed * 1_000_003 + 7919)

    def state_dict(self) -> dict[str, Any]:
        """trainer.pt: the optimizer's state and the TrainState; call on every rank (it gathers their RNG states)."""
        ranks = capture_rng_states(self.loader.state() if self.loader is not None else self.generator.get_state())
        if self.procs.distributed:
            gathered: list[Any] = [None] * self.procs.world_size
            tdist.all_gather_object(gathered, ranks, group=self.procs.control)
        else:
            gathered = [ranks]
        self.state.ranks = gathered
        self.state.shares = list(self.shares)
        self.state.scaler = self.scaler.state_dict()
        optimizer = full_optimizer_state(self.optimizer) if self.parallel == "fsdp" else self.optimizer.state_dict()
        return {"format": STATE_FORMAT, **self.state.state_dict(), "optimizer": optimizer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_world = state.get("world_size", 1)
        model = self.config.model
        if saved_world != self.procs.world_size and (model.dropout or model.attention_dropout):
            # The data stream is global, but dropout draws from each process's own generator.
            raise UsageError(
                f"{self.loaded_from.path} was trained by {saved_world} process(es) with dropout and this run has "
                f"{self.procs.world_size}: dropout's random numbers cannot continue exactly on another layout; resume "
                f"with torchrun --nproc_per_node {saved_world}, or start a new run with --out"
            )
        saved_shares = [int(share) for share in state.get("shares", [])]
        if (self.train_cfg.rank_shares == "measure" and len(saved_shares) == self.procs.world_size
                and sum(saved_shares) == self.step_sequences):
            self._lay_out([float(share) for share in saved_shares])
        if len(saved_shares) == saved_world == self.procs.world_size and saved_shares != self.shares and (
                model.dropout or model.attention_dropout):
            raise UsageError(
                f"{self.loaded_from.path} was trained with shares {'/'.join(map(str, saved_shares))} and dropout, and "
                f"this run's are {'/'.join(map(str, self.shares))}: dropout's random numbers would meet other "
                f"sequences; resume with --set train.rank_shares={','.join(map(str, saved_shares))}")
        if self.parallel == "fsdp":
            load_sharded_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        for group, decay in zip(self.optimizer.param_groups, (self.train_cfg.weight_decay, 0.0), strict=True):
            # Hyperparameters come from this invocation's config, the moments from the checkpoint.
            group.update(betas=(self.train_cfg.beta1, self.train_cfg.beta2), weight_decay=decay,
                         fused=self.fused or None, foreach=None if self.fused else True)
        self.state.load_state_dict(state)
        # The accumulation count is this invocation's: the global batch may be changed between runs.
        self.state.accumulation = self.accumulation
        if self.state.scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(self.state.scaler)
        saved = self.state.ranks
        restore_rng_states(saved[min(self.procs.rank, len(saved) - 1)])
        self.generator.set_state(saved[0]["data"])

    def _open_data(self) -> tuple[np.ndarray, torch.Tensor | None, int]:
        """The train split, the fixed validation windows (on the device) and the UTF-8 bytes of their targets.

        For chat data it also sets ``val_masks``, which of those targets are learned, and the bytes are theirs.
        """
        T = self.config.model.context_length
        self.val_masks: torch.Tensor | None = None
        train_tokens = self.data.split("train")
        if len(train_tokens) < T + 1:
            raise UsageError(
                f"the training split of {self.data.path} has {len(train_tokens)} tokens, "
                f"fewer than model.context_length + 1 = {T + 1}"
            )
        val_tokens = self.data.split_tokens("val")
        if val_tokens < T + 1:
            self.reporter.warning(f"the validation split has {val_tokens} tokens, fewer than a window of {T + 1}: no evaluation")
            return train_tokens, None, 0
        val = self.data.split("val")
        starts = fixed_starts(len(val), T + 1, self.train_cfg.eval_windows)
        windows = gather_windows(val, starts, T + 1)
        targets = windows[:, 1:]
        if (val_mask := self.data.mask("val")) is not None:
            masks = gather_target_masks(val_mask, starts, T + 1)
            if not masks.any():
                self.reporter.warning("the validation windows hold no assistant reply: no evaluation")
                return train_tokens, None, 0
            self.val_masks, targets = masks.to(self.device), targets[masks]
        lengths = token_byte_lengths(Tokenizer.load(self.data.tokenizer_path))
        return train_tokens, windows.to(self.device), count_bytes(targets.numpy().ravel(), lengths)

    # -- the run

    def run(self) -> TrainResult:
        tc, procs, state = self.train_cfg, self.procs, self.state
        started = time.monotonic()
        T = self.config.model.context_length
        if tc.global_batch_tokens and self.tokens_per_step != tc.global_batch_tokens:
            self.reporter.warning(
                f"train.global_batch_tokens={tc.global_batch_tokens} is not a multiple of the context ({T}); using "
                f"{self.tokens_per_step} tokens per step"
            )
        if state.step >= tc.max_steps:
            self.reporter.info(
                f"{self.loaded_from.path} is at step {state.step}, already at train.max_steps={tc.max_steps}: "
                "nothing to train (raise --max-steps to continue)"
            )
            return self._result("done", 0, started, 0.0, None, self.loaded_from.path)
        if not self.plan.fits:
            reason = next((d.reason for d in self.plan.decisions if d.stage == "memory"), "")
            self.reporter.warning(f"the plan says this may not fit in memory: {reason}")

        records = MetricsLog(self.run_dir, self.start_step, procs.main, self.reporter)
        stop = _StopFlag()
        stop.install()
        self.loader = PrefetchLoader(
            self.train_tokens, self.micro_batch, T + 1, self.generator, prefetch=self.plan.prefetch,
            device=self.device, pin_memory=self.plan.pin_memory, non_blocking=self.plan.non_blocking,
            step_sequences=self.step_sequences, take=self.take, micro_sizes=self.micro_sizes,
            mask=self.data.mask("train"),
        )
        self.reporter.info(
            f"training {self.run_dir.path} from step {state.step} ({self.loaded_from.path.name}) to {tc.max_steps}: "
            f"{self.tokens_per_step:,} tokens per step ("
            + (f"{procs.world_size} processes, {'FSDP2' if self.parallel == 'fsdp' else 'DDP'}, shares "
               f"{'/'.join(map(str, self.shares))} sequences, this one "
               if procs.distributed else "")
            + f"{' + '.join(map(str, self.micro_sizes))} sequences x {T}"
            + f"), AdamW {'fused' if self.fused else 'foreach'}, {self.plan.dtype} on {self.device}"
            + ((", compiled (the whole forward)" if self.plan.compile_whole else ", compiled (each block)")
               if self.plan.compile else "")
            + (f", activations recomputed in every {_nth(self.plan.checkpoint_every)} block" if self.plan.checkpoint_every
               else "")
            + (", AdamW state offloaded to the CPU" if self.offload is not None else "")
        )
        if self.init is not None:
            self.reporter.info(f"starting from the weights of {self.init.lineage['checkpoint']} "
                               f"(sha256 {self.init.lineage['weights_sha256'][:12]}) with a fresh optimizer and schedule")
        if self.changes:
            self.reporter.info(f"changed from the run's saved config at step {state.step}: "
                               + "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in self.changes))
        if self.replanned is not None:
            self.reporter.info(f"schedule re-planned at step {state.step}: {self.replanned.describe()}")
        self.reporter.start("train", total=tc.max_steps)
        self.reporter.advance("train", state.step)
        try:
            end = self._loop(records, stop, started)
        finally:
            stop.restore()
            self.loader.close()
            records.close()
            self.reporter.finish("train")
        outputs = {"metrics": records.path}
        if procs.main:
            plot = plot_losses(self.run_dir)
            if plot is not None:
                outputs["loss_plot"] = plot
            if records.tensorboard is not None:
                outputs["tensorboard"] = self.run_dir.tensorboard_path
        result = self._result(end.stopped_by, EXIT_CODES.get(end.stopped_by, 0), started, end.step_seconds, end.last_eval,
                              end.checkpoint, end.train_loss)
        result.outputs = outputs
        return result

    def _result(self, stopped_by: str, code: int, started: float, step_seconds: float, last_eval: dict | None,
                checkpoint: Path | None, train_loss: float | None = None) -> TrainResult:
        state = self.state
        trained = (state.step - self.start_step) * self.tokens_per_step
        return TrainResult(
            run_dir=self.run_dir.path, rank=self.procs.rank, world_size=self.procs.world_size, start_step=self.start_step,
            step=state.step, max_steps=self.train_cfg.max_steps, tokens=state.tokens,
            elapsed_s=time.monotonic() - started, tokens_per_s=trained / step_seconds if step_seconds > 0 else 0.0,
            stopped_by=stopped_by, exit_code=code, bad_steps=state.bad_steps, train_loss=train_loss, eval=last_eval,
            best_step=state.best[1] if state.best else None, best_val_loss=state.best[0] if state.best else None,
            checkpoint=checkpoint, shares=self.shares if self.procs.distributed else None,
            rank_step_s=self.rank_step_s,
        )

    def _loop(self, records: MetricsLog, stop: _StopFlag, started: float) -> _LoopEnd:
        tc, procs, state = self.train_cfg, self.procs, self.state
        fpt = flops_per_token(self.config.model)
        interval_start, interval_steps, step_seconds = time.monotonic(), 0, 0.0
        last_log_step = state.step
        last_eval: dict | None = None
        train_loss: float | None = None
        checkpoint: Path | None = None
        evaluated_at = checkpointed_at = -1
        fitting = self.max_time is not None and not tc.decay_steps and not self._fitted_end()
        fit_from: tuple[int, float] | None = None
        while True:
            # The logged steps measure each process's busy time, so a user sees whether the shares balance.
            timed = procs.distributed and ((state.step + 1) % tc.log_every == 0 or state.step + 1 >= tc.max_steps)
            self.stepper(learning_rate_at(state.step, tc, state.fitted_steps, state.segments), self.loader, timed)
            state.step += 1
            if fitting:
                fit_from, fitting = self._fit_schedule(fit_from, started)
            state.tokens += self.tokens_per_step
            interval_steps += 1
            stopped_by = self._should_stop(stop, started)
            final = stopped_by is not None
            if state.step % tc.log_every == 0 or final:
                now = time.monotonic()
                seconds = now - interval_start
                step_seconds += seconds
                state.train_seconds += seconds
                train_loss = self._sync_counters()
                rate = (state.step - last_log_step) * self.tokens_per_step / seconds if seconds > 0 else 0.0
                record = {
                    "kind": "train", "step": state.step, "loss": train_loss,
                    "lr": learning_rate_at(state.step - 1, tc, state.fitted_steps, state.segments), "tokens": state.tokens,
                    "tok_per_s": rate, "bad_steps": state.bad_steps,
                    "elapsed_s": now - started, "eta_s": self._eta(seconds / max(1, interval_steps), started),
                }
                if self.plan.peak_flops:
                    record["mfu"] = rate / procs.world_size * fpt / self.plan.peak_flops
                if procs.distributed:
                    self.rank_step_s = record["rank_step_s"] = self._gather(self.stepper.busy_s)
                records.write(record)
                self.reporter.metrics("train", record)
                self.reporter.advance("train", state.step - last_log_step)
                last_log_step, interval_steps, interval_start = state.step, 0, now
            paused = time.monotonic()
            want_checkpoint = state.step % tc.checkpoint_every == 0 or final
            want_eval = state.step % tc.eval_every == 0 or want_checkpoint
            # Under FSDP2 a forward pass gathers weights from every process, so all of them evaluate and sample.
            scoring = procs.main or self.parallel == "fsdp"
            if scoring and self.val_windows is not None and want_eval and evaluated_at != state.step:
                last_eval = self._evaluate()
                evaluated_at = state.step
                records.write(last_eval)
                if procs.main:
                    self.reporter.metrics("eval", last_eval)
            if scoring and tc.sample_every and state.step % tc.sample_every == 0:
                sample = self._sample()
                records.write(sample)
                if procs.main:
                    self.reporter.info(f"sample at step {state.step}: {sample['prompt']}{sample['text']}")
            if want_checkpoint and checkpointed_at != state.step:
                if state.step % tc.log_every:
                    self._sync_counters(keep=True)
                checkpoint = self._save(last_eval if evaluated_at == state.step else None)
                checkpointed_at = state.step
            # Evaluation and checkpoint time stays out of tokens per second.
            interval_start += time.monotonic() - paused
            if final:
                return _LoopEnd(stopped_by, checkpoint, last_eval, train_loss, step_seconds)

    def _fit_schedule(self, fit_from: tuple[int, float] | None, started: float) -> tuple[tuple[int, float] | None, bool]:
        """Under train.max_time, time a few steps and end the cosine decay where the clock will stop the run.

        Returns the timing start and whether fitting continues. The first FIT_SKIP steps (compilation,
        allocator warm-up) are not timed. The fitted length is saved in trainer.pt, so a resumed run
        follows the same schedule; every process takes rank 0's figure.
        """
        done = self.state.step - self.start_step
        if done < FIT_SKIP:
            return None, True
        if fit_from is None:
            _wait(self.device)
            return (self.state.step, time.monotonic()), True
        if done < FIT_SKIP + FIT_MIN_STEPS:
            return fit_from, True
        ready = time.monotonic() - fit_from[1] >= max(FIT_MIN_SECONDS, FIT_FRACTION * self.max_time)
        if self.procs.distributed:
            # Every process must reach the broadcast below after the same step, whatever its own clock says.
            agreed = torch.tensor(int(ready))
            tdist.all_reduce(agreed, op=tdist.ReduceOp.MAX, group=self.procs.control)
            ready = bool(agreed)
        if not ready:
            return fit_from, True
        _wait(self.device)
        now = time.monotonic()
        per_step = (now - fit_from[1]) / (self.state.step - fit_from[0])
        # Early steps run a little slower than later ones (measured ~10% on tiny Shakespeare), which offsets
        # the budget that the final evaluation and checkpoint take: no margin is applied.
        left = self.max_time - (now - started)
        fitted = torch.tensor(fit_decay_steps(self.state.step, per_step, left, self.train_cfg))
        if self.procs.distributed:
            tdist.broadcast(fitted, src=0, group=self.procs.control)
        if self.state.segments:
            self.state.segments[-1] = dataclasses.replace(self.state.segments[-1], end=int(fitted))
        else:
            self.state.fitted_steps = int(fitted)
        self.reporter.info(
            f"train.max_time: {per_step * 1000:.0f} ms per step, so the learning rate decays to train.min_lr "
            f"by step {self._fitted_end()}"
        )
        return None, False

    def _fitted_end(self) -> int:
        """Where the active schedule's decay ends once a time budget has been fitted (0 before)."""
        return self.state.segments[-1].end if self.state.segments else self.state.fitted_steps

    def _sync_counters(self, keep: bool = False) -> float | None:
        """Read the step counters (one host sync); raise when too many bad steps came in a row."""
        loss, new, worst = self.stepper.read(reset=not keep)
        self.state.bad_steps += new
        if worst >= self.train_cfg.max_bad_steps:
            raise HetlmError(
                f"{worst} steps in a row with a non-finite loss or gradient by step {self.state.step} (train.max_bad_steps="
                f"{self.train_cfg.max_bad_steps}): training diverged; lower train.learning_rate or raise "
                "train.warmup_steps, then resume from the last checkpoint"
            )
        return loss

    def _should_stop(self, stop: _StopFlag, started: float) -> str | None:
        reasons = ["SIGINT", "SIGTERM", "max_time"]
        flags = [stop.signal == "SIGINT", stop.signal == "SIGTERM",
                 self.max_time is not None and time.monotonic() - started >= self.max_time]
        if self.procs.distributed:
            # All processes must stop after the same step, whichever of them saw the signal or the clock.
            agreed = torch.tensor(flags, dtype=torch.int32)
            tdist.all_reduce(agreed, op=tdist.ReduceOp.MAX, group=self.procs.control)
            flags = [bool(v) for v in agreed.tolist()]
        for reason, flag in zip(reasons, flags, strict=True):
            if flag:
                return reason
        return "max_steps" if self.state.step >= self.train_cfg.max_steps else None

    def _eta(self, seconds_per_step: float, started: float) -> float:
        eta = (self.train_cfg.max_steps - self.state.step) * seconds_per_step
        if self.max_time is not None:
            eta = min(eta, max(0.0, self.max_time - (time.monotonic() - started)))
        return eta

    def _evaluate(self) -> dict[str, Any]:
        loss = mean_loss(self.model, self.val_windows, self.plan.autocast, self.micro_batch, self.val_masks)
        step = self.state.step
        targets = int(self.val_masks.sum()) if self.val_masks is not None else self.val_windows[:, 1:].numel()
        record = eval_record(step, loss, targets, self.val_bytes)
        if math.isfinite(loss) and (self.state.best is None or loss < self.state.best[0]):
            self.state.best = (loss, step)
        return record

    @torch.no_grad()
    def _sample(self) -> dict[str, Any]:
        """A greedy continuation of train.sample_prompt: argmax only, so no random number is drawn."""
        tc, T = self.train_cfg, self.config.model.context_length
        tokenizer = Tokenizer.load(self.data.tokenizer_path)
        ids = [tokenizer.bos_id, *tokenizer.encode(tc.sample_prompt)]
        new: list[int] = []
        was_training = self.model.training
        self.model.eval()
        for _ in range(tc.sample_tokens):
            window = torch.tensor([ids[-T:]], device=self.device)
            with self.plan.autocast():
                logits, _ = self.model(window, last_only=True)
            token = logits[0, -1].argmax().cpu()
            if self.parallel == "fsdp":
                # Every process runs each forward (it gathers weights from all), so all must stop at the same token
                # even where their kernels would break a near-tie differently.
                tdist.broadcast(token, src=0, group=self.procs.control)
            token = int(token)
            if token == tokenizer.eos_id:
                break
            ids.append(token)
            new.append(token)
        self.model.train(was_training)
        return {"kind": "sample", "step": self.state.step, "prompt": tc.sample_prompt, "text": tokenizer.decode(new)}

    def _save(self, last_eval: dict | None) -> Path | None:
        state = self.state_dict()
        weights = full_weights(self.model) if self.parallel == "fsdp" else (
            self.offload.weights() if self.offload is not None else None)
        if not self.procs.main:
            return None
        info: dict[str, Any] = {"step": self.state.step, "tokens": self.state.tokens}
        if lineage := self.loaded_from.manifest.get("init"):
            # Every checkpoint says which weights the run started from: the step-0 one is pruned in time.
            info["init"] = lineage
        if last_eval is not None:
            info.update({k: v for k, v in finite(last_eval).items() if k.startswith("val_")})
        checkpoint = Checkpoint.write(self.run_dir.checkpoint_path(self.state.step), self.model, self.config,
                                      self.data.tokenizer_path, state, info, weights=weights)
        self.run_dir.prune(self.train_cfg.keep_last)
        return checkpoint.path



def _wait(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _nth(n: int) -> str:
    return {1: "", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")
