"""Chat data: preprocess --chat renders conversations with the serve template and masks all but the replies;
training and evaluation score only the replies; a model trained on a few questions answers them."""

from __future__ import annotations

import contextlib
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from hetlm.chat import CHAT_STOP, chat_pieces, render_chat
from hetlm.config import load_config
from hetlm.data import MaskedBatch, PrefetchLoader, gather_target_masks, gather_windows
from hetlm.model import Transformer
from hetlm.planner import detect_inventory, make_plan
from hetlm.preprocess import preprocess
from hetlm.sampling import Sampler, SamplingSettings, encode_prompt
from hetlm.store import DataFolder, load_checkpoint
from hetlm.tokenizer import Tokenizer
from hetlm.train import TrainStep, mean_loss
from tests.conftest import one_error
from tests.test_distributed import CONFIG, torchrun, weights
from tests.test_train import metrics, write_config

PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("What color is the sky?", "Blue, mostly."),
    ("How many legs does a cat have?", "Four legs."),
    ("Who wrote Hamlet?", "Shakespeare."),
]
BAD_RECORDS = [
    '{"messages": []}',
    '{"messages": [{"role": "tool", "content": "x"}]}',
    '{"messages": [{"role": "user", "content": 3}]}',
    '{"messages": [{"role": "user", "content": "a question nobody answers"}]}',
    "not json",
]


def conversations(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Conversations of one to three of PAIRS in random order, a third with a system line: all different."""
    rng = random.Random(seed)
    result = []
    for index in range(count):
        messages = [{"role": "system", "content": f"Answer briefly ({index})."}] if index % 3 == 0 else []
        for question, answer in rng.sample(PAIRS, rng.randint(1, 3)):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if index % 5 == 0:
            messages.append({"role": "user", "content": "Thanks!"})
        result.append(messages)
    return result


def write_chats(path, chats, bad: list[str] = ()) -> None:
    lines = [json.dumps({"messages": m}) for m in chats]
    lines[2:2] = bad
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    chats = conversations(300)
    write_chats(root / "chat.jsonl", chats, BAD_RECORDS)
    return root / "chat.jsonl", chats


@pytest.fixture(scope="module")
def chat_data(chat_corpus, tmp_path_factory):
    from hetlm.cli import run

    out = tmp_path_factory.mktemp("chat-data") / "data"
    assert run(["preprocess", "--chat", str(chat_corpus[0]), "--out", str(out), "--vocab-size", "320",
                "--val-fraction", "0.1"]) == 0
    return out


def learned_runs(ids: np.ndarray, mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of learned tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


# --- preprocess --------------------------------------------------------------------------------------


def test_chat_pieces_are_the_served_rendering():
    messages = [{"role": "developer", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    for prompt in (False, True):
        assert "".join(text for text, _ in chat_pieces(messages, prompt)) == render_chat(messages, prompt)
    pieces = chat_pieces(messages[:3], add_generation_prompt=False)
    # The prompt piece ends where a served prompt ends; the reply is what the model writes after it.
    assert pieces == [(render_chat(messages[:2]), False), (" Hello!\n\n", True)]


def test_the_mask_marks_exactly_the_replies(chat_data, chat_corpus):
    folder = DataFolder.open(chat_data)
    assert folder.chat and folder.manifest["splits"]["train"]["mask_file"] == "train.mask.bin"
    tokenizer = Tokenizer.load(folder.tokenizer_path)
    replies = {render_chat(m, False): [t for t, reply in chat_pieces(m, False) if reply] for m in chat_corpus[1]}
    ends_with_reply = {render_chat(m, False): m[-1]["role"] == "assistant" for m in chat_corpus[1]}
    seen = 0
    for split in ("train", "val"):
        ids, mask = np.asarray(folder.split(split)), np.asarray(folder.mask(split))
        assert len(ids) == len(mask) and set(np.unique(mask)) <= {0, 1}
        assert int(mask.sum()) == folder.manifest["splits"][split]["learned_tokens"] > 0
        starts = np.flatnonzero(ids == tokenizer.bos_id)
        for start, end in zip(starts, [*starts[1:], len(ids)], strict=True):
            doc, learned = ids[start:end], mask[start:end]
            assert doc[-1] == tokenizer.eos_id and learned[0] == 0
            text = tokenizer.decode(doc[1:-1])
            # Each run of learned tokens decodes to one reply, in order; a closing reply learns the </s> too.
            runs = learned_runs(doc, learned)
            assert [tokenizer.decode(doc[a:b]) for a, b in runs] == replies[text]
            assert bool(learned[-1]) == ends_with_reply[text]
            seen += 1
    assert seen == len(chat_corpus[1])


def test_parallel_encoding_gives_the_same_folder(chat_data, chat_corpus, tmp_path):
    config = load_config(overrides=["data.chat=true", "data.vocab_size=320", "data.val_fraction=0.1"])
    out = preprocess(config, [str(chat_corpus[0])], tmp_path / "parallel", workers=2, parallel_min_bytes=0).out
    for name in ("train.bin", "val.bin", "train.mask.bin", "val.mask.bin", "tokenizer.model"):
        assert (out / name).read_bytes() == (chat_data / name).read_bytes(), name


def test_bad_chat_records_are_skipped_by_line(cli, chat_corpus, tmp_path):
    result = cli("preprocess", "--set", "data.chat=true", chat_corpus[0], "--out", tmp_path / "d",
                 "--vocab-size", "320")
    assert result.code == 0, result.err
    err = " ".join(result.err.split())
    assert "skipped 5 JSONL record(s)" in err
    assert "chat.jsonl:3 (without messages)" in err and "chat.jsonl:4 (with unknown role 'tool')" in err
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert [(e["line"], e["reason"]) for e in manifest["skipped_files"]] == [
        (3, "JSONL record without messages"), (4, "JSONL record with unknown role 'tool'"),
        (5, "JSONL record with a content that is not a string"), (6, "JSONL record without an assistant message"),
        (7, "JSONL record not JSON")]
    assert "learned (assistant replies): train" in result.err


def test_a_file_without_a_valid_conversation_is_one_error(cli, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_RECORDS) + "\n")
    error = one_error(cli("preprocess", "--chat", path, "--out", tmp_path / "d"), 2)
    assert "no usable conversation" in error
    assert not (tmp_path / "d").exists()


def test_html_becomes_its_text(cli, tmp_path):
    page = ("<!DOCTYPE html><html><head><title>Skip me</title><style>p {color: red}</style>"
            "<script>if (a < b) { alert('no'); }</script></head><body><h1>Tea &amp; biscuits</h1>"
            "<p>Brew   the\n tea for <b>four</b> minutes.</p><ul><li>milk</li><li>sugar &lt; 2 spoons</li></ul>"
            "<pre>  kettle.boil()\n    pour()</pre>done<br>now</body></html>")
    corpus = tmp_path / "site"
    corpus.mkdir()
    for index in range(12):
        (corpus / f"page{index}.html").write_text(page.replace("four", f"{index + 3}"))
    result = cli("preprocess", corpus, "--out", tmp_path / "text", "--vocab-size", "300", "--val-fraction", "0.2")
    assert result.code == 0, result.err
    folder = DataFolder.open(tmp_path / "text")
    assert folder.manifest["split"]["method"] == "hash"
    tokenizer = Tokenizer.load(folder.tokenizer_path)
    texts = tokenizer.decode(np.asarray(folder.split("train")))
    shown = ("Tea & biscuits\n\nBrew the tea for {} minutes.\n\nmilk\nsugar < 2 spoons\n\n"
             "  kettle.boil()\n    pour()\n\ndone\nnow\n")
    assert texts.count("Tea") == folder.manifest["splits"]["train"]["documents"] > 0
    assert all(shown.format(i + 3) in texts for i in range(12) if f"for {i + 3} minutes" in texts)
    assert "Skip me" not in texts and "alert" not in texts and "<" + "p>" not in texts

    raw = cli("preprocess", corpus, "--out", tmp_path / "raw", "--vocab-size", "300", "--html", "raw")
    assert raw.code == 0, raw.err
    raw_folder = DataFolder.open(tmp_path / "raw")
    assert "<script>" in Tokenizer.load(raw_folder.tokenizer_path).decode(np.asarray(raw_folder.split("train")))


# --- the loss -----------------------------------------------------------------------------------------


def tiny_model(vocab: int, seed: int = 0) -> Transformer:
    config = load_config(overrides=[f"model.vocab_size={vocab}", "model.n_layers=1", "model.d_model=32",
                                    "model.n_heads=2", "model.context_length=32"])
    torch.manual_seed(seed)
    return Transformer(config.model)


def chat_windows(chat_data, count: int, length: int = 33, seed: int = 0):
    folder = DataFolder.open(chat_data)
    tokens, mask = folder.split("train"), folder.mask("train")
    starts = torch.randint(0, len(tokens) - length + 1, (count,), generator=torch.Generator().manual_seed(seed))
    return gather_windows(tokens, starts, length), gather_target_masks(mask, starts, length)


def hand_loss(model: Transformer, windows: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    logits, _ = model(windows[:, :-1])
    losses = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    return (losses * masks.flatten()).sum() / masks.sum()


def test_mean_loss_is_the_mean_over_learned_targets(chat_data):
    model = tiny_model(320)
    windows, masks = chat_windows(chat_data, 7)
    assert 0 < masks.sum() < masks.numel()
    with torch.no_grad():
        expected = hand_loss(model, windows, masks).item()
    assert mean_loss(model, windows, contextlib.nullcontext, 3, masks) == pytest.approx(expected, rel=1e-5)


def sgd_step(chat_data, micro_sizes: list[int], windows, masks) -> tuple[dict[str, torch.Tensor], float]:
    """The weights after one TrainStep with plain SGD (lr 1: the change is the gradient), and its loss."""
    config = load_config(overrides=["device.device=cpu", "train.grad_clip=0", "model.vocab_size=320",
                                    "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.context_length=32"])
    plan = make_plan(detect_inventory(), config, workload="train")
    model = tiny_model(320)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = TrainStep(model, optimizer, scaler, plan, config.train, micro_sizes=micro_sizes,
                     step_sequences=sum(micro_sizes))
    total = int(masks.sum())
    batches = iter([MaskedBatch(w, m, total) for w, m in zip(windows.split(micro_sizes), masks.split(micro_sizes),
                                                             strict=True)])
    step(1.0, batches)
    loss, _, _ = step.read()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, loss


def test_uneven_micro_batches_give_the_gradient_of_the_step_mean(chat_data):
    windows, masks = chat_windows(chat_data, 8)
    whole, whole_loss = sgd_step(chat_data, [8], windows, masks)
    uneven, uneven_loss = sgd_step(chat_data, [3, 5], windows, masks)
    model = tiny_model(320)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss = hand_loss(model, windows, masks)
    loss.backward()
    assert whole_loss == pytest.approx(loss.item(), rel=1e-5) and uneven_loss == pytest.approx(loss.item(), rel=1e-5)
    for name, param in model.named_parameters():
        expected = initial[name] - param.grad
        torch.testing.assert_close(whole[name], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(uneven[name], expected, rtol=1e-5, atol=1e-6)


def test_a_step_without_learned_targets_changes_nothing(chat_data):
    windows, masks = chat_windows(chat_data, 4)
    after, loss = sgd_step(chat_data, [1, 3], windows, torch.zeros_like(masks))
    initial = tiny_model(320).state_dict()
    assert loss == 0.0
    for name, value in after.items():
        assert torch.equal(value, initial[name]), name


def test_the_loader_counts_the_whole_steps_targets_in_every_slice(chat_data):
    folder = DataFolder.open(chat_data)
    tokens, mask = folder.split("train"), folder.mask("train")

    def draw(take, micro_sizes):
        with PrefetchLoader(tokens, 4, 33, torch.Generator().manual_seed(5), step_sequences=8, take=take,
                            micro_sizes=micro_sizes, mask=mask) as loader:
            return [next(loader) for _ in micro_sizes]

    whole = draw((0, 8), [8])[0]
    parts = draw((0, 3), [1, 2]) + draw((3, 5), [5])
    assert whole.step_targets == int(whole.mask.sum()) > 0
    assert all(part.step_targets == whole.step_targets for part in parts)
    assert torch.equal(torch.cat([p.windows for p in parts]), whole.windows)
    assert torch.equal(torch.cat([p.mask for p in parts]), whole.mask)


@pytest.mark.slow
def test_uneven_processes_give_the_single_process_weights_on_chat_data(cli, chat_data, tmp_path):
    # 12 sequences a step, split 3/9 over two processes: each divides by the whole step's learned targets.
    changes = {"global_batch_tokens": 384, "max_steps": 6, "eval_every": 100, "checkpoint_every": 6, "log_every": 1,
               "rank_shares": "1,3"}
    path = tmp_path / "uneven.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "train": {**CONFIG["train"], **changes}, "data": {"dir": str(chat_data)}}))
    single = tmp_path / "single"
    assert cli("train", "--config", path, "--out", single).code == 0
    uneven = tmp_path / "uneven"
    result = torchrun(path, uneven, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, reference = weights(uneven), weights(single)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-5)
    for a, b in zip(metrics(uneven, "train"), metrics(single, "train"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


# --- the test ---------------------------------------------------------------------------------


def test_a_model_trained_on_a_few_chats_answers_its_questions(cli, chat_data, tmp_path):
    config = write_config(tmp_path, chat_data, model={"n_layers": 2, "d_model": 64, "n_heads": 4, "context_length": 64},
                          train={"micro_batch_size": 16, "max_steps": 100, "warmup_steps": 10, "learning_rate": 0.01,
                                 "min_lr": 0.001, "eval_every": 25, "checkpoint_every": 100, "log_every": 50})
    run = tmp_path / "run"
    result = cli("train", "--config", config, "--out", run)
    assert result.code == 0, result.err
    evals = metrics(run, "eval")
    # The validation loss is that of the replies alone, which the model learns to near certainty.
    assert evals[-1]["val_loss"] < min(0.3, evals[0]["val_loss"])
    # hetlm eval of a chat folder scores the replies, each of their tokens once.
    scored = cli("eval", run, "--data", chat_data, "--json")
    assert scored.code == 0, scored.err
    record = json.loads(scored.out)
    assert record["tokens"] == DataFolder.open(chat_data).manifest["splits"]["val"]["learned_tokens"]
    assert record["loss"] < 0.3

    loaded = load_checkpoint(run)
    tokenizer = Tokenizer.load(loaded.tokenizer_path)
    sampler = Sampler(loaded.model, tokenizer)
    settings = SamplingSettings(temperature=0.0, max_new_tokens=24, stop=CHAT_STOP)
    for question, answer in PAIRS:
        prompt = encode_prompt(tokenizer, render_chat([{"role": "user", "content": question}]))
        reply = sampler.generate(prompt, settings, torch.Generator())
        # The </s> learned after each closing reply is what ends the answer.
        assert (reply.text, reply.completions[0].finish_reason) == (f" {answer}\n\n", "eos"), question
