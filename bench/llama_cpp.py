"""hetlm's GGUF export against llama.cpp itself: token ids, next-token probabilities and greedy tokens.

llama.cpp is not built here: node-llama-cpp ships it prebuilt for the CPU, so ``npm install`` is all it
takes (about 700 MB in node_modules). The script preprocesses 300 KB of the stdlib at 512 pieces, trains
two tiny models for 150 steps (tied with 4 query and 2 key/value heads; untied with 4 and 1 and a
feed-forward width of 100, which q8_0 cannot quantize), deploys each with ``--format gguf`` in fp32,
fp16 and q8_0, and has llama.cpp (bench/llama_cpp.mjs) tokenize a set of adversarial texts, score windows
of them position by position and continue three prompts greedily. Prints one JSON object: per model and
dtype, how many texts got hetlm's ids, the largest difference of a probability (and of a log-probability
above 1e-4), how many argmaxes agree, and how many greedy continuations are the same.

    .venv/bin/python bench/llama_cpp.py                          # installs node-llama-cpp under the work folder
    .venv/bin/python bench/llama_cpp.py --node-modules ~/llama/node_modules
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from hetlm.config import load_config
from hetlm.data import sample_windows
from hetlm.deploy import deploy
from hetlm.model import Transformer
from hetlm.preprocess import preprocess, stdlib_root
from hetlm.store import Checkpoint, RunDir, open_split
from hetlm.tokenizer import Tokenizer

NODE_LLAMA_CPP = "node-llama-cpp@3.22.1"
TEXTS = [
    "def f(x):\n    if x:\n        return 1\n\treturn 2\n",
    "    leading spaces",
    "trailing spaces   \n   \n",
    "a  b   c    d\t\te\t \tf",
    "\n\n\n\nempty lines\n\n",
    "windows\r\nline\r\nends\r\n",
    "中文文本，日本語のテキスト，한국어 텍스트",
    "emoji 😀🎉👩‍👩‍👧‍👦 flags 🇫🇷 skin 👍🏽",
    "combining é vs é, ligature ﬁ, fullwidth Ａ, NBSP\u00a0here, zero-width\u200bjoiner",
    "unseen: ᚠᛇᚻ ⠁⠃⠉ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010fffd \ue000",
    "control <s> </s> <pad> <unk> literal pieces",
    "▁ U+2581, the character SentencePiece uses for spaces: ▁▁ x▁y ▁",
    "nul\x00and\x07bell\x1b[0m",
    " ",
    "   three leading spaces, then  two",
    "import os\n\n\ndef main():\n    print(os.getcwd())\n",
    "x",
]
PROMPTS = ["def main(", "import os\n", "class "]
MODELS = {
    "tied, 4/2 heads": ["model.tie_embeddings=true", "model.n_kv_heads=2"],
    "untied, 4/1 heads, d_ff 100": ["model.tie_embeddings=false", "model.n_kv_heads=1", "model.d_ff=100"],
}
CONTEXT = 64


def train(data: Path, overrides: list[str], run: Path, steps: int = 150) -> Transformer:
    config = load_config(overrides=[f"data.dir={data}", "data.vocab_size=512", "model.vocab_size=512", "model.n_layers=2",
                                    "model.d_model=64", "model.n_heads=4", f"model.context_length={CONTEXT}", *overrides])
    torch.manual_seed(0)
    model = Transformer(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens, generator = open_split(data, "train"), torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = sample_windows(tokens, 16, CONTEXT + 1, generator)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    Checkpoint.write(RunDir(run).checkpoint_path(steps), model, config, data / "tokenizer.model",
                     info={"step": steps, "val_loss": float(loss.detach())})
    return model


def reference(model: Transformer, tokenizer: Tokenizer) -> dict[str, object]:
    """hetlm's ids, per-position probabilities over windows of <s> + each text, and greedy continuations."""
    windows = [[tokenizer.bos_id, *tokenizer.encode(text)][:CONTEXT] for text in TEXTS]
    with torch.no_grad():
        probs = [p for ids in windows for p in torch.softmax(model(torch.tensor([ids]))[0][0].double(), -1).tolist()]
        greedy = []
        for prompt in PROMPTS:
            sequence = [tokenizer.bos_id, *tokenizer.encode(prompt)]
            start = len(sequence)
            while len(sequence) < start + 40:
                sequence.append(int(model(torch.tensor([sequence]))[0][0, -1].argmax()))
            greedy.append({"prompt": sequence[:start], "tokens": sequence[start:]})
    return {"ids": [tokenizer.encode(text) for text in TEXTS], "windows": windows, "probs": probs, "greedy": greedy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node-modules", type=Path, help="a node_modules folder holding node-llama-cpp")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="hetlm-llama-cpp-") as tmp:
        work = Path(tmp)
        corpus, size = work / "corpus", 0
        corpus.mkdir()
        for path in sorted(stdlib_root().glob("*.py")):
            text = path.read_text(encoding="utf-8")
            if size + len(text) <= 300_000 and len(text) <= 40_000:
                (corpus / path.name).write_text(text, encoding="utf-8")
                size += len(text)
        data = preprocess(load_config(overrides=["data.vocab_size=512", "data.val_fraction=0.1"]), [str(corpus)],
                          work / "data", workers=1).out
        tokenizer = Tokenizer.load(data / "tokenizer.model")
        ref: dict[str, object] = {"texts": TEXTS, "context": CONTEXT, "models": {}}
        for index, (name, overrides) in enumerate(MODELS.items()):
            run = work / f"run-{index}"
            entry = reference(train(data, overrides, run), tokenizer)
            entry["gguf"] = {dtype: str(deploy(run, work / f"bundle-{index}-{dtype}", dtype=dtype, output_format="gguf")
                                        / "model.gguf") for dtype in ("fp32", "fp16", "q8_0")}
            ref["models"][name] = entry
        (work / "ref.json").write_text(json.dumps(ref), encoding="utf-8")
        script = work / "llama_cpp.mjs"
        shutil.copyfile(Path(__file__).with_name("llama_cpp.mjs"), script)
        if args.node_modules:
            (work / "node_modules").symlink_to(args.node_modules.resolve())
        else:
            subprocess.run(["npm", "install", "--prefix", str(work), "--no-audit", "--no-fund", NODE_LLAMA_CPP],
                           check=True, stdout=subprocess.DEVNULL)
        result = subprocess.run(["node", str(script), str(work / "ref.json")], check=True, capture_output=True, text=True)
    print(json.dumps(json.loads(result.stdout.strip().splitlines()[-1]), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
