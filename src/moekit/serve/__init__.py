"""``moekit serve``: an OpenAI-compatible HTTP server with continuous batching.

    protocol.py   the OpenAI request/response shapes and the error body
    scheduler.py  the engine thread: a bounded queue, limits and cancellation around
                  ``inference.Engine`` (KV slots, batched prefill/decode, sampling, stop strings)
    routing.py    MoE telemetry: experts per request (usage.moe) and load since start
    app.py        the FastAPI endpoints and server-sent events
    cli.py        ``moekit serve MODEL ...``

FastAPI and uvicorn are an optional extra (``pip install moekit[serve]``): only app.py and
cli.py's server start import them, so the rest of moekit never needs them.
"""
