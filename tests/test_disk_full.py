"""A disk that fills up (a real tmpfs of a few hundred KB) or a file-size limit: one line that says so, exit 1,
and nothing torn left behind."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mounts import TMPFS_NAME, needs_mounts, run_mounted, tmpfs

HETLM = [sys.executable, "-m", "hetlm"]
TINY = {
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "context_length": 32},
    "train": {"micro_batch_size": 4, "max_steps": 40, "warmup_steps": 5, "eval_every": 10, "eval_windows": 8,
              "log_every": 5, "checkpoint_every": 10, "keep_last": 2},
    "device": {"threads": 1, "compile": "off"},
}

# What is left in a folder: complete checkpoints, and anything else (torn checkpoints, temporary names).
INSPECT = """
import json, os, sys
from pathlib import Path
from hetlm.store import Checkpoint, RunDir
folder = Path(sys.argv[1])
hidden = sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))
checkpoints = folder / "checkpoints"
entries = sorted(os.listdir(checkpoints)) if checkpoints.is_dir() else []
complete = [c.path.name for c in RunDir(folder).checkpoints()]
print(json.dumps({"hidden": hidden, "complete": complete, "torn": sorted(set(entries) - set(complete)),
                  "files": sorted(os.listdir(folder)) if folder.is_dir() else None}))
"""


def one_error(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def write_config(tmp_path: Path, data: Path, **train) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], **train}, "data": {"dir": str(data)}}))
    return path


@needs_mounts
def test_training_on_a_full_disk_says_so_and_keeps_only_complete_checkpoints(tiny_data, tmp_path):
    small = tmp_path / "small"
    run = small / "run"
    # 1 MB holds the step-0 build (130 KB) and two checkpoints of 400 KB, not a third beside them.
    train, state = run_mounted(tmpfs(1024), small,
                               [*HETLM, "train", "--config", str(write_config(tmp_path, tiny_data)), "--out", str(run)],
                               [sys.executable, "-c", INSPECT, str(run)], cwd=tmp_path)
    assert train.code == 1
    error = one_error(train.err)
    pattern = (rf"error: no space left on {TMPFS_NAME} \(mounted on {small}\) writing {run}/checkpoints/step-0000\d0 "
               r"\(needs about 0\.4 MB, 0\.\d MB free\)")
    assert re.fullmatch(pattern, error), error
    left = json.loads(state.out)
    assert left["complete"] and left["torn"] == [] and left["hidden"] == []


@needs_mounts
def test_preprocess_on_a_full_disk_says_so_and_leaves_no_partial_output(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.txt").write_text(f"document {i}\n" + "the quick brown fox jumps over the lazy dog\n" * 40)
    small = tmp_path / "small"
    out = small / "data"
    preprocess, state = run_mounted(tmpfs(32), small,
                                    [*HETLM, "preprocess", str(corpus), "--out", str(out), "--vocab-size", "300"],
                                    [sys.executable, "-c", "import os, sys; print(os.listdir(sys.argv[1]))", str(small)],
                                    cwd=tmp_path)
    assert preprocess.code == 1
    error = one_error(preprocess.err)
    pattern = (rf"error: no space left on {TMPFS_NAME} \(mounted on {small}\) writing {out} "
               r"\(needs about [\d.]+ MB, [\d.]+ MB free\)")
    assert re.fullmatch(pattern, error), error
    # The folder it created is gone again, work folder and all.
    assert state.out.strip() == "[]"


@needs_mounts
def test_deploy_on_a_full_disk_says_so_and_writes_nothing(tiny_checkpoint, tmp_path):
    small = tmp_path / "small"
    out = small / "bundle"
    deploy, state = run_mounted(tmpfs(128), small, [*HETLM, "deploy", str(tiny_checkpoint), "--out", str(out)],
                                [sys.executable, "-c", "import os, sys; print(os.listdir(sys.argv[1]))", str(small)],
                                cwd=tmp_path)
    assert deploy.code == 1
    error = one_error(deploy.err)
    pattern = rf"error: no space left on {TMPFS_NAME} \(mounted on {small}\) writing {out} \(needs more than the 0\.\d MB free\)"
    assert re.fullmatch(pattern, error), error
    assert state.out.strip() == "[]"


def test_a_file_size_limit_is_reported_as_such(tiny_data, tmp_path):
    # trainer.pt (270 KB) exceeds the limit: the kernel answers EFBIG, which torch.save wraps.
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    run = tmp_path / "run"
    train = subprocess.run([*HETLM, "train", "--config", str(write_config(tmp_path, tiny_data)), "--out", str(run)],
                           capture_output=True, text=True, preexec_fn=limit, cwd=tmp_path, timeout=300)
    assert train.returncode == 1
    error = one_error(train.stderr)
    assert re.fullmatch(rf"error: file too large for .* \(or for the file-size limit, ulimit -f\) writing "
                        rf"{run}/checkpoints/step-000010 \(needs about 0\.4 MB\)", error), error
    left = json.loads(subprocess.run([sys.executable, "-c", INSPECT, str(run)], capture_output=True, text=True).stdout)
    assert left["complete"] == ["step-000000"] and left["torn"] == [] and left["hidden"] == []


pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file systems and limits")
