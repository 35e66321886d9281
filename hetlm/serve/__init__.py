"""``hetlm serve``: an OpenAI-compatible HTTP API over one loaded model.

``engine`` runs the generations (no web framework, so it can be used and tested on its own),
``protocol`` is OpenAI's API as this server speaks it (request bodies, parameters, responses and
stream chunks), and ``app`` is the FastAPI application and ``run_server``. Nothing is imported here,
so ``hetlm.serve.engine`` works without FastAPI installed.
"""
