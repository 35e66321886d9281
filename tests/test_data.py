import numpy as np
import pytest
import torch

from hetlm.data import (
    PrefetchLoader,
    fixed_starts,
    gather_windows,
    random_starts,
    sample_windows,
    split_inputs_targets,
)


def tokens(n=1000, dtype=np.uint16):
    return np.arange(n, dtype=dtype)


def test_windows_are_contiguous_and_in_range():
    data = tokens(500)
    windows = sample_windows(data, 64, 33, torch.Generator().manual_seed(0))
    assert windows.shape == (64, 33) and windows.dtype == torch.int64
    # Consecutive tokens of the corpus: each row is start, start+1, ...
    assert torch.equal(windows[:, 1:] - windows[:, :-1], torch.ones(64, 32, dtype=torch.int64))
    assert int(windows.min()) >= 0 and int(windows.max()) <= 499
    x, y = split_inputs_targets(windows)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_sampling_is_a_pure_function_of_the_generator():
    data = tokens(10_000, np.uint32)
    a = sample_windows(data, 8, 17, torch.Generator().manual_seed(5))
    b = sample_windows(data, 8, 17, torch.Generator().manual_seed(5))
    c = sample_windows(data, 8, 17, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Every start, the last one included, can be drawn.
    starts = random_starts(20, 17, 2000, torch.Generator().manual_seed(0))
    assert set(starts.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        random_starts(10, 17, 1, torch.Generator())


def test_fixed_starts_are_spread_and_stable():
    starts = fixed_starts(1000, 101, 10)
    assert starts[0] == 0 and starts[-1] == 899 and len(starts) == 10
    assert np.array_equal(starts, fixed_starts(1000, 101, 10))
    # A split too short for distinct windows gives fewer, not repeated ones.
    assert list(fixed_starts(103, 101, 10)) == [0, 1, 2]
    windows = gather_windows(tokens(1000), starts, 101)
    assert windows[:, 0].tolist() == starts.tolist()


def test_loader_state_marks_the_next_batch_despite_prefetching():
    data = tokens(5000)
    generator = torch.Generator().manual_seed(3)
    with PrefetchLoader(data, 4, 9, generator, prefetch=3) as loader:
        first = [next(loader) for _ in range(5)]
        state = loader.state()
        following = [next(loader) for _ in range(3)]
    # The same stream drawn without a thread.
    direct = torch.Generator().manual_seed(3)
    assert all(torch.equal(a, sample_windows(data, 4, 9, direct)) for a in first + following)
    # A generator set to the saved state continues where the consumer stood, not where the thread was.
    resumed = torch.Generator()
    resumed.set_state(state)
    with PrefetchLoader(data, 4, 9, resumed, prefetch=3) as loader:
        assert all(torch.equal(next(loader), expected) for expected in following)


def test_loader_reports_a_failing_thread():
    loader = PrefetchLoader(tokens(5), 2, 9, torch.Generator(), prefetch=1)
    with pytest.raises(RuntimeError, match="data loader thread failed"):
        next(loader)
    loader.close()
