"""DistributedDataParallel training: two CPU processes over gloo, started by torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import one_error
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


def torchrun(config, run, *args, cwd, nproc=2, env=None):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "hetlm", "train", "--config", str(config), "--out", str(run), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


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
    assert "2 processes, DDP, shares" in " ".join(second.stderr.split())

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
@pytest.mark.parametrize(("nproc", "shares", "parallel"),
                         [(2, "1,3", "ddp"), (3, "1,1,2", "ddp"), (2, "1,1", "fsdp"), (2, "1,3", "fsdp")])
def test_uneven_shares_give_the_single_process_weights(cli, tiny_data, tmp_path, nproc, shares, parallel):
    # 12 sequences a step: one process accumulates 3 x 4; the processes split them 3/9 or 3/3/6 (FSDP2: 1+1+1 and
    # 3+3+3, the same number of micro-batches everywhere).
    changes = {"global_batch_tokens": 384, "max_steps": 8, "eval_every": 4, "checkpoint_every": 8, "log_every": 1,
               "rank_shares": shares, "parallel": parallel}
    path = tmp_path / "uneven.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "train": {**CONFIG["train"], **changes}, "data": {"dir": str(tiny_data)}}))
    single = tmp_path / "single"
    assert cli("train", "--config", path, "--out", single, "--set", "train.parallel=auto").code == 0
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
        # Every process's busy time of the logged step, so a user sees whether the shares balance.
        assert len(a["rank_step_s"]) == nproc and all(seconds > 0 for seconds in a["rank_step_s"])
    for a, b in zip(metrics(uneven, "eval"), metrics(single, "eval"), strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert f"{nproc} processes, {'FSDP2' if parallel == 'fsdp' else 'DDP'}, shares" in " ".join(result.stderr.split())
    assert "busy" in result.stdout


def uneven_config(tmp_path: Path, data: Path, **changes) -> Path:
    train = {**CONFIG["train"], "global_batch_tokens": 384, "max_steps": 12, "eval_every": 100, "checkpoint_every": 4,
             "log_every": 1, "rank_shares": "1,3", **changes}
    path = tmp_path / "uneven.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "train": train, "data": {"dir": str(data)}}))
    return path


@pytest.mark.slow
def test_an_uneven_run_killed_mid_way_resumes_to_the_same_weights(tiny_data, tmp_path):
    config = uneven_config(tmp_path, tiny_data)
    whole = tmp_path / "whole"
    assert torchrun(config, whole, cwd=tmp_path).returncode == 0
    killed = tmp_path / "killed"
    # Rank 0 SIGKILLs itself while moving the step-8 checkpoint into place (step 0 and step 4 came before), and
    # torchrun takes the other process down with it.
    crash = torchrun(config, killed, cwd=tmp_path, env={"HETLM_CRASH_AT": "dir-rename#3"})
    assert crash.returncode != 0
    assert [c.step for c in RunDir(killed).checkpoints()][-1] == 4
    resumed = torchrun(config, killed, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 4" in resumed.stderr
    ours, reference = weights(killed), weights(whole)
    assert ours.keys() == reference.keys()
    for name in reference:
        assert torch.equal(ours[name], reference[name]), name


@pytest.mark.slow
def test_fsdp_checkpoints_are_the_usual_format(cli, tiny_data, tmp_path):
    config = uneven_config(tmp_path, tiny_data, parallel="fsdp", max_steps=8)
    run = tmp_path / "sharded"
    result = torchrun(config, run, "--max-steps", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # Two sharded processes cut the whole optimizer state back into their shards.
    resumed = torchrun(config, run, "--max-steps", "6", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 4" in resumed.stderr
    # The optimizer state is saved whole, so one process (no FSDP2 there) resumes what two sharded processes began,
    # and follows a run trained by one process all along.
    assert cli("train", "--config", config, "--out", run, "--set", "train.parallel=auto").code == 0
    single = tmp_path / "single"
    assert cli("train", "--config", config, "--out", single, "--set", "train.parallel=auto").code == 0
    ours, reference = weights(run), weights(single)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-5)
    assert cli("eval", run).code == 0
    assert cli("deploy", run, "--out", tmp_path / "bundle").code == 0


def test_fsdp_needs_torchrun(cli, tiny_data, tmp_path):
    result = cli("train", "--config", uneven_config(tmp_path, tiny_data, parallel="fsdp"), "--out", tmp_path / "run")
    one_error(result, 2)
    assert "train.parallel=fsdp" in result.err and "torchrun" in result.err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_measured_shares_keep_the_single_process_weights(cli, tiny_data, tmp_path):
    config = uneven_config(tmp_path, tiny_data, rank_shares="measure", max_steps=4)
    measured = tmp_path / "measured"
    result = torchrun(config, measured, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stderr.splitlines() if "train.rank_shares=measure" in line)
    shares = [int(n) for n in line.rsplit("shares ", 1)[1].split("/")]
    assert sum(shares) == 12 and min(shares) >= 1
    # A resume keeps the shares measured when the run began.
    resumed = torchrun(config, measured, "--max-steps", "6", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train.rank_shares=measure:" not in resumed.stderr
    assert f"shares {'/'.join(map(str, shares))} sequences" in " ".join(resumed.stderr.split())
    # Whatever the timing gave, the data and so the weights are those of one process.
    single = tmp_path / "single"
    assert cli("train", "--config", config, "--out", single, "--max-steps", "6").code == 0
    ours, reference = weights(measured), weights(single)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_bf16_fsdp_checkpoint_holds_the_fp32_weights(cli, tiny_data, tmp_path):
    # The evaluation before each checkpoint leaves the root unit gathered in bf16; the checkpoint must still hold
    # the fp32 shards, which a continued single-process run then follows.
    config = uneven_config(tmp_path, tiny_data, parallel="fsdp", max_steps=4, eval_every=2, rank_shares="equal")
    run = tmp_path / "bf16"
    result = torchrun(config, run, "--set", "device.dtype=bf16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = weights(run)
    assert all(w.dtype == torch.float32 for w in saved.values())
    embedding = saved["model.embed_tokens.weight"]
    assert not torch.equal(embedding, embedding.bfloat16().float()), "the embedding was saved rounded to bf16"
