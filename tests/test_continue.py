"""Continuing a run: its saved config as the base, recorded changes, and the schedule re-planned explicitly."""

from __future__ import annotations

import json

import pytest
import yaml

from hetlm.config import load_config
from hetlm.store import RunDir
from hetlm.train import Segment, learning_rate_at, replan
from tests.test_train import metrics, steps_of, write_config


def one_line_error(result, code: int, fragment: str) -> None:
    assert result.code == code, (result.code, result.err)
    errors = [line for line in result.err.splitlines() if line.strip()]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in result.err, result.err


def train_cfg(*overrides: str):
    return load_config(None, ["train.learning_rate=0.01", "train.min_lr=0.001", "train.warmup_steps=10",
                              "train.max_steps=110", *overrides]).train


# --- the schedule, pure ---------------------------------------------------------------------------------


def test_an_unchanged_target_keeps_the_schedule():
    old = train_cfg()
    assert replan(60, old, 0, [], train_cfg(), fit=False) is None
    assert replan(0, old, 0, [], train_cfg("train.max_steps=500"), fit=False) is None
    # Under a time budget the schedule is the invocation's, so it is always re-planned.
    assert replan(60, old, 0, [], train_cfg(), fit=True) is not None


def test_extending_mid_decay_continues_from_the_current_rate():
    old, new = train_cfg(), train_cfg("train.max_steps=210")
    segment = replan(60, old, 0, [], new, fit=False)
    assert segment.warmup == 0 and segment.start == 60 and segment.end == 210
    rates = [learning_rate_at(s, new, 0, [segment]) for s in range(60, 260)]
    assert rates[0] == pytest.approx(learning_rate_at(60, old)) == pytest.approx(0.0055)
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert learning_rate_at(210, new, 0, [segment]) == pytest.approx(0.001)


def test_extending_a_finished_schedule_restarts_with_a_short_warmup():
    old, new = train_cfg(), train_cfg("train.max_steps=300")
    segment = replan(110, old, 0, [], new, fit=False)
    assert segment.warmup == 10 and segment.from_lr == pytest.approx(0.001)
    assert learning_rate_at(110, new, 0, [segment]) == pytest.approx(0.001 + 0.009 / 10)
    assert learning_rate_at(119, new, 0, [segment]) == pytest.approx(0.01)
    assert learning_rate_at(300, new, 0, [segment]) == pytest.approx(0.001)
    # A time budget on a run whose fitted cosine is over: a restart whose end is fitted by this invocation.
    timed = replan(110, old, 110, [], train_cfg("train.max_steps=100000"), fit=True)
    assert timed.end == 0 and timed.warmup == 10
    assert "train.max_time will stop" in timed.describe()
    # Re-planning again reads the last segment, not the original config.
    again = replan(200, new, 0, [segment], train_cfg("train.max_steps=400"), fit=False)
    assert again.from_lr == pytest.approx(learning_rate_at(200, new, 0, [segment])) and again.warmup == 0


def test_a_replan_during_the_warmup_finishes_it():
    old, new = train_cfg(), train_cfg("train.max_steps=300")
    segment = replan(4, old, 0, [], new, fit=False)
    assert segment.warmup == 6 and segment.peak == 0.01
    assert learning_rate_at(9, new, 0, [segment]) == pytest.approx(0.01)
    assert Segment.from_dict(segment.to_dict()) == segment


# --- hetlm train RUN ------------------------------------------------------------------------------------


def test_train_run_continues_with_its_saved_config_and_records_changes(cli, tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, train={"max_steps": 10, "checkpoint_every": 10})
    run = tmp_path / "run"
    assert cli("train", "--config", config, "--out", run).code == 0
    more = cli("train", run, "--max-steps", "15")
    assert more.code == 0, more.err
    assert "from step 10" in more.err and "train.max_steps 10 -> 15" in more.err
    assert steps_of(run)[-1] == 15
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # Keys the command did not name come from the run, not from the defaults.
    assert saved["train"]["max_steps"] == 15 and saved["train"]["learning_rate"] == 0.003 and saved["name"] == "tiny"
    assert RunDir(run).changes() == [{"step": 10, "key": "train.max_steps", "from": 10, "to": 15}]

    partial = tmp_path / "partial.yaml"
    partial.write_text("train:\n  log_every: 1\n")
    assert cli("train", "--out", run, "--config", partial, "--max-steps", "17").code == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["log_every"] == 1 and saved["model"]["d_model"] == 32 and saved["name"] == "tiny"
    assert RunDir(run).changes()[1:] == [{"step": 15, "key": "train.max_steps", "from": 15, "to": 17},
                                         {"step": 15, "key": "train.log_every", "from": 5, "to": 1}]
    assert [r["step"] for r in metrics(run, "train")][-2:] == [16, 17]

    # Rejected commands leave config.yaml and changes.json as they were.
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "changes.json")}
    one_line_error(cli("train", run, "--set", "model.d_model=64", "--max-steps", "30"), 2, "another model")
    one_line_error(cli("train", run, "--set", "train.min_lr=1"), 2, "train.min_lr")
    one_line_error(cli("train", run, "--out", tmp_path / "other"), 2, "two run folders")
    assert {name: (run / name).read_bytes() for name in before} == before
    assert steps_of(run)[-1] == 17


def test_extending_a_finished_run_restarts_the_schedule_and_resumes_exactly(cli, tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, train={"max_steps": 20, "log_every": 1, "checkpoint_every": 5,
                                                        "keep_last": 10, "deterministic": True})
    run = tmp_path / "run"
    assert cli("train", "--config", config, "--out", run).code == 0
    floor = metrics(run, "train")[-1]["lr"]
    more = cli("train", run, "--max-steps", "40")
    assert more.code == 0, more.err
    assert "schedule re-planned at step 20: the learning rate restarts: 2-step warmup" in more.err
    state = RunDir(run).checkpoints()[-1].trainer_state()
    segments = [Segment.from_dict(s) for s in state["schedule"]["segments"]]
    assert [(s.start, s.end, s.warmup) for s in segments] == [(20, 40, 2)]
    train = load_config(run / "config.yaml").train
    rates = [r["lr"] for r in metrics(run, "train") if r["step"] > 20]
    assert rates == pytest.approx([learning_rate_at(s, train, 0, segments) for s in range(20, 40)])
    # No jump: the restart starts from where the run was and climbs over its warmup.
    assert floor < rates[0] < rates[1] == pytest.approx(0.003) and 0.0003 < rates[-1] < 0.00033

    # The re-plan is in trainer.pt: resuming inside it (into another run) replays the same steps bit for bit.
    other = tmp_path / "other"
    resumed = cli("train", "--config", run / "config.yaml", "--out", other, "--resume", run / "checkpoints/step-000030")
    assert resumed.code == 0, resumed.err
    assert "re-planned" not in resumed.err
    final = "checkpoints/step-000040/model.safetensors"
    assert (other / final).read_bytes() == (run / final).read_bytes()


def test_a_rejected_resume_never_removes_nothing(cli, tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, train={"max_steps": 5, "checkpoint_every": 5})
    run = tmp_path / "run"
    assert cli("train", "--config", config, "--out", run).code == 0
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    config_before = (run / "config.yaml").read_bytes()
    tokens = json.loads((tiny_data / "manifest.json").read_text())["splits"]["train"]["tokens"]
    result = cli("train", run, "--resume", "never", "--set", f"model.context_length={tokens + 1}",
                 "--set", "train.micro_batch_size=1")
    one_line_error(result, 2, f"fewer than model.context_length + 1 = {tokens + 2}")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (run / "config.yaml").read_bytes() == config_before


def test_samples_during_training_are_logged_and_change_nothing(cli, tiny_data, tmp_path):
    plain = write_config(tmp_path, tiny_data, name="plain", model={"dropout": 0.1},
                         train={"max_steps": 10, "deterministic": True})
    sampled = write_config(tmp_path, tiny_data, name="sampled", model={"dropout": 0.1},
                           train={"max_steps": 10, "deterministic": True, "sample_every": 5, "sample_prompt": "def ",
                                  "sample_tokens": 6})
    assert cli("train", "--config", plain, "--out", tmp_path / "a").code == 0
    result = cli("train", "--config", sampled, "--out", tmp_path / "b")
    assert result.code == 0, result.err
    samples = metrics(tmp_path / "b", "sample")
    assert [s["step"] for s in samples] == [5, 10] and all(s["prompt"] == "def " for s in samples)
    assert all(isinstance(s["text"], str) for s in samples) and "sample at step 5: def " in result.err
    assert metrics(tmp_path / "a", "sample") == []
    # Greedy and in eval mode: no random number is drawn, so the weights are those of the run without samples.
    final = "checkpoints/step-000010/model.safetensors"
    assert (tmp_path / "a" / final).read_bytes() == (tmp_path / "b" / final).read_bytes()
