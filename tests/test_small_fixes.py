"""Small fixes around the pipeline's edges, one test each."""

from __future__ import annotations

import dataclasses
import json

from hetlm.config import load_config
from hetlm.model import parameter_counts


def test_plan_takes_the_vocabulary_of_the_data_folder_and_says_when_there_is_none(cli, tiny_data, tmp_path):
    result = cli("plan", "--set", f"data.dir={tiny_data}", "--json")
    assert result.code == 0, result.err
    model = dataclasses.replace(load_config().model, vocab_size=512)
    assert json.loads(result.out)["memory"][0]["weights"] == 4 * parameter_counts(model)["total"]
    assert "note:" not in result.err
    missing = cli("plan", "--set", f"data.dir={tmp_path / 'nope'}", "--json")
    assert missing.code == 0 and "is not there" in missing.err and "vocabulary of 4096" in missing.err
    model = dataclasses.replace(model, vocab_size=4096)
    assert json.loads(missing.out)["memory"][0]["weights"] == 4 * parameter_counts(model)["total"]
