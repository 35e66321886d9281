"""Real small or read-only file systems for tests, without root.

``unshare -rm`` gives a shell its own user and mount namespaces, where it may mount a tmpfs of a few hundred
KB (a disk that really fills up: ENOSPC from the kernel) or remount a folder read-only (EROFS). The mount
lives as long as that shell, so the commands under test and the inspection of what they left run inside it.
"""

from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest


@functools.cache
def available() -> bool:
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k none {shlex.quote(folder)}"],
                               capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not available(), reason="needs unshare -rm (unprivileged user and mount namespaces)")

# The device name the kernel reports for the test's tmpfs, and so hetlm's messages.
TMPFS_NAME = "hetlm-test"


def tmpfs(size_kb: int) -> str:
    return f"mount -t tmpfs -o size={size_kb}k {TMPFS_NAME} {{target}}"


READ_ONLY = "mount --bind {target} {target} && mount -o remount,ro,bind {target}"


@dataclass
class Ran:
    code: int
    out: str
    err: str


def run_mounted(mount: str, target: Path, *commands: list[str], cwd: Path, timeout: float = 300) -> list[Ran]:
    """Mount ``mount`` (tmpfs(...) or READ_ONLY) on ``target``, then run ``commands`` one after the other there."""
    target.mkdir(parents=True, exist_ok=True)
    results = Path(tempfile.mkdtemp(prefix="mounted-", dir=cwd))
    lines = [f"{mount.format(target=shlex.quote(str(target)))} || exit 99", f"cd {shlex.quote(str(cwd))}"]
    for i, command in enumerate(commands):
        lines.append(f"{shlex.join(command)} > {results}/{i}.out 2> {results}/{i}.err; echo $? > {results}/{i}.code")
    shell = subprocess.run(["unshare", "-rm", "sh", "-c", "\n".join(lines)], capture_output=True, text=True,
                           timeout=timeout)
    assert shell.returncode == 0, f"mounting failed: {shell.stderr}"
    ran = [Ran(int((results / f"{i}.code").read_text()), (results / f"{i}.out").read_text(),
               (results / f"{i}.err").read_text()) for i in range(len(commands))]
    shutil.rmtree(results)
    return ran
