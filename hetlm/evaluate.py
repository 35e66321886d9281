"""Evaluation: loss, perplexity and bits per byte of a model on a token stream, every token scored once.

The stream is a data split (``<s>`` ids ``</s>`` per document) or text files tokenized the same way.
Token ``t[i]`` for ``i >= 1`` is predicted from the tokens before it inside a window of at most
``context_length`` inputs; ``t[0]`` has no left context and is not scored. Windows start every
``stride`` tokens (``stride = context_length`` by default: non-overlapping); a window scores only the
targets no earlier window scored, so with a smaller stride those get more left context and every
target is still scored exactly once.

Bits per byte divides the total NLL in bits by the UTF-8 bytes of the scored tokens' text, counted
exactly per token (a byte-fallback piece is one byte, ``<s>``/``</s>`` are none), so models with
different tokenizers compare on the same text.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from hetlm.errors import UsageError
from hetlm.model import Transformer
from hetlm.reporting import NullReporter, Reporter

if TYPE_CHECKING:
    from hetlm.planner import Plan
    from hetlm.tokenizer import Tokenizer


@dataclass
class EvalResult:
    # What was scored: "val", "train" or "text".
    source: str
    # Data folder or text files.
    inputs: list[str]
    checkpoint: str
    # Scored targets (the stream's first token has no context and is not scored).
    tokens: int
    bytes: int
    # Sum of the targets' negative log-likelihoods in nats.
    nll: float
    # Mean NLL per token (nats) and its exponential.
    loss: float
    perplexity: float
    bits_per_byte: float
    # Characters of the scored text, known for --text only.
    chars: int | None
    bits_per_char: float | None
    context_length: int
    stride: int
    windows: int
    seconds: float
    tokens_per_second: float
    device: str
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id contributes to decoded text: byte pieces 1, control pieces 0."""
    processor = tokenizer.processor
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        if processor.IsControl(i):
            continue
        if processor.IsByte(i):
            lengths[i] = 1
        elif processor.IsUnknown(i):
            lengths[i] = len(processor.Decode([i]).encode("utf-8"))
        else:
            lengths[i] = len(processor.IdToPiece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths


def bits_per_byte(nll: float, n_bytes: int) -> float:
    """Total NLL (nats) over the UTF-8 bytes of the scored targets' text, in bits per byte."""
    return nll / math.log(2) / n_bytes if n_bytes else float("nan")


def count_bytes(tokens: np.ndarray, lengths: np.ndarray, chunk: int = 1 << 24) -> int:
    """Bytes of the text of ``tokens``, in chunks so a large memmap is never copied whole."""
    return int(sum(lengths[np.asarray(tokens[i : i + chunk], dtype=np.int64)].sum() for i in range(0, len(tokens), chunk)))


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, first) per window: inputs ``t[start:end]``, targets ``t[start+1:end+1]``, of which
    those from input offset ``first`` on are scored. Every target 1..n_tokens-1 is scored exactly once."""
    if not 0 < stride <= context:
        raise UsageError(f"stride must be between 1 and the context length {context}, got {stride}")
    last = n_tokens - 1  # index of the last target
    scored = 0  # targets 1..scored are done
    start = 0
    while scored < last:
        end = min(start + context, last)
        yield start, end, scored - start
        scored = end
        start += stride


def score_tokens(model: Transformer, tokens: np.ndarray, stride: int = 0, batch_size: int = 8, plan: Plan | None = None,
                 reporter: Reporter = NullReporter(), learned: np.ndarray | None = None) -> tuple[float, int, int]:
    """(total NLL in nats, targets scored, windows) of ``tokens``; ``stride`` 0 = non-overlapping windows.

    With ``learned`` (a chat folder's loss mask, one per token) only the targets it marks are scored.
    """
    context = model.config.context_length
    stride = stride or context
    # Windows go in at the embedding's device; the scores are summed where the logits come out.
    device = model.output_device
    autocast = plan.autocast if plan is not None else contextlib.nullcontext
    if plan is not None:
        plan.prepare_model(model)
    spans = list(windows(len(tokens), context, stride))
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    reporter.start("eval", total=len(tokens) - 1, unit="tok")
    was_training = model.training
    model.eval()
    try:
        # Windows of equal length share a batch; only the last one or two can be shorter.
        for group in _batches(spans, batch_size):
            length = group[0][1] - group[0][0]
            rows = np.stack([np.asarray(tokens[s : e + 1], dtype=np.int64) for s, e, _ in group])  # (B, length + 1)
            batch = torch.from_numpy(rows).to(device, non_blocking=True)
            first = torch.tensor([f for _, _, f in group], device=device)
            mask = torch.arange(length, device=device)[None, :] >= first[:, None]  # (B, length)
            if learned is not None:
                rows = np.stack([np.asarray(learned[s + 1 : e + 1]) != 0 for s, e, _ in group])
                mask &= torch.from_numpy(rows).to(device)
            with torch.inference_mode(), autocast():
                logits, _ = model(batch[:, :-1])
                nll = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
                total += (nll.view(len(group), length) * mask).sum(dtype=torch.float64)
            done = sum(e - s - f for s, e, f in group)
            count += done if learned is None else int(mask.sum())
            reporter.advance("eval", done)
    finally:
        model.train(was_training)
        reporter.finish("eval")
    return float(total.item()), count, len(spans)


def _batches(spans: Sequence[tuple[int, int, int]], size: int) -> Iterator[list[tuple[int, int, int]]]:
    group: list[tuple[int, int, int]] = []
    for span in spans:
        if group and (len(group) == size or span[1] - span[0] != group[0][1] - group[0][0]):
            yield group
            group = []
        group.append(span)
    if group:
        yield group


def text_tokens(tokenizer: Tokenizer, files: Sequence[str | Path]) -> tuple[np.ndarray, int, int]:
    """Token stream of ``files`` (each as ``<s>`` ids ``</s>``), with their UTF-8 bytes and characters."""
    ids: list[int] = []
    size = chars = 0
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"text file not found: {path}")
        raw = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            # The text's own bytes count for bits per byte, not the compressed file's.
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as exc:
                raise UsageError(f"{path} is not a readable gzip file ({exc})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path} is not UTF-8 text (byte {exc.start})") from None
        if not text:
            raise UsageError(f"{path} is empty: nothing to evaluate")
        ids += [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
        size += len(raw)
        chars += len(text)
    if not ids:
        raise UsageError("no text files given")
    return np.asarray(ids, dtype=np.int64), size, chars


def evaluate(model: Transformer, tokenizer: Tokenizer, tokens: np.ndarray, *, source: str, inputs: list[str],
             checkpoint: str, stride: int = 0, max_tokens: int = 0, batch_size: int = 8, plan: Plan | None = None,
             chars: int | None = None, reporter: Reporter = NullReporter(),
             learned: np.ndarray | None = None) -> EvalResult:
    """Score ``tokens`` (only its first ``max_tokens`` targets when given) and compute the metrics.

    ``chars`` is the scored text's length in characters when the whole stream is evaluated (bits per char).
    With ``learned``, a chat folder's loss mask, only the replies are scored, as training's validation does, and
    bits per byte are over the replies' bytes.
    """
    if max_tokens and max_tokens + 1 < len(tokens):
        tokens = tokens[: max_tokens + 1]
        chars = None
        if learned is not None:
            learned = learned[: max_tokens + 1]
    if learned is not None and not np.any(learned[1:]):
        raise UsageError(f"{source}: no assistant reply to score")
    if len(tokens) < 2:
        raise UsageError(f"{source}: {len(tokens)} token(s) is too little to evaluate (at least 2 are needed)")
    context = model.config.context_length
    if stride > context:
        raise UsageError(f"--stride {stride} is larger than the model's context length {context}")
    device = str(model.output_device)
    dtype = plan.dtype if plan is not None else "fp32"
    reporter.info(f"scoring {len(tokens) - 1:,} tokens ({source}) with {checkpoint or 'the model'} on {device} ({dtype})")
    started = time.perf_counter()
    nll, count, n_windows = score_tokens(model, tokens, stride, batch_size, plan, reporter, learned)
    seconds = time.perf_counter() - started
    targets = tokens[1:] if learned is None else np.asarray(tokens[1:])[np.asarray(learned[1:]) != 0]
    size = count_bytes(targets, token_byte_lengths(tokenizer))
    loss = nll / count
    bits = nll / math.log(2)
    return EvalResult(
        source=source,
        inputs=inputs,
        checkpoint=checkpoint,
        tokens=count,
        bytes=size,
        nll=nll,
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=bits_per_byte(nll, size),
        chars=chars,
        bits_per_char=bits / chars if chars else None,
        context_length=context,
        stride=stride or context,
        windows=n_windows,
        seconds=seconds,
        tokens_per_second=count / seconds if seconds > 0 else 0.0,
        device=device,
        dtype=dtype,
    )
