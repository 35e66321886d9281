"""``hetlm serve``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from hetlm.cli.app import app, examples
from hetlm.cli.loading import load_for_inference
from hetlm.cli.options import SetOption, key_help
from hetlm.cli.render import RichReporter, stderr
from hetlm.errors import HetlmError, UsageError

try:
    from hetlm.serve.app import create_app, run_server
except ImportError as missing:  # FastAPI and uvicorn are the optional `serve` extra
    SERVE_MISSING: ImportError | None = missing
else:
    SERVE_MISSING = None

# The model's shape and tokenizer come with the weights; only these sections may be overridden when serving.
SERVE_OVERRIDABLE = ("serve", "sample", "device")
API_KEY_ENV = "HETLM_API_KEY"
TargetArgument = Annotated[Path, typer.Argument(help="A run folder, a checkpoint folder or a bundle.", show_default=False)]


@app.command("serve", epilog=examples(
    "hetlm serve bundles/tiny",
    "hetlm serve runs/tiny --port 8080 --max-concurrency 4",
    "hetlm serve bundles/tiny --model-name tiny --set sample.temperature=0.7",
))
def serve_command(
    target: TargetArgument,
    host: Annotated[Optional[str], typer.Option("--host", help=key_help("serve.host"),
                                                show_default=False)] = None,
    port: Annotated[Optional[int], typer.Option("--port", help=key_help("serve.port"),
                                                show_default=False)] = None,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", help=f"Clients must send 'Authorization: Bearer KEY'. Visible to anyone who can list processes: "
                          f"prefer ${API_KEY_ENV} or --api-key-file.", show_default=False)] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(
        "--api-key-file", help="Read the API key from this file (its first line).", show_default=False)] = None,
    max_concurrency: Annotated[Optional[str], typer.Option(
        "--max-concurrency", help=key_help("serve.max_concurrency"), show_default=False)] = None,
    model_name: Annotated[Optional[str], typer.Option(
        "--model-name", help="The model id clients ask for \\[default: the target folder's name].", show_default=False)] = None,
    set_: SetOption = None,
) -> None:
    """Serve a run, checkpoint or bundle over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).

    serve.*, sample.* and device.* settings come from the model's saved config; --set overrides them, and
    --host, --port and --max-concurrency override both.
    """
    if SERVE_MISSING is not None:
        raise HetlmError(f"hetlm serve needs FastAPI and uvicorn ({SERVE_MISSING}): pip install 'hetlm[serve]'")
    key = resolve_api_key(api_key, api_key_file)
    # The options are settings too, folded in before planning: the plan sizes the KV cache for the slots served.
    options = {"host": host, "port": port, "max_concurrency": max_concurrency}
    assignments = [*(set_ or []), *(f"serve.{k}={v}" for k, v in options.items() if v is not None)]
    loaded, config, plan = load_for_inference(target, assignments, SERVE_OVERRIDABLE, "serve")
    serve = config.serve
    name = model_name or Path(target).resolve().name
    app_ = create_app(loaded, plan, serve=serve, sample=config.sample, api_key=key, model_name=name)
    # No progress bars here: the reporter only prints the startup lines and warnings.
    reporter = RichReporter()
    weights = ", int8 weights" if plan.decode_weights == "int8" else ""
    engine = app_.state.engine
    how = "one batched step" if serve.batching == "on" else "stepped in turn (serve.batching=off)"
    # Whole lines, however narrow the terminal: scripts read them.
    for line in (f"{name} on {plan.device} ({plan.dtype}{weights}): {engine.slots} sequences at once, {how}; "
                 f"{serve.max_queue} requests queued at most", f"slots: {app_.state.slots_reason}"):
        stderr.print(line, highlight=False, markup=False, soft_wrap=True)
    run_server(app_, serve.host, serve.port, reporter)


def resolve_api_key(given: str | None, path: Path | None) -> str | None:
    """The key from --api-key, --api-key-file or $HETLM_API_KEY, in that order; giving both options is an error."""
    if given is not None and path is not None:
        raise UsageError("give the API key one way: --api-key or --api-key-file")
    if path is None:
        return given if given is not None else os.environ.get(API_KEY_ENV) or None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"API key file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the API key file {path}: {exc}") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise UsageError(f"the API key file {path} is empty")
    return key
