"""Training data: windows of a token memmap, drawn with an explicit generator, prefetched on a thread.

Sampling is a set of pure functions of (tokens, generator); ``PrefetchLoader`` runs them on a
background thread ahead of the training step and remembers the generator state that follows each
batch it hands out, so a checkpoint records exactly where the data stream stands even though more
batches were already drawn into the queue.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch


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


class PrefetchLoader:
    """Endless batches of windows, drawn ``prefetch`` steps ahead on a daemon thread.

    Each optimizer step draws the starts of all ``step_sequences`` windows of the global batch at once, from
    one stream every process shares, and this process keeps its slice ``take`` = (offset, count), cut into
    micro-batches of ``micro_sizes``: the windows of a step depend on the seed and the step alone, however
    many processes share it and in what proportions. Without ``take`` the whole step is this process's.

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
    ) -> None:
        self.tokens = tokens
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
                for windows in mine.split(self.micro_sizes):
                    if self.pin_memory:
                        windows = windows.pin_memory()
                    while not self._stop.is_set():
                        try:
                            self._queue.put((windows, state), timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except BaseException as exc:  # handed to the consumer, which re-raises it in the training thread
            self._queue.put((exc, None))

    def __iter__(self) -> PrefetchLoader:
        return self

    def __next__(self) -> torch.Tensor:
        """The next batch of windows (batch_size, length) on the loader's device."""
        windows, state = self._queue.get()
        if state is None:
            raise RuntimeError("the data loader thread failed") from windows
        self._state = state
        if windows.device != self.device:
            windows = windows.to(self.device, non_blocking=self.non_blocking)
        return windows

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
