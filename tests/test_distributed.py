"""DistributedDataParallel training: two CPU processes over gloo, started by torchrun."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hetlm.store import RunDir

CONFIG = {
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "context_length": 32},
    # Two processes with one micro-batch each see the same 256 tokens per step as one process accumulating two.
    "train": {
        "micro_batch_size": 4, "global_batch_tokens": 256, "max_steps": 30, "warmup_steps": 5, "learning_rate": 0.003,
        "min_lr": 0.0003, "eval_every": 10, "eval_windows": 8, "log_every": 1, "checkpoint_every": 10,
        # The schedule's length is fixed, so stopping at step 15 and resuming follows the same learning rates.
        "decay_steps": 30,
    },
    "device": {"compile": "off"},
}


def write_config(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "data": {"dir": str(data)}}))
    return path


def metrics(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def torchrun(config, run, *args, cwd, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "hetlm", "train", "--config", str(config), "--out", str(run), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_gloo_processes_follow_the_single_process_curve(cli, tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data)
    ddp = tmp_path / "ddp"
    first = torchrun(config, ddp, "--max-steps", "15", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    # Resuming at the same world size continues from the step-15 checkpoint.
    second = torchrun(config, ddp, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "from step 15" in second.stderr
    assert "2 processes, shares" in " ".join(second.stderr.split())

    single = tmp_path / "single"
    assert cli("train", "--config", config, "--out", single).code == 0

    # Only rank 0 writes: one record per step.
    ddp_train, single_train = metrics(ddp, "train"), metrics(single, "train")
    assert [r["step"] for r in ddp_train] == list(range(1, 31)) == [r["step"] for r in single_train]
    assert all(r["tokens"] == 256 * r["step"] for r in ddp_train)
    # One data stream whatever the layout: the same tokens in the same steps as one process.
    assert ddp_train[0]["loss"] == pytest.approx(single_train[0]["loss"], rel=1e-5)
    late = lambda records: sum(r["loss"] for r in records[-10:]) / 10  # noqa: E731
    assert late(ddp_train) < math.log(512) - 0.6
    assert late(ddp_train) == pytest.approx(late(single_train), abs=0.15)
    ddp_eval, single_eval = metrics(ddp, "eval"), metrics(single, "eval")
    assert [r["step"] for r in ddp_eval] == [10, 15, 20, 30] and [r["step"] for r in single_eval] == [10, 20, 30]
    for a, b in zip([r for r in ddp_eval if r["step"] != 15], single_eval, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=0.1), (a, b)

    state = RunDir(ddp).checkpoints()[-1].trainer_state()
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert torch.equal(state["ranks"][0]["data"], state["ranks"][1]["data"])

    # Without dropout a run goes on with another number of processes; with dropout it cannot be exact.
    assert cli("train", "--config", config, "--out", ddp, "--max-steps", "32").code == 0
    refused = cli("train", "--config", config, "--out", ddp, "--max-steps", "40", "--set", "model.dropout=0.1")
    assert refused.code == 2 and "Traceback" not in refused.err


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(RunDir(run).checkpoints()[-1].path / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "shares"), [(2, "1,3"), (3, "1,1,2")])
def test_uneven_shares_give_the_single_process_weights(cli, tiny_data, tmp_path, nproc, shares):
    # 12 sequences a step: one process accumulates 3 x 4; the processes split them 3/9 or 3/3/6.
    changes = {"global_batch_tokens": 384, "max_steps": 8, "eval_every": 100, "checkpoint_every": 8, "log_every": 1,
               "rank_shares": shares}
    path = tmp_path / "uneven.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "train": {**CONFIG["train"], **changes}, "data": {"dir": str(tiny_data)}}))
    single = tmp_path / "single"
    assert cli("train", "--config", path, "--out", single).code == 0
    uneven = tmp_path / "uneven"
    result = torchrun(path, uneven, cwd=tmp_path, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = "/".join(str(12 * int(w) // sum(map(int, shares.split(",")))) for w in shares.split(","))
    assert f"shares {expected} sequences" in " ".join(result.stderr.split())
    ours, reference = weights(uneven), weights(single)
    for name in reference:
        # Reduction order only: AdamW can turn it into ~1e-6 on a weight near zero.
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-5)
    for a, b in zip(metrics(uneven, "train"), metrics(single, "train"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
