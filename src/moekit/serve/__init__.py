"""``moekit serve``: an OpenAI-compatible HTTP server with continuous batching.

    protocol.py   the OpenAI request/response shapes and the error body
    backend.py    what the scheduler needs from a model: prefill a slot, decode slots, release
    routing.py    which experts each token used (router hooks) and the server-wide MoE load
    text.py       generated ids -> streamed text pieces, cut at stop strings
    scheduler.py  the engine loop: admit, prefill, one batched decode step, retire
    app.py        the FastAPI endpoints and server-sent events
    cli.py        ``moekit serve MODEL ...``

FastAPI and uvicorn are an optional extra (``pip install moekit[serve]``): only app.py and
cli.py's server start import them, so the rest of moekit never needs them.
"""
