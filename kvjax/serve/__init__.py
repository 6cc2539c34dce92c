"""`kvjax serve`: an OpenAI-compatible HTTP server on `kvjax.Engine`.

    kvjax serve --model text            # then: curl http://127.0.0.1:8000/v1/completions ...

Modules: `protocol` (request parsing and validation, OpenAI-style error objects),
`textstream` (incremental detokenization and stop strings), `metrics` (Prometheus
metrics), `app` (the FastAPI app around an engine and a tokenizer: HTTP -> engine ->
stream), `cli` (the `kvjax serve` command: flags, model loading, lifecycle).

The web stack (fastapi, uvicorn, prometheus-client) is the optional extra
`pip install -e ".[serve]"`; importing `kvjax.serve.cli` works without it, so that
`kvjax --help` lists the command everywhere, and `kvjax serve` says what to install.
"""
