"""hetlm.io on real files: folder replacement under SIGKILL at each step, locks between processes, clean-up."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hetlm.io as hio
from hetlm.errors import HetlmError
from hetlm.io import CRASH_POINTS, FileLock, aside_path, atomic_dir, atomic_path, clean_up, no_space_errno

# (mode, crash point) of every step of replacing a folder: swapped in one step, or moved aside first.
REPLACING = [("exchange", "dir-exchange"), ("exchange", "dir-remove-old"),
             ("aside", "dir-move-old"), ("aside", "dir-move-new"), ("aside", "dir-remove-old")]

WRITE_FOLDER = """
import sys
from pathlib import Path
import hetlm.io
if sys.argv[2] == "aside":
    hetlm.io._RENAMEAT2 = None
with hetlm.io.atomic_dir(Path(sys.argv[1])) as tmp:
    for name in ("a", "b"):
        (tmp / name).write_text("new")
"""


def write_folder(path: Path, content: str) -> None:
    with atomic_dir(path) as tmp:
        for name in ("a", "b"):
            (tmp / name).write_text(content)


def content(path: Path) -> str | None:
    """The folder's content when it is complete (both files, the same text), else None."""
    texts = {(path / name).read_text() for name in ("a", "b") if (path / name).is_file()}
    return texts.pop() if len(texts) == 1 and len(os.listdir(path)) == 2 else None


def killed_at(point: str, *args: str, script: str = WRITE_FOLDER) -> None:
    env = {**os.environ, "HETLM_CRASH_AT": point}
    child = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, f"not killed at {point}: {child.stderr}"


def test_every_crash_point_is_exercised():
    assert {point for _, point in REPLACING} | {"dir-rename", "file-rename"} == set(CRASH_POINTS)


@pytest.mark.parametrize("mode, point", REPLACING)
def test_a_folder_replaced_under_sigkill_is_complete_or_recoverable(tmp_path, mode, point):
    target = tmp_path / "out"
    write_folder(target, "old")
    killed_at(point, target, mode)
    if mode == "exchange":
        # At every instant the target path holds a complete folder.
        assert content(target) in ("old", "new")
    elif point == "dir-move-new":
        assert not target.exists() and content(aside_path(target)) == "old"
    # The next write (or clean-up under the lock) finishes the job: old or new in place, nothing beside it.
    done = clean_up(tmp_path, "out")
    assert content(target) in ("old", "new")
    assert sorted(os.listdir(tmp_path)) == ["out"], done
    assert done, "the clean-up says what it did"
    write_folder(target, "newer")
    assert content(target) == "newer" and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_new_folder_killed_before_its_rename_leaves_a_temporary_the_clean_up_removes(tmp_path):
    target = tmp_path / "out"
    killed_at("dir-rename", target, "exchange")
    assert not target.exists()
    [leftover] = os.listdir(tmp_path)
    assert leftover.startswith(".out.") and leftover.endswith(".tmp")
    (done,) = clean_up(tmp_path, "out")
    assert leftover in done and "MB" in done
    assert os.listdir(tmp_path) == []


def test_a_file_killed_before_its_rename_keeps_the_old_one(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    script = "import sys, hetlm.io; hetlm.io.atomic_write_text(sys.argv[1], 'new')"
    killed_at("file-rename", target, script=script)
    assert target.read_text() == "old"
    assert clean_up(tmp_path, r"f\.json") and os.listdir(tmp_path) == ["f.json"]


def test_the_nth_crash_point_is_the_one_that_kills(tmp_path):
    script = "import sys, hetlm.io\nfor i in range(3): hetlm.io.atomic_write_text(f'{sys.argv[1]}{i}', 'x')"
    killed_at("file-rename#3", tmp_path / "f", script=script)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["f0", "f1"]


def test_clean_up_leaves_other_names_alone(tmp_path):
    for name in (".out.abcdef12.tmp", ".out.old", ".outer.abcdef12.tmp", ".out.x.abcdef12.tmp", "out.abcdef12.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "out").mkdir()
    clean_up(tmp_path, "out")
    assert sorted(os.listdir(tmp_path)) == [".out.x.abcdef12.tmp", ".outer.abcdef12.tmp", "out", "out.abcdef12.tmp"]


def test_written_files_get_the_mode_of_ordinary_new_files(tmp_path):
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            # safetensors writes a temporary file of its own and renames it: 0600.
            save_file({"x": torch.ones(1)}, tmp / "w.safetensors")
        with atomic_path(tmp_path / "f.safetensors") as tmp:
            save_file({"x": torch.ones(1)}, tmp)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "d" / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "f.safetensors").stat().st_mode) == 0o644


HOLD = """
import sys, time
from hetlm.io import FileLock
lock = FileLock(sys.argv[1], "the thing")
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_lock_refuses_another_process_and_names_it_until_the_holder_is_killed(tmp_path):
    path = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        started = time.monotonic()
        with pytest.raises(HetlmError, match=rf"the thing is in use by another hetlm process \(pid {holder.pid} on "):
            FileLock(path, "the thing", patience=0.3).acquire()
        assert time.monotonic() - started >= 0.3
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        # The OS released the killed holder's lock; its file is stale and taken over.
        with FileLock(path, "the thing", patience=0.0):
            assert json.loads(path.read_text())["pid"] == os.getpid()
        assert not path.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_is_exclusive_within_a_process_too(tmp_path):
    with FileLock(tmp_path / ".lock", "x"):
        with pytest.raises(HetlmError, match="in use"):
            FileLock(tmp_path / ".lock", "x", patience=0.0).acquire()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_torch_saves_full_disk_is_recognised():
    # /dev/full fails every write with ENOSPC, as a full disk does.
    with pytest.raises(Exception) as caught, open("/dev/full", "wb") as handle:
        torch.save({"x": torch.zeros(10_000)}, handle)
    assert no_space_errno(caught.value) == errno.ENOSPC
    assert no_space_errno(RuntimeError("unrelated code: 28")) is None


def test_disk_full_message_names_the_file_system(tmp_path):
    message = hio.disk_full_message(tmp_path / "x" / "y", errno.ENOSPC, 8_500_000)
    assert message.startswith("no space left on ") and f"writing {tmp_path / 'x' / 'y'} (needs about 8.5 MB, " in message
    assert message.endswith(" MB free)") and "mounted on /" in message
