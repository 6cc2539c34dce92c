"""`kvjax serve`: an OpenAI-compatible HTTP server on `kvjax.Engine`.

    kvjax serve --model text            # then: curl http://127.0.0.1:8000/v1/completions ...

Modules, in the order a request meets them: `cli` (the `kvjax serve` command: flags, model
loading, lifecycle), `app` (`create_app`: the FastAPI app around an engine and a tokenizer,
its error handlers), `gate` (API key, body size, per-route counts, before parsing),
`routes` (one plain handler per route; the `ServerState` comes by dependency injection),
`protocol` (request parsing and validation, OpenAI-style error objects), `generation`
(`ServerState`; one prompt in the engine, seen from the event loop), `textstream`
(incremental detokenization and stop strings), `tools` (tool calls: checks, forced-call
schemas, parsing), `responses` (answer bodies, server-sent
event streams, logprobs objects), `metrics` (Prometheus metrics).

The web stack (fastapi, uvicorn, prometheus-client) is the optional extra
`pip install -e ".[serve]"`; importing `kvjax.serve.cli` works without it, so that
`kvjax --help` lists the command everywhere, and `kvjax serve` says what to install.
"""
