"""The CLI's error policy: one line and the right exit code, --debug adds the traceback and keeps the code."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from mounts import READ_ONLY, needs_mounts, run_mounted

from hetlm.io import sha256_file
from hetlm.store import MANIFEST, TOKENIZER, resolve


def test_debug_shows_the_traceback_and_keeps_the_exit_code(cli, tmp_path):
    missing = tmp_path / "nothing"
    plain = cli("eval", missing)
    debug = cli("--debug", "eval", missing)
    assert plain.code == debug.code == 2
    assert "Traceback" not in plain.err and "Traceback" in debug.err
    assert debug.err.splitlines()[-1] == plain.err.splitlines()[-1] == f"error: {missing} does not exist"


def test_no_arguments_prints_the_help_and_no_empty_error(cli):
    result = cli()
    assert "Usage: hetlm" in result.out + result.err and "Commands" in result.out + result.err
    assert "error:" not in result.out + result.err
    assert result.code == 2


def test_deploy_of_a_checkpoint_with_a_garbage_tokenizer_is_one_usage_error(cli, tiny_checkpoint, tmp_path):
    run = shutil.copytree(tiny_checkpoint, tmp_path / "run")
    checkpoint = resolve(run)
    (checkpoint / TOKENIZER).write_bytes(b"not a sentencepiece model")
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"][TOKENIZER] = sha256_file(checkpoint / TOKENIZER)
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    result = cli("deploy", run, "--out", tmp_path / "bundle")
    assert result.code == 2 and "Traceback" not in result.err
    [error] = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: {checkpoint / TOKENIZER}: not a SentencePiece model (")
    assert not (tmp_path / "bundle").exists()


def test_eval_that_cannot_save_its_result_still_prints_it_and_warns(cli, tiny_checkpoint, tmp_path):
    run = shutil.copytree(tiny_checkpoint, tmp_path / "run", ignore=shutil.ignore_patterns("eval.json"))
    # A folder where eval.json goes: the atomic rename onto it fails, as any write would in a read-only run.
    (run / "eval.json").mkdir()
    result = cli("eval", run, "--max-tokens", "300", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["tokens"] == 300
    assert f"warning: the result was not saved to {run / 'eval.json'}: " in result.err.replace("\n", "")
    assert not any(line.startswith("saved ") for line in result.err.splitlines())


@needs_mounts
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX mounts")
def test_eval_of_a_read_only_run_prints_the_result_and_warns(tiny_checkpoint, tmp_path):
    run = shutil.copytree(tiny_checkpoint, tmp_path / "run", ignore=shutil.ignore_patterns("eval.json"))
    [evaluated] = run_mounted(READ_ONLY, run, [sys.executable, "-m", "hetlm", "eval", str(run), "--max-tokens", "300",
                                               "--json"], cwd=tmp_path)
    assert evaluated.code == 0, evaluated.err
    assert json.loads(evaluated.out)["tokens"] == 300
    assert "Read-only file system" in evaluated.err and "Traceback" not in evaluated.err
    assert not (run / "eval.json").exists()
