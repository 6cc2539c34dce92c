"""speculative: how much faster speculative decoding generates, and the check that it is exact.

Workload per model: prompts built from text shipped with Python, offline. Input-grounded
tasks, whose answers copy spans of the prompt (where prompt lookup should shine):
`repeat_code` (a standard-library function, "repeat it exactly"), `edit_code` (the same
function, "rename a variable"), `quote` (a documentation passage, "quote the sentence
about ..."); and open-ended chat, `chat` (a short creative request, nothing to copy), where
speculation must cost little. The model's chat template where it has one.

For each (model, task, batch size, proposer): plain `kvjax.generate` and the speculative
one on the same prompts (`prompt_sets` draws of a batch's rows, generated one after another
inside each timed call, so a batch-1 figure can be of several prompts, not one) (greedy, `new_tokens` each, the same cache kind and max_len), all
timed warm and in turn (`kvjax.timing.measure_interleaved`: calibrated, medians, compile
excluded, measurements alternating so drift in the machine's speed cancels); tokens/s,
speedup, the mean accepted length (tokens per target forward) and acceptance; and the
exactness check on every output (the speculative tokens must equal the plain ones).

Two speedups: end to end (the whole `generate` call, prompt prefill included) and of the
decode phase, the part speculation changes: a third call timed in turn, plain `generate` of
ONE token (the prompt's prefill and the first token), is subtracted from both, so the decode
phase's rate is (tokens - one per row) / (call - prefill). With prompts of 300-430 tokens and
128 new ones, the prefill is about a fifth of a plain call on a CPU and dilutes the end-to-end
figure. The Engine's rates are of repeated requests whose prompts its prefix cache holds
after the warm-up, so they are close to decode-phase rates.
"""
from __future__ import annotations

from contextlib import ExitStack
from functools import lru_cache

import dataclasses
import inspect
import re
from dataclasses import dataclass

import numpy as np

import kvjax
from kvjax.timing import measure_interleaved, release_compiled
from kvjax.decode.speculative import SpecStats, parse_speculate, tokens_to_verify
from kvjax.tokenizer import model_eos_ids

from .. import plots
from ..models import check_model, load_named
from ..schema import ConfigError, option

TASKS = ("repeat_code", "edit_code", "quote", "chat")
GROUNDED = ("repeat_code", "edit_code", "quote")
PLAIN = "plain"      # the measurement without a proposer
PREFILL = "prefill"  # plain generate of one token: the prompt's prefill, which speculation never changes


def _sources() -> list[str]:
    """Standard-library functions of 10-30 lines, docstrings removed (shipped with Python:
    offline, deterministic for a Python version)."""
    import colorsys
    import fnmatch
    import heapq
    import statistics
    import textwrap
    out = []
    for mod in (textwrap, fnmatch, colorsys, heapq, statistics):
        for _, fn in sorted(inspect.getmembers(mod, inspect.isfunction)):
            if fn.__module__ != mod.__name__:
                continue
            try:
                src = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            src = re.sub(r'\n\s*"""[\s\S]*?"""', "", src, count=1).rstrip()
            if 10 <= src.count("\n") <= 30:
                out.append(src)
    return out


def _passages() -> list[str]:
    from pydoc_data.topics import topics
    out = []
    for key in sorted(topics):
        text = " ".join(topics[key].split())
        sentences = re.split(r"(?<=[.!?]) ", text)
        if len(sentences) >= 6:
            out.append(" ".join(sentences[:8]))
    return out


CHAT = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Describe your ideal weekend in a few sentences.",
        "Give three tips for learning a new language.",
        "Write a poem about autumn leaves.",
        "Explain why the sky is blue to a ten-year-old.",
        "Invent a new board game and describe its rules.",
        "What would you pack for a week-long hiking trip?",
        "Write a letter to your future self.",
        "Describe a city of the future.",
        "Tell me about a memorable meal, real or imagined.",
        "Write a dialogue between a cat and a dog.",
        "Suggest a name and a slogan for a bakery.",
        "Describe the ocean to someone who has never seen it.",
        "Write a short fable with a moral.",
        "List some fun things to do on a rainy day.",
        "Write a product description for a magical umbrella."]


def prompts(task: str, n: int, seed: int) -> list[str]:
    """n user messages of `task` (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    if task == "chat":
        return [CHAT[i % len(CHAT)] for i in rng.permutation(max(n, len(CHAT)))[:n]]
    if task == "quote":
        ps = _passages()
        out = []
        for i in rng.choice(len(ps), n, replace=len(ps) < n):
            sentences = re.split(r"(?<=[.!?]) ", ps[i])
            word = max(re.findall(r"[A-Za-z_]{5,}", sentences[2]), key=len, default="the")
            out.append(f"{ps[i]}\n\nQuote, word for word, the sentences of the text above starting from "
                       f"the one that contains the word \"{word}\".")
        return out
    srcs = _sources()
    out = []
    for i in rng.choice(len(srcs), n, replace=len(srcs) < n):
        src = srcs[i]
        if task == "repeat_code":
            out.append(f"```python\n{src}\n```\n\nRepeat the code above exactly, in a code block.")
        else:
            names = sorted(set(re.findall(r"\b([a-z_][a-z0-9_]{2,})\s*=", src)) or {"result"})
            old = names[int(rng.integers(len(names)))]
            out.append(f"```python\n{src}\n```\n\nRewrite the code above with the variable `{old}` renamed "
                       f"to `{old}_value`. Change nothing else.")
    return out


@dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = option(("smollm2-135m-instruct", "text"), min_items=1,
                                     help="models by kvjax.load_model name")
    tasks: tuple[str, ...] = option(TASKS, choices=TASKS, min_items=1, help="workloads")
    batch_sizes: tuple[int, ...] = option((1, 4, 16), min=1, min_items=1, help="rows per generate call")
    proposers: tuple[str, ...] = option(("prompt-lookup:4",), min_items=1, help=(
        "prompt-lookup:K (K proposed tokens), early-exit:LAYERS:K (the target's first LAYERS layers "
        "as its own draft; LAYERS below 1 is a share of the model's layers, e.g. 0.25) or "
        "draft:NAME:K (a second model by kvjax.load_model name; used only for the models whose "
        "vocabulary it shares)"))
    engine: bool = option(True, help="also time kvjax.Engine (max_slots = batch) with and without "
                                     "the proposer on the same prompts")
    max_ngram: int = option(5, min=1, help="prompt lookup's longest n-gram")
    min_ngram: int = option(0, min=0, help="prompt lookup's shortest n-gram; 0: the proposer's "
                                          "'auto' (2 on CPU, 1 on accelerators)")
    new_tokens: int = option(128, min=1, help="tokens generated per row")
    chat: bool = option(True, help="use the model's chat template where it has one")
    prompt_sets: int = option(1, min=1, help=(
        "different prompt draws per (task, batch size), generated one after another inside each "
        "timed call (one program serves them all): a speedup over several prompts rather than one "
        "draw's"))
    repeats: int = option(3, min=1, help="timed measurements per (plain, speculative) call (median)")
    min_seconds: float = option(0.0, min=0.0, help="calibrated length of one measurement (s)")


@lru_cache(maxsize=4)
def _load_draft(name: str):
    """A draft model by name, loaded once per run (every (task, batch) measurement reuses it)."""
    dcfg, dparams, _ = load_named("speculative.proposers", name)
    return dcfg, dparams


def parse_proposer(spec: str, cfg, params, c: Config):
    """A proposer spec (kvjax.decode.speculative.parse_speculate's forms) -> a kvjax proposer
    (prompt lookup with the config's n-gram range), or None for a draft model whose
    vocabulary differs from this target's (ValueError on a bad spec; cfg None checks only the
    form)."""
    try:
        p = parse_speculate(spec, cfg, params, load=_load_draft, max_ngram=c.max_ngram)
        if isinstance(p, kvjax.PromptLookup) and c.min_ngram:
            p = dataclasses.replace(p, min_ngram=c.min_ngram)
            p.check(None)
        return p
    except ValueError as e:
        if spec.startswith("draft:") and "vocabulary" in str(e):
            return None
        raise


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    for i, p in enumerate(c.proposers):
        try:
            parse_proposer(p, None, None, c)
        except ValueError as e:
            raise ConfigError(f"speculative.proposers[{i}]: {e}") from None
    for i, name in enumerate(c.models):
        check_model(f"speculative.models[{i}]", name)


def _engine_rates(c: Config, cfg, params, sets: list, eos, proposers: dict, want: list) -> dict:
    """kvjax.Engine (max_slots = rows, one page table per row) on the prompt sets (one
    `generate` per set, in turn), one engine per proposer (None: plain), all warm and timed in
    turn (`measure_interleaved`): {name: tokens/s, whether every request's tokens are `want`'s
    (plain generate's, cut at its length), ...}."""
    max_len = max(len(x) for ids in sets for x in ids) + c.new_tokens
    sp = kvjax.SamplingParams(max_tokens=c.new_tokens, stop_token_ids=tuple(eos or ()))
    with ExitStack() as stack:
        engines = {name: stack.enter_context(kvjax.Engine(cfg, params, max_slots=len(sets[0]), max_len=max_len,
                                                          decode_steps=8, speculate=p))
                   for name, p in proposers.items()}
        timed = measure_interleaved({name: (lambda _, e=e: [o for ids in sets for o in e.generate(ids, sp)])
                                     for name, e in engines.items()},
                                    repeats=c.repeats, min_seconds=c.min_seconds, sync=lambda _: None)
        stats = {name: e.stats() for name, e in engines.items()}
    out = {}
    for name, (outs, t) in timed.items():
        n = sum(len(o.tokens) for o in outs)
        out[name] = {"tok_s": n / t.median_s, "exact": all(o.tokens == w for o, w in zip(outs, want)),
                     "valid": t.valid, "tokens_per_forward": stats[name].get("spec_tokens_per_forward")}
    return out


def _packed(sets: list) -> list:
    """The prompt sets as (prompt int32 [B, S], lens int32 [B]) of one shape S (the longest
    prompt of any set): one compiled program serves every set."""
    S = max(len(x) for ids in sets for x in ids)
    out = []
    for ids in sets:
        prompt = np.zeros((len(ids), S), np.int32)
        for i, x in enumerate(ids):
            prompt[i, :len(x)] = x
        out.append((prompt, np.array([len(x) for x in ids], np.int32)))
    return out


def _joined_stats(outs):
    """The SpecStats of several generate calls as one (rows concatenated)."""
    return SpecStats(*(np.concatenate([np.asarray(getattr(o.stats, f)) for o in outs]) for f in SpecStats._fields))


def _measure(c: Config, cfg, params, tok, sets: list) -> list[dict]:
    """Plain and speculative generate of the prompt sets (lists of token-id prompts, one
    generate call per set, the sets in turn inside one timed call), warm and timed in turn
    (drift in the machine's speed cancels in the speedups); one row per proposer (and, with
    c.engine, the Engine's rates with and without it, timed in turn the same way)."""
    packed = _packed(sets)
    S = packed[0][0].shape[1]
    eos = model_eos_ids(tok, cfg.vocab_size) or None
    kw = dict(max_new_tokens=c.new_tokens, eos_token_id=eos, max_len=S + c.new_tokens)
    proposers = {spec: parse_proposer(spec, cfg, params, c) for spec in c.proposers}
    proposers = {spec: p for spec, p in proposers.items() if p is not None}   # None: another vocabulary

    def each(**more):
        return lambda _: [kvjax.generate(cfg, params, p, n, **{**kw, **more}) for p, n in packed]
    calls = {PLAIN: each(), PREFILL: each(max_new_tokens=1)}
    calls.update({spec: each(speculate=p) for spec, p in proposers.items()})
    timed = measure_interleaved(calls, repeats=c.repeats, min_seconds=c.min_seconds)
    plain_outs, plain = timed[PLAIN]
    n_tokens = sum(int(np.asarray(o.lengths).sum()) for o in plain_outs)
    want = [[int(x) for x in row[:n]] for o in plain_outs
            for row, n in zip(np.asarray(o.tokens), np.asarray(o.lengths))]
    engine = _engine_rates(c, cfg, params, sets, eos, {PLAIN: None, **proposers}, want) if c.engine else None
    rows = []
    for spec, proposer in proposers.items():
        outs, t = timed[spec]
        exact = all(np.array_equal(np.asarray(o.tokens), np.asarray(w.tokens))
                    and np.array_equal(np.asarray(o.lengths), np.asarray(w.lengths)) for o, w in zip(outs, plain_outs))
        s = _joined_stats(outs)
        rows.append({"proposer": spec, "prompt_tokens": S, "prompt_sets": len(sets), "tokens": n_tokens,
                     "verify_k": tokens_to_verify(proposer, len(sets[0])),   # the cost-aware switch's k
                     "plain_s": plain.median_s, "spec_s": t.median_s, "plain_tok_s": n_tokens / plain.median_s,
                     "spec_tok_s": n_tokens / t.median_s, "speedup": plain.median_s / t.median_s,
                     **decode_phase(plain.median_s, t.median_s, timed[PREFILL][1].median_s,
                                    n_tokens - sum(map(len, sets))),
                     "mean_accepted_length": s.mean_accepted_length, "acceptance": s.acceptance,
                     "exact": exact, "valid": plain.valid and t.valid,
                     "example": tok.decode([int(x) for x in np.asarray(outs[0].tokens)[0][:40]])[:80]})
        if engine:
            e, e0 = engine[spec], engine[PLAIN]
            rows[-1].update(engine_plain_tok_s=e0["tok_s"], engine_spec_tok_s=e["tok_s"],
                            engine_speedup=e["tok_s"] / e0["tok_s"], engine_tokens_per_forward=e["tokens_per_forward"],
                            engine_exact=e0["exact"] and e["exact"], valid=rows[-1]["valid"] and e0["valid"] and e["valid"])
    return rows


def decode_phase(plain_s: float, spec_s: float, prefill_s: float, decoded: int) -> dict:
    """The decode phase's rates and speedup: each call less the prefill (a plain one-token
    generate timed in turn with them); None where a call was not longer than the prefill."""
    a, b = plain_s - prefill_s, spec_s - prefill_s
    ok = a > 0 and b > 0
    return {"prefill_s": prefill_s, "plain_decode_tok_s": decoded / a if ok else None,
            "spec_decode_tok_s": decoded / b if ok else None, "decode_speedup": a / b if ok else None}


def _encode(tok, text: str, chat: bool) -> list[int]:
    if chat:
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
    return list(tok.encode(text))


def run(ctx, c: Config) -> dict:
    from kvjax.ruler import has_chat_template
    rows = []
    for model in c.models:
        cfg, params, tok = load_named("speculative.models", model)
        chat = c.chat and has_chat_template(tok)
        ctx.note(f"{model}: {cfg.num_layers} layers, vocabulary {cfg.vocab_size}; "
                 f"{'chat template' if chat else 'plain prompts'}; {c.prompt_sets} prompt set(s) of a "
                 f"batch's rows per (task, batch size), timed together.")
        for task in ctx.track(c.tasks, f"{model} tasks"):
            for B in c.batch_sizes:
                ids = [_encode(tok, p, chat) for p in prompts(task, B * c.prompt_sets, ctx.seed)]
                if cfg.positions == "learned" and max(map(len, ids)) + c.new_tokens > cfg.max_position:
                    ctx.note(f"{model} {task} B={B}: prompt + new tokens exceed max_position; skipped")
                    continue
                for row in _measure(c, cfg, params, tok, [ids[i:i + B] for i in range(0, len(ids), B)]):
                    row = {"model": model, "task": task, "grounded": task in GROUNDED, "batch_size": B, **row}
                    ctx.log(row)
                    rows.append(row)
                release_compiled()   # none is reused by the next (a run died at the map limit without)
    if not rows:
        raise RuntimeError("speculative measured nothing")
    ctx.table("Speculative decoding against plain decoding (greedy, same prompts and cache)",
              ["model", "task", "batch", "proposer", "k used", "plain tok/s", "spec tok/s", "speedup",
               "prefill s", "decode speedup", "tokens / forward", "acceptance", "exact"],
              [[r["model"], r["task"], r["batch_size"], r["proposer"], r["verify_k"], r["plain_tok_s"], r["spec_tok_s"],
                r["speedup"], r["prefill_s"], r["decode_speedup"], r["mean_accepted_length"], r["acceptance"],
                "yes" if r["exact"] else "NO"] for r in rows])
    if c.engine:
        ctx.table("The same through kvjax.Engine (paged pools, max_slots = batch; exact: equal to plain generate)",
                  ["model", "task", "batch", "proposer", "plain tok/s", "spec tok/s", "speedup",
                   "tokens / forward", "exact"],
                  [[r["model"], r["task"], r["batch_size"], r["proposer"], r["engine_plain_tok_s"],
                    r["engine_spec_tok_s"], r["engine_speedup"], r["engine_tokens_per_forward"],
                    "yes" if r["engine_exact"] else "NO"] for r in rows])
    inexact = [r for r in rows if not (r["exact"] and r.get("engine_exact", True))]
    if inexact:
        ctx.note(f"{len(inexact)} row(s) NOT exact: " + "; ".join(
            f"{r['model']} {r['task']} B={r['batch_size']} {r['proposer']}" for r in inexact))
    for model in dict.fromkeys(r["model"] for r in rows):
        fig, ax = plots.figure(ncols=1)
        ax = ax[0] if isinstance(ax, (list, tuple, np.ndarray)) else ax
        mine = [r for r in rows if r["model"] == model]
        bs = sorted({r["batch_size"] for r in mine})
        series = {}
        for r in mine:
            series.setdefault(f"{r['task']} {r['proposer']}", {})[r["batch_size"]] = r["speedup"]
        plots.lines(ax, bs, {k: [v.get(b) for b in bs] for k, v in series.items()}, xlabel="batch size",
                    ylabel="speedup over plain decoding", title=f"Speculative decoding, {model}", logx=True)
        ctx.save_figure(fig, f"speculative_{re.sub(r'[^A-Za-z0-9]+', '_', model)}.png")
    head = {"rows": len(rows), "inexact_rows": len(inexact)}
    for r in rows:
        head[f"{r['model']}_{r['task']}_b{r['batch_size']}_{r['proposer']}_speedup"] = r["speedup"]
        head[f"{r['model']}_{r['task']}_b{r['batch_size']}_{r['proposer']}_decode_speedup"] = r["decode_speedup"]
    return head
