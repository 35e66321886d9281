import dataclasses
import json
from pathlib import Path

import pytest

from hetlm.config import Config, config_from_dict, describe_key, describe_keys, load_config, parse_duration
from hetlm.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_file_set(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 0.002\n  max_steps: 50\nmodel:\n  n_layers: 2\n")
    config = load_config(path, ["train.max_steps=7"])
    assert config.train.learning_rate == 0.002  # file beats default
    assert config.train.max_steps == 7  # --set beats file
    assert config.model.n_layers == 2
    assert config.model.d_model == Config().model.d_model  # default kept
    assert config.name == "preset"


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key train.lerning_rate — did you mean train.learning_rate\?"):
        load_config(None, ["train.lerning_rate=1e-3"])
    with pytest.raises(ConfigError, match="did you mean model.n_layers"):
        load_config(write(tmp_path, "model:\n  n_layer: 3\n"))
    with pytest.raises(ConfigError, match="unknown key traning.max_steps"):
        load_config(None, ["traning.max_steps=3"])


def test_types_are_checked():
    with pytest.raises(ConfigError, match="train.max_steps must be int"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="model.tie_embeddings must be bool"):
        load_config(None, ["model.tie_embeddings=3"])
    assert load_config(None, ["train.learning_rate=3"]).train.learning_rate == 3.0
    assert load_config(None, ["model.tie_embeddings=false"]).model.tie_embeddings is False


def test_invariants_are_validated():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["model.d_model=130", "model.n_heads=4"])
    with pytest.raises(ConfigError, match="multiple of model.n_kv_heads"):
        load_config(None, ["model.n_heads=4", "model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(None, ["data.val_fraction=1.5"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="--set expects"):
        load_config(None, ["train.max_steps"])


def test_round_trip_through_dict():
    config = load_config(None, ["model.n_layers=3", "train.max_time=90s"])
    assert config_from_dict(config.to_dict()) == config


def test_durations():
    assert parse_duration("90") == 90
    assert parse_duration("10m") == 600
    assert parse_duration("1.5h") == 5400
    with pytest.raises(ConfigError):
        parse_duration("soon")


def test_config_show_cli(cli, tmp_path):
    result = cli("config", "show", "--set", "model.n_layers=3")
    assert result.code == 0
    assert "n_layers: 3" in result.out
    bad = cli("config", "show", "--set", "train.lerning_rate=1")
    assert bad.code == 2
    assert "did you mean train.learning_rate" in bad.err
    assert "Traceback" not in bad.err
    assert cli("--version").out.startswith("hetlm ")
    assert cli("config", "show", "--bogus").code == 2


def test_yaml_1_1_quirks():
    config = load_config(None, ["model.norm_eps=1e-6", "device.compile=on", "train.learning_rate=3e-4"])
    assert config.model.norm_eps == 1e-6
    assert config.device.compile == "on"
    assert config.train.learning_rate == 3e-4


def _keys_and_defaults() -> dict:
    """Every key of Config with its default, found from the dataclasses themselves."""
    defaults = Config()
    keys = {}
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            keys.update({f"{f.name}.{g.name}": getattr(value, g.name) for g in dataclasses.fields(value)})
        else:
            keys[f.name] = value
    return keys


def test_every_key_is_described_once():
    expected = _keys_and_defaults()
    described = describe_keys()
    assert sorted(info.key for info in described) == sorted(expected)
    for info in described:
        assert info.help.strip(), f"{info.key} has no help text"
        assert info.default == expected[info.key]
        assert info.type == type(info.default).__name__
    assert describe_key("data.vocab_size").default_text == "4096"
    assert describe_key("train.max_time").default_text == '""'
    assert describe_key("model.tie_embeddings").default_text == "true"
    with pytest.raises(ConfigError, match="did you mean data.vocab_size"):
        describe_key("data.vocab_sise")


def test_listed_choices_are_what_validation_accepts():
    with_choices = [info for info in describe_keys() if info.choices]
    assert {info.key for info in with_choices} >= {"data.tokenizer", "device.dtype", "device.compile", "sample.quantize"}
    for info in with_choices:
        assert info.default in info.choices
        for choice in info.choices:
            section, leaf = info.key.split(".")
            assert getattr(getattr(load_config(None, [f"{info.key}={choice}"]), section), leaf) == choice
        with pytest.raises(ConfigError) as error:
            load_config(None, [f"{info.key}=bogus"])
        assert all(choice in str(error.value) for choice in info.choices)


def test_config_keys_cli(cli):
    keys = [info.key for info in describe_keys()]
    table = cli("config", "keys")
    assert table.code == 0
    assert all(key in table.out for key in keys)
    listed = cli("config", "keys", "--json")
    assert listed.code == 0
    entries = json.loads(listed.out)
    assert [entry["key"] for entry in entries] == keys
    assert entries[keys.index("data.tokenizer")] == {
        "key": "data.tokenizer", "type": "str", "default": "bpe", "help": describe_key("data.tokenizer").help,
        "choices": ["bpe", "unigram"],
    }
    markdown = cli("config", "keys", "--markdown")
    assert markdown.code == 0
    assert r"| `data.tokenizer` | bpe\|unigram | `bpe` | SentencePiece" in markdown.out
    assert cli("config", "keys", "--markdown", "--json").code == 2


def test_readme_configuration_table_is_the_listing(cli):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert table == cli("config", "keys", "--markdown").out.strip(), \
        "README.md's configuration table is stale: paste in the output of hetlm config keys --markdown"
