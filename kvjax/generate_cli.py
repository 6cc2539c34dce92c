"""`kvjax generate`: continue a prompt with a local checkpoint and report how fast it ran.

    kvjax generate --model PATH --prompt "Once upon a time" [--max-new-tokens 64]
                   [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0] [--no-cache]
                   [--dtype float32|bfloat16] [--chat [--system TEXT] [--chat-template FILE]]

With --chat the prompt is one user message (after an optional --system message) rendered
by the checkpoint's chat template (`Tokenizer.apply_chat_template`, generation prompt
added), or by the Jinja file --chat-template names (read and parsed before the model
loads; it implies --chat); without it the prompt is encoded as plain text. Generation
stops at any of the checkpoint's end-of-sequence ids (generation_config.json's `eos_token_id`, an int or a
list such as Llama 3's <|end_of_text|> and <|eot_id|>).

The continuation goes to stdout; the report (prompt tokens, new tokens, prefill ms,
decode tokens/s, KV cache bytes) goes to stderr, so the text can be piped on its own.

Two phases are timed separately: prefill (the prompt in one pass, which yields the first
new token) and decode (the remaining tokens, one `kvjax.generate` call: a single jitted
`lax.scan`). With `--timing warm` (the default) the whole generation runs twice and the
second, warm run is the one timed (same inputs, same tokens; the first compiled the
programs and paid every other one-time cost). With `--timing first` only one run is made
and the report says its figures include first-call costs; JAX's compile time
(`jax.monitoring`) is shown apart either way.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import numpy as np

from .cli import UserError

def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="continue a prompt with a local checkpoint",
        description="Continue PROMPT with a local checkpoint folder (Hugging Face format: "
                    "config.json, *.safetensors, and tokenizer.json or kvjax_tokenizer.json). "
                    "Prints the continuation on stdout and a timing report on stderr.")
    p.add_argument("--model", required=True, metavar="PATH_OR_NAME",
                   help="a model name (bundled or packaged: kvjax models lists them), a .gguf file, "
                   "or a Hugging Face checkpoint folder (model_type: " + ", ".join(_model_types()) + ")")
    p.add_argument("--prompt", required=True, help="text to continue (encoded with the "
                   "checkpoint's tokenizer, special tokens such as BOS included)")
    p.add_argument("--chat", action="store_true",
                   help="treat PROMPT as a user message and render it with the checkpoint's chat "
                        "template (plus the assistant's generation prompt)")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="a system message placed before the user message (implies --chat)")
    add_chat_template_flag(p, "(implies --chat)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=64, metavar="N",
                   help="tokens to generate (fewer if the model emits one of its end-of-sequence "
                        "ids); default %(default)s")
    p.add_argument("--temperature", type=_float_range(0.0, math.inf), default=0.0,
                   metavar="T", help="sampling temperature; 0 (the default) means greedy (argmax)")
    p.add_argument("--top-k", type=int_at_least(0), default=0, metavar="K",
                   help="sample only among the K most likely tokens; 0 (the default) disables")
    p.add_argument("--top-p", type=_float_range(0.0, 1.0, low_open=True), default=1.0,
                   metavar="P", help="sample only from the smallest set of tokens whose "
                   "probability reaches P (nucleus); 1 (the default) disables")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="random seed for sampling (same seed, same text); default %(default)s")
    p.add_argument("--no-cache", action="store_true",
                   help="baseline without a KV cache: re-run the model over the whole prefix "
                        "for every new token (slower, same tokens)")
    p.add_argument("--timing", choices=("warm", "first"), default="warm",
                   help="warm: generate twice and time the second (warm) run, the honest speed "
                        "of the compiled program; first: one run, whose figures include "
                        "first-call costs (say a long generation on a big model); default %(default)s")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter and activation dtype the checkpoint is converted to "
                        "(softmax and norms run in float32 either way); default %(default)s")
    p.set_defaults(func=run)

    def error(message):  # one line on stderr and exit 2, like cli.UserError
        print(f"kvjax generate: error: {message} (see kvjax generate --help)", file=sys.stderr)
        sys.exit(2)

    p.error = error
    return p


def add_chat_template_flag(p, note: str) -> None:
    """`--chat-template FILE` (shared with `kvjax serve`)."""
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help=f"a Jinja chat-template file used instead of the checkpoint's (for models "
                        f"that ship none, e.g. the base model gemma3-270m) {note}")


def read_chat_template_arg(file):
    """--chat-template FILE -> its text (None without the flag); UserError naming the file,
    and the line and problem of a template that does not parse. Called before the model loads."""
    if file is None:
        return None
    from .tokenizer import read_chat_template

    try:
        return read_chat_template(file)
    except ValueError as e:
        raise UserError(f"--chat-template {e}") from None


def int_at_least(low: int):
    """An argparse `type`: an integer >= low (shared with `kvjax serve`'s flags)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _float_range(low: float, high: float, low_open: bool = False):
    """A finite float in [low, high] ((low, high] with low_open); high may be inf."""
    if math.isinf(high):
        rule = f">= {low:g}"
    else:
        rule = f"in {'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            raise argparse.ArgumentTypeError(f"must be finite and {rule}, got {text}")
        return value
    return parse


def _model_types():
    from .hf import SUPPORTED_MODEL_TYPES
    return SUPPORTED_MODEL_TYPES


def _bundled():
    from .bundled import bundled_names
    return bundled_names()


def resolve_model(spec: str, dtype: str):
    """--model value -> (cfg, params, tokenizer). The one place that knows where models come from.

    Whatever kvjax.load_model takes: a bundled model's name (e.g. "text"), a packaged model's
    name (kvjax.models.PACKAGED, e.g. "smollm2-135m-instruct"), a .gguf file or a checkpoint folder.
    """
    from .models import PACKAGED, load_model

    if spec not in PACKAGED and spec not in _bundled() and not Path(spec).expanduser().exists():
        raise UserError(f"--model {spec}: no such file or folder, and not a model name "
                        f"({', '.join([*_bundled(), *PACKAGED])}; see kvjax models)")
    try:
        return load_model(spec, dtype=dtype)
    except (ValueError, FileNotFoundError, ImportError) as e:  # CheckpointError is a ValueError
        raise UserError(f"--model {spec}: {e}") from None


def run(args) -> int:
    template = read_chat_template_arg(args.chat_template)
    cfg, params, tok = resolve_model(args.model, args.dtype)
    if template is not None:
        from .tokenizer import use_chat_template

        use_chat_template(tok, template)
    if args.chat or args.system is not None or template is not None:
        _check_has_template(tok)
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        messages.append({"role": "user", "content": args.prompt})
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise UserError(f"--chat: {e}") from None
    else:
        ids = tok.encode(args.prompt)
    if not ids:
        raise UserError("--prompt encodes to no tokens; give some text")
    if max(ids) >= cfg.vocab_size:
        raise UserError(f"the tokenizer produced id {max(ids)}, outside the model's vocabulary "
                        f"[0, {cfg.vocab_size}); tokenizer and checkpoint do not belong together")
    total = len(ids) + args.max_new_tokens
    if cfg.positions == "learned" and total > cfg.max_position:
        raise UserError(f"prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} = "
                        f"{total} positions, but this model has max_position={cfg.max_position}")
    from .tokenizer import model_eos_ids
    eos_ids = model_eos_ids(tok, cfg.vocab_size)
    result = decode(cfg, params, ids, args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_ids=eos_ids,
                    use_cache=not args.no_cache, timing=args.timing)
    print(tok.decode(result["tokens"]), flush=True)
    print(report(cfg, args, result), file=sys.stderr)
    return 0


def _check_has_template(tok) -> None:
    from .tokenizer import ByteTokenizer

    if getattr(tok, "chat_template", "") is None and not isinstance(tok, ByteTokenizer):
        raise UserError("--chat: this model has no chat template (a base model?); pass "
                        "--chat-template FILE, or drop --chat to continue the prompt as plain text")


def decode(cfg, params, ids, max_new_tokens, *, temperature=0.0, top_k=0, top_p=1.0, seed=0,
           eos_ids=(), use_cache=True, timing="warm") -> dict:
    """Generate after one prompt, timing prefill and decode apart.

    timing="warm" runs the generation twice and reports the second run (the first one's
    compile time is kept in compile_s); "first" reports the only run. Returns tokens (new
    ids, cut before the first EOS), prefill_s, decode_s (compile time excluded),
    decode_steps, compile_s, compiles, cache_bytes, timed ("warm" | "first") and whether
    this JAX reports compile events (compile_seen).
    """
    if timing not in ("warm", "first"):
        raise ValueError(f"timing must be 'warm' or 'first', got {timing!r}")
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_ids=eos_ids,
              use_cache=use_cache)
    first = _decode_once(cfg, params, ids, max_new_tokens, **kw)
    if timing == "first":
        return {**first, "timed": "first"}
    warm = _decode_once(cfg, params, ids, max_new_tokens, **kw)
    if warm["tokens"] != first["tokens"]:
        raise RuntimeError("the warm rerun produced different tokens than the first run")
    return {**warm, "compile_s": first["compile_s"] + warm["compile_s"],
            "compiles": first["compiles"] + warm["compiles"], "timed_compiles": warm["compiles"],
            "timed": "warm"}


def _decode_once(cfg, params, ids, max_new_tokens, *, temperature, top_k, top_p, seed, eos_ids,
                 use_cache) -> dict:
    from . import cache as cache_lib
    from .decode import forward, generate, prefill
    from .timing import compile_watch

    key = jax.random.key(seed)
    prompt = np.asarray([ids], np.int32)
    n = len(ids)
    knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=list(eos_ids) or None)
    jax.block_until_ready(params)

    # Prefill: the prompt in one pass; its last logits give the first new token.
    with compile_watch() as t_prefill:
        if use_cache:
            cache = cache_lib.init_cache(cfg, 1, n + max_new_tokens)
            logits, cache = prefill(cfg, params, prompt, np.array([n], np.int32), cache)
        else:
            cache = None
            logits = forward(cfg, params, prompt)[:, -1]
        first = int(_sample(logits, jax.random.fold_in(key, 0), temperature, top_k, top_p)[0])
    tokens = [first]
    steps = max_new_tokens - 1
    out_cache = cache
    with compile_watch() as t_decode:
        if steps and first not in eos_ids:
            if use_cache:
                out = generate(cfg, params, np.array([[first]], np.int32), max_new_tokens=steps,
                               key=jax.random.fold_in(key, 1), cache=cache, **knobs)
                out_cache = out.cache
                steps = int(out.lengths[0])     # the loop stops once the row has ended (EOS)
            else:
                out = generate(cfg, params, np.asarray([ids + [first]], np.int32),
                               max_new_tokens=steps, key=jax.random.fold_in(key, 1),
                               use_cache=False, **knobs)
            tokens += np.asarray(out.tokens)[0, : int(out.lengths[0])].tolist()
        else:
            steps = 0
    for i, t in enumerate(tokens):
        if t in eos_ids:
            tokens = tokens[:i]
            break
    return {"tokens": tokens, "prompt_tokens": n,
            "prefill_s": t_prefill.wall_s - t_prefill.compile_s,
            "decode_s": t_decode.wall_s - t_decode.compile_s, "decode_steps": steps,
            "compile_s": t_prefill.compile_s + t_decode.compile_s,
            "compiles": t_prefill.compiles + t_decode.compiles,
            "compile_seen": t_prefill.seen,
            "cache_bytes": 0 if out_cache is None else int(out_cache.nbytes)}


def report(cfg, args, r) -> str:
    mode = "no cache (re-runs the prefix per token)" if args.no_cache else "KV cache"
    rate = (f"{r['decode_steps'] / r['decode_s']:,.1f} tokens/s ({r['decode_steps']} steps)"
            if r["decode_steps"] and r["decode_s"] > 0 else "n/a (no decode steps)")
    if r["timed"] == "warm":
        timed = "timings of a warm second run (the first compiled and warmed up)"
    else:
        timed = "timings of the first run: they include first-call costs (compilation excluded)"
    if r["compile_seen"]:
        compile_note = f"{r['compile_s'] * 1e3:,.0f} ms in {r['compiles']} compilation(s), excluded from the timings"
        if r["timed"] == "warm":
            compile_note += f" ({r.get('timed_compiles', 0)} in the timed run)"
    else:
        compile_note = "not reported by this JAX version: first-run timings include it"
    return "\n".join([
        f"--- kvjax generate: {cfg.name} ({cfg.dtype}, {mode}, {jax.default_backend()}); {timed}",
        f"prompt tokens  {r['prompt_tokens']}",
        f"new tokens     {len(r['tokens'])}",
        f"prefill        {r['prefill_s'] * 1e3:,.1f} ms",
        f"decode         {rate}",
        f"KV cache       {r['cache_bytes']:,} bytes",
        f"compile        {compile_note}",
    ])


_sample_jit = None


def _sample(logits, key, temperature, top_k, top_p):
    global _sample_jit
    if _sample_jit is None:
        from .sampling import sample
        _sample_jit = jax.jit(sample)
    row = lambda v, dt: np.full((1,), v, dt)  # noqa: E731
    return np.asarray(_sample_jit(logits, key, row(temperature, np.float32),
                                  row(top_k, np.int32), row(top_p, np.float32)))
