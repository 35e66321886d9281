"""Training data: windows of a token memmap, drawn with an explicit generator, prefetched on a thread.

Sampling is a set of pure functions of (tokens, generator); ``PrefetchLoader`` runs them on a
background thread ahead of the training step and remembers the generator state that follows each
batch it hands out, so a checkpoint records exactly where the data stream stands even though more
batches were already drawn into the queue. Chat data comes with a loss mask (one uint8 per token, 1 where
training learns the token); its batches are ``MaskedBatch``es.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from hetlm.model import IGNORE_INDEX


def random_starts(n_tokens: int, length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` window starts drawn uniformly from [0, n_tokens - length]."""
    if n_tokens < length:
        raise ValueError(f"{n_tokens} tokens cannot hold a window of {length}")
    return torch.randint(0, n_tokens - length + 1, (count,), generator=generator)


def fixed_starts(n_tokens: int, length: int, count: int) -> np.ndarray:
    """``count`` window starts spread evenly over the tokens (fewer if they would repeat)."""
    if n_tokens < length:
        raise ValueError(f"{n_tokens} tokens cannot hold a window of {length}")
    last = n_tokens - length
    count = max(1, min(count, last + 1))
    return np.unique(np.linspace(0, last, count).round().astype(np.int64))


def gather_windows(tokens: np.ndarray, starts: np.ndarray | torch.Tensor, length: int) -> torch.Tensor:
    """Rows ``tokens[s : s + length]`` for each start, as an int64 tensor (len(starts), length)."""
    starts = np.asarray(starts, dtype=np.int64)
    index = starts[:, None] + np.arange(length, dtype=np.int64)  # (B, length)
    return torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))


def sample_windows(tokens: np.ndarray, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """A batch (batch_size, length) of random contiguous windows; advances ``generator``."""
    return gather_windows(tokens, random_starts(len(tokens), length, batch_size, generator).numpy(), length)


def split_inputs_targets(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of T + 1 tokens -> inputs (B, T) and next-token targets (B, T)."""
    return windows[:, :-1], windows[:, 1:]


def split_masked(windows: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of T + 1 tokens and which of their targets are learned (B, T) -> inputs (B, T) and targets (B, T),
    the unlearned ones IGNORE_INDEX."""
    x, y = split_inputs_targets(windows)
    return x, y.masked_fill(~mask, IGNORE_INDEX)


def gather_target_masks(mask: np.ndarray, starts: np.ndarray | torch.Tensor, length: int) -> torch.Tensor:
    """Of the windows ``tokens[s : s + length]``, whether each target (positions 1 .. length - 1) is learned:
    a bool tensor (len(starts), length - 1)."""
    starts = np.asarray(starts, dtype=np.int64)
    index = starts[:, None] + np.arange(1, length, dtype=np.int64)
    return torch.from_numpy(np.asarray(mask[index]) != 0)


@dataclass
class MaskedBatch:
    """A micro-batch of masked data: its windows (B, T + 1), which of their targets are learned (B, T), and how
    many targets are learned in the whole step (every micro-batch of every process), the mean's divisor."""

    windows: torch.Tensor
    mask: torch.Tensor
    step_targets: int

    def inputs_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        return split_masked(self.windows, self.mask)

    def to(self, device: torch.device, non_blocking: bool = False) -> MaskedBatch:
        return MaskedBatch(self.windows.to(device, non_blocking=non_blocking),
                           self.mask.to(device, non_blocking=non_blocking), self.step_targets)

    def pin_memory(self) -> MaskedBatch:
        return MaskedBatch(self.windows.pin_memory(), self.mask.pin_memory(), self.step_targets)


class PrefetchLoader:
    """Endless batches of windows, drawn ``prefetch`` steps ahead on a daemon thread.

    Each optimizer step draws the starts of all ``step_sequences`` windows of the global batch at once, from
    one stream every process shares, and this process keeps its slice ``take`` = (offset, count), cut into
    micro-batches of ``micro_sizes``: the windows of a step depend on the seed and the step alone, however
    many processes share it and in what proportions. Without ``take`` the whole step is this process's.

    With a loss ``mask`` the batches are ``MaskedBatch``es. Every process draws all of the step's starts, so
    each counts the learned targets of the whole step alone, and all agree on it without communicating.

    Only the thread touches ``generator`` while the loader is open. ``state()`` is the generator
    state right after the step of the last batch returned by ``next``: a generator set to it draws the
    step the loader would return next.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        length: int,
        generator: torch.Generator,
        prefetch: int = 4,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
        non_blocking: bool = False,
        step_sequences: int | None = None,
        take: tuple[int, int] | None = None,
        micro_sizes: list[int] | None = None,
        mask: np.ndarray | None = None,
    ) -> None:
        self.tokens = tokens
        self.mask = mask
        self.batch_size = batch_size
        self.step_sequences = step_sequences or batch_size
        self.take = take or (0, self.step_sequences)
        self.micro_sizes = micro_sizes or [batch_size] * (self.take[1] // batch_size)
        if sum(self.micro_sizes) != self.take[1]:
            raise ValueError(f"micro-batches {self.micro_sizes} do not add up to this process's {self.take[1]} sequences")
        self.length = length
        self.generator = generator
        self.device = torch.device(device)
        self.pin_memory = pin_memory
        self.non_blocking = non_blocking
        self._state = generator.get_state()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="hetlm-data", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            offset, count = self.take
            while not self._stop.is_set():
                starts = random_starts(len(self.tokens), self.length, self.step_sequences, self.generator).numpy()
                mine = gather_windows(self.tokens, starts[offset : offset + count], self.length)
                state = self.generator.get_state()
                batches: list[torch.Tensor] | list[MaskedBatch] = list(mine.split(self.micro_sizes))
                if self.mask is not None:
                    learned = gather_target_masks(self.mask, starts, self.length)
                    total = int(learned.sum())
                    masks = learned[offset : offset + count].split(self.micro_sizes)
                    batches = [MaskedBatch(w, m, total) for w, m in zip(batches, masks, strict=True)]
                for batch in batches:
                    if self.pin_memory:
                        batch = batch.pin_memory()
                    while not self._stop.is_set():
                        try:
                            self._queue.put((batch, state), timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except BaseException as exc:  # handed to the consumer, which re-raises it in the training thread
            self._queue.put((exc, None))

    def __iter__(self) -> PrefetchLoader:
        return self

    def __next__(self) -> torch.Tensor | MaskedBatch:
        """The next batch of windows (batch_size, length) on the loader's device (a MaskedBatch with a mask)."""
        batch, state = self._queue.get()
        if state is None:
            raise RuntimeError("the data loader thread failed") from batch
        self._state = state
        device = batch.windows.device if isinstance(batch, MaskedBatch) else batch.device
        if device != self.device:
            batch = batch.to(self.device, non_blocking=self.non_blocking)
        return batch

    def state(self) -> torch.Tensor:
        return self._state.clone()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    def __enter__(self) -> PrefetchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
