"""`kvjax serve`: load a model once, start the engine, answer OpenAI-style HTTP requests.

    kvjax serve --model NAME_OR_PATH [--host 127.0.0.1] [--port 8000]
                [--dtype float32|bfloat16] [--max-slots 8] [--max-len 512] [--page-size 16]
                [--api-key KEY] [--mesh data=D,model=M] [--chat-template FILE]
                [--speculate prompt-lookup:K | early-exit:LAYERS:K | draft:PATH_OR_NAME:K]
                [--max-waiting 256] [--request-timeout 30] [--allowed-hosts HOST,...]
                [--warmup full|basic|none] [--compilation-cache DIR|none]

Lifecycle: read --chat-template (a Jinja file replacing the checkpoint's chat template;
a bad one fails here, before anything loads), turn on the persistent compilation cache,
load the model (as `kvjax generate` does, through kvjax.load_model), build the engine,
compile every program shape a request can need (--warmup full) so the first clients do
not pay for compilation, then serve with
uvicorn until SIGINT or SIGTERM. On either signal the server stops accepting connections,
lets every request in flight finish (streams included), closes the engine (draining it)
and exits with status 0.

This module imports no web library at import time (`kvjax --help` works without the
`serve` extra); `kvjax serve` without them says what to install.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

from ..cli import UserError

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "kvjax", "xla")
INSTALL_HINT = ("kvjax serve needs fastapi, uvicorn and prometheus-client: "
                "pip install 'kvjax[serve]' (from a checkout: pip install -e '.[serve]')")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..generate_cli import add_chat_template_flag, int_at_least

    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Load a model once and serve it over HTTP with the OpenAI API shapes "
                    "(/v1/completions, /v1/chat/completions, /v1/models, streaming by "
                    "server-sent events), plus /health and /metrics (Prometheus). Requests "
                    "run concurrently through kvjax.Engine (continuous batching, paged KV "
                    "cache, prefix cache). SIGINT/SIGTERM: stop accepting, finish the "
                    "requests in flight, exit 0. Needs the serve extra: "
                    "pip install 'kvjax[serve]'.")
    p.add_argument("--model", required=True, metavar="PATH_OR_NAME",
                   help="a model name (bundled or packaged: kvjax models lists them), a .gguf "
                        "file or a Hugging Face checkpoint folder, as for kvjax generate")
    add_chat_template_flag(p, "for /v1/chat/completions and /tokenize's messages")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists; default: the --model value")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; default %(default)s (this machine only: pass 0.0.0.0 "
                        "to accept other machines, ideally with --api-key)")
    p.add_argument("--port", type=int_at_least(0), default=8000,
                   help="TCP port; 0 picks a free one (printed at start); default %(default)s")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter and activation dtype; default %(default)s")
    p.add_argument("--max-slots", type=int_at_least(1), default=8, metavar="N",
                   help="requests decoded together (engine slots); more wait in a queue; "
                        "default %(default)s")
    p.add_argument("--max-len", type=int_at_least(2), default=512, metavar="N",
                   help="context of one request: prompt + max_tokens tokens; default %(default)s")
    p.add_argument("--page-size", type=int_at_least(1), default=16, metavar="N",
                   help="tokens per KV-cache page; default %(default)s")
    p.add_argument("--num-pages", type=int_at_least(1), default=None, metavar="N",
                   help="pages in the KV pool; default: enough for max-slots x max-len")
    p.add_argument("--speculate", default=None, metavar="SPEC",
                   help="speculative decoding for every request (greedy output unchanged, sampled "
                        "output from the same distribution): prompt-lookup:K (copy K tokens that "
                        "followed the last n-gram's latest earlier occurrence), early-exit:LAYERS:K "
                        "(the model's first LAYERS layers draft K tokens) or draft:PATH_OR_NAME:K "
                        "(a second model sharing the vocabulary, loaded like --model); acceptance "
                        "counts in /metrics (kvjax_engine_spec_*)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not keep and share prompt pages between requests")
    p.add_argument("--api-key", default=os.environ.get("KVJAX_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health and "
                        "/metrics; default: $KVJAX_API_KEY if set, else no key")
    p.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="run the engine on a device mesh: slots over data, kv heads over model "
                        "(the product must equal the number of devices); default: one device")
    # gate.DEFAULT_MAX_REQUEST_BYTES, spelled out: this module imports nothing of the web stack
    p.add_argument("--max-request-bytes", type=int_at_least(1), default=8 * 1024 * 1024,
                   metavar="N", help="largest request body accepted (413 above); default %(default)s")
    _add_guard_flags(p, int_at_least)
    _add_startup_flags(p)
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"),
                   default="info", help="uvicorn's log level; default %(default)s")
    p.set_defaults(func=run)
    return p


def _add_startup_flags(p):
    """What happens before the first request: the warm-up and the compilation cache."""
    p.add_argument("--warmup", choices=("full", "basic", "none"), default="full",
                   help="before serving: full compiles every program shape a request can need (batch "
                        "buckets up to --max-slots, prompt chunks, attention views up to --max-len, with "
                        "and without logprobs), so the first burst is as fast as later ones; basic: "
                        "short prompts at each batch bucket only; default %(default)s")
    p.add_argument("--compilation-cache", default=os.environ.get("KVJAX_COMPILATION_CACHE", DEFAULT_CACHE),
                   metavar="DIR", help="JAX's persistent compilation cache, so a restart skips the warm-up's "
                                       "compiles ('none' to disable); default $KVJAX_COMPILATION_CACHE or "
                                       "%(default)s")


def _add_guard_flags(p, int_at_least):
    """The flags that keep clients from breaking the server: queue bound, timeouts, hosts."""
    p.add_argument("--max-waiting", type=int_at_least(0), default=256, metavar="N",
                   help="requests that may wait for a slot; more get 429 with Retry-After (counted in "
                        "/metrics as kvjax_requests_rejected_total); default %(default)s")
    p.add_argument("--request-timeout", type=float_above_zero, default=30.0, metavar="SECONDS",
                   help="a request's headers, and then its body, must arrive within this (the "
                        "connection is closed, or answered 408); default %(default)s")
    p.add_argument("--allowed-hosts", default=None, metavar="HOST[,HOST...]",
                   help="without --api-key, the only Host/Origin names answered (403 otherwise: a web "
                        "page cannot drive the server) and POST bodies must be JSON; default: "
                        "localhost, 127.0.0.1, ::1 and the --host address; '*' allows any")


def float_above_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def allowed_hosts(text: str | None, host: str) -> tuple:
    """--allowed-hosts as names ('*' kept: any host), default the loopback names and --host."""
    if text is None:
        from .gate import LOOPBACK        # (the web stack is importable once build() runs)

        names = list(LOOPBACK)
        if host not in ("0.0.0.0", "::", ""):
            names.append(host)
        return tuple(names)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UserError(f"--allowed-hosts {text!r}: give host names separated by commas, or '*'")
    return names


def parse_mesh(text: str | None) -> dict | None:
    """'data=2,model=4' -> {'data': 2, 'model': 4}."""
    if text is None:
        return None
    spec = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in ("data", "model") or not value.strip().isdigit() \
                or int(value) < 1 or key in spec:
            raise UserError(f"--mesh {text!r}: expected data=D,model=M with each axis once and "
                            f"sizes >= 1 (e.g. data=2,model=4)")
        spec[key] = int(value)
    return spec


def load_model(spec: str, dtype: str):
    """--model value (anything kvjax.load_model takes: a bundled or packaged name, a .gguf
    file, a checkpoint folder) -> (cfg, params, tokenizer), exactly as `kvjax generate`
    resolves it (generate_cli.resolve_model)."""
    from ..generate_cli import resolve_model

    return resolve_model(spec, dtype)


def build(args):
    """Everything but the listening socket: (app, engine, model_id). Raises UserError."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"{INSTALL_HINT} ({e.name} is missing)") from None
    import kvjax

    from ..engine import Engine
    from .app import create_app

    from ..generate_cli import read_chat_template_arg

    mesh_spec = parse_mesh(args.mesh)
    use_compilation_cache(getattr(args, "compilation_cache", None))
    template = read_chat_template_arg(getattr(args, "chat_template", None))   # before the load
    t0 = time.perf_counter()
    cfg, params, tok = load_model(args.model, args.dtype)
    if template is not None:
        from ..tokenizer import use_chat_template

        use_chat_template(tok, template)
    context = args.max_len
    if cfg.positions == "learned" and context > cfg.max_position:
        raise UserError(f"--max-len {context} exceeds this model's {cfg.max_position} learned "
                        f"positions; pass --max-len {cfg.max_position} or less")
    mesh = None
    if mesh_spec is not None:
        try:
            mesh = kvjax.make_mesh(mesh_spec)       # the engine places the params on it
        except ValueError as e:
            raise UserError(f"--mesh {args.mesh}: {e}") from None
    from ..tokenizer import model_eos_ids
    eos_ids = tuple(model_eos_ids(tok, cfg.vocab_size))
    try:
        speculate = None
        if getattr(args, "speculate", None):
            from ..decode.speculative import parse_speculate

            speculate = parse_speculate(args.speculate, cfg, params,
                                        load=lambda where: load_model(where, args.dtype)[:2])
        engine = Engine(cfg, params, max_slots=args.max_slots, max_len=context,
                        page_size=args.page_size, num_pages=args.num_pages,
                        prefix_cache=not args.no_prefix_cache, mesh=mesh, speculate=speculate)
    except ValueError as e:
        raise UserError(str(e)) from None
    _say(f"loaded {args.model} ({cfg.name}, {cfg.dtype}) and built the engine in "
         f"{time.perf_counter() - t0:.1f} s; warming up ({getattr(args, 'warmup', 'basic')})")
    _warm_up(engine, tok, context, args.max_slots, getattr(args, "warmup", "basic"))
    if getattr(args, "warmup", "basic") == "full":
        _grammar_tokenizer(tok, cfg.vocab_size)
    model_id = args.served_model_name or args.model
    app = create_app(engine, tok, model_id, context=context, vocab_size=cfg.vocab_size,
                     eos_ids=eos_ids, api_key=args.api_key, max_request_bytes=args.max_request_bytes,
                     max_waiting=args.max_waiting, allowed_hosts=allowed_hosts(args.allowed_hosts, args.host),
                     body_timeout=args.request_timeout)
    return app, engine, model_id


def _warm_up(engine, tok, context: int, max_slots: int, mode: str):
    """Compile before serving what clients would otherwise wait for: every program shape
    (full: Engine.warm_up), or the short-prompt prefill and the decode steps at every batch
    size the engine buckets to (basic)."""
    from ..engine import SamplingParams

    t0 = time.perf_counter()
    if mode == "full":
        built = engine.warm_up()
        _say(f"warm-up done in {time.perf_counter() - t0:.1f} s ({built} programs)")
        return
    if mode == "none":
        return
    warm = (tok.encode("Hello") or [0])[: max(1, min(5, context - 2))]
    sp = SamplingParams(max_tokens=2, temperature=0.0)
    for n in sorted({min(1 << i, max_slots) for i in range(max_slots.bit_length() + 1)}):
        engine.generate([warm] * n, sp)
    _say(f"warm-up done in {time.perf_counter() - t0:.1f} s")


def _grammar_tokenizer(tok, vocab_size: int):
    """Build structured output's tokenizer table now (about 0.5 s at a 49k vocabulary, 3-6 s
    at 262k) instead of in the first constrained request; says so when llguidance is missing."""
    t0 = time.perf_counter()
    try:
        from ..structured import tokenizer_info
        tokenizer_info(tok, vocab_size)
    except (ImportError, ValueError) as e:      # no llguidance; a tokenizer without EOS
        _say(f"structured output (response_format, guided_*) is off: {e}")
        return
    _say(f"structured output ready in {time.perf_counter() - t0:.1f} s")


def use_compilation_cache(where: str | None):
    """JAX's persistent compilation cache in `where` (None or 'none': off); every program is
    kept, however fast its compile, so a restart compiles nothing the cache holds."""
    if not where or where == "none":
        return
    import jax

    try:
        os.makedirs(where, exist_ok=True)
    except OSError as e:
        raise UserError(f"--compilation-cache {where}: {e.strerror or e}") from None
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run(args) -> int:
    sock = bind(args.host, args.port)      # before loading anything: a taken port fails at once
    try:
        app, engine, model_id = build(args)
    except BaseException:
        sock.close()
        raise
    import uvicorn

    from .connection import timed_protocol

    config = uvicorn.Config(app, log_level=args.log_level, lifespan="off", timeout_graceful_shutdown=None,
                            http=timed_protocol(args.request_timeout))
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal with the
    # handlers it found. Found handlers that only ask the server to exit make that re-raise
    # harmless, so a drained shutdown exits 0 instead of dying by the signal; and a signal
    # that arrives before uvicorn has installed its own handlers still stops the server (a
    # no-op handler swallowed it, and the server then ran on: seen with SIGTERM sent right
    # after the "serving" line).
    quiet = {s: signal.signal(s, lambda *_: setattr(server, "should_exit", True))
             for s in (signal.SIGINT, signal.SIGTERM)}
    host, port = sock.getsockname()[:2]
    _say(f"serving {model_id!r} on http://{_url_host(host)}:{port}/v1 "
         f"({'API key required' if args.api_key else 'no API key'}); Ctrl-C or SIGTERM to stop")
    try:
        server.run(sockets=[sock])
    finally:
        _say("no more connections; closing the engine")
        engine.close(drain=True)
        sock.close()
        for s, h in quiet.items():
            signal.signal(s, h)
    _say("stopped")
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening); UserError if that is impossible."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise UserError(f"--host {host}: {e}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _say(message: str):
    print(f"kvjax serve: {message}", file=sys.stderr, flush=True)
