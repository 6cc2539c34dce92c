"""press_benchmark: every KV-cache press (and the int8, KIVI, window and sinks caches) against
compression ratio on the bundled models, kvpress-leaderboard style.

Methods. Each press in `presses` (kvpress names; a wrapper is written `Wrapper(Inner)`, e.g.
`AdaKV(ExpectedAttention)`) at every ratio in `ratios`, the window and sinks rings sized to
keep (1 - ratio) of the context, and three ratio-free baselines: dense (ratio 0), int8 and
KIVI 2/4-bit, placed on the ratio axis at the memory they save (1 - bytes / dense bytes).

Measurements (one metrics row per method and ratio):
  * recall, query-agnostic (as kvpress evaluates): the recall model's context (<bos> + the
    key-value pairs) is prefilled WITH the press, then the query `?key` is fed through the
    compressed cache and the value is decoded greedily; exact match. Accuracy also by
    pair-to-query distance.
  * recall, query-aware: the context AND the query are prefilled with the press in one chunk
    (the query sits inside the press's scoring window); the query's last token is then read
    again through the compressed cache and the value decoded. kvpress feeds its question
    suffix after compression the same way; the recall format has no suffix, and a one-token
    answer taken from the pressed prefill's own logits would come from the uncompressed chunk
    (a pressed chunk attends to all of itself) and so equal dense at every ratio. Methods that
    do not look at the query (rings, int8, KIVI) run the same protocol without a press.
  * held-out perplexity of the text model: the first `ppl_prefix` tokens of each held-out
    window are prefilled with the press, the rest is read token by token through the
    compressed cache (teacher forcing) and scored.
  * memory: bytes per context token of the cache that holds the compressed context (the run's
    cache cut to the slots the method needs; `KVCache.nbytes`), beside the prediction
    (`kvjax.press.cache_bytes` / `kvjax.cache_bytes(..., pressed=True)`).
  * time (`kvjax.timing.measure`, text model): the prefill of the prefix with the press, and
    one decode step on a cache sized for the compressed prefix + 1.
  * a long generation under `DecodingPress(KnormPress(), interval, target)`: cache bytes and
    per-head fill after every call, against the bytes a dense cache would need.

Runs share compiled programs: every press at every ratio prefills into a cache of one slot
count per model (enough for the largest budget; the ratio is data), so a new ratio is never
a new program; the memory figures are those of a cache sized for each method.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import data
from kvjax import press as P
from kvjax.cache import cut_slots, drop_newest, empty_rows
from kvjax.evaluate import stream_program
from kvjax.press import host
from kvjax.timing import measure

from .. import plots
from ..models import check_model, heldout_stream, load_named, recall_task
from ..schema import ConfigError, option

SCORERS = ("Knorm", "KeyDiff", "StreamingLLM", "Random", "SnapKV", "PyramidKV", "TOVA",
           "ObservedAttention", "ExpectedAttention", "KVzip")
WRAPPERS = ("AdaKV", "CriticalKV", "ChunkKV", "KeyRerotation")
BASELINES = ("dense", "int8", "kivi2", "kivi4", "window", "sinks")
DEFAULT_PRESSES = ("Knorm", "KeyDiff", "StreamingLLM", "Random", "SnapKV", "PyramidKV", "TOVA",
                   "ObservedAttention", "ExpectedAttention", "AdaKV(ExpectedAttention)",
                   "CriticalKV(SnapKV)", "ChunkKV(SnapKV)", "KeyRerotation(StreamingLLM)")


@dataclass(frozen=True)
class Config:
    text_model: str = option("text", help="the text model: any name or path kvjax.load_model takes "
                                          "(bundled or packaged name, .gguf file, checkpoint folder)")
    recall_model: str = option("recall", help="the recall model: 'recall' or a kvjax train checkpoint "
                                              "folder (its train_config.json gives the task)")
    presses: tuple[str, ...] = option(DEFAULT_PRESSES, help=(
        "presses by kvpress name (" + ", ".join(SCORERS) + "); wrappers as Wrapper(Inner) with "
        "Wrapper one of " + ", ".join(WRAPPERS)))
    baselines: tuple[str, ...] = option(BASELINES, choices=BASELINES,
                                        help="cache kinds compared with the presses")
    ratios: tuple[float, ...] = option((0.25, 0.5, 0.75, 0.9), min=0.0, max=0.99, min_items=1,
                                       help="compression ratios (share of the context dropped)")
    window_size: int = option(8, min=1, help="SnapKV / PyramidKV window (last queries that score)")
    kernel_size: int = option(5, min=1, help="SnapKV / PyramidKV pooling kernel (odd)")
    n_future_positions: int = option(64, min=1, help="ExpectedAttention: future positions averaged")
    n_sink: int = option(4, min=0, help="StreamingLLM and ExpectedAttention sink tokens")
    chunk_length: int = option(8, min=1, help="ChunkKV chunk length")
    kivi_group_size: int = option(16, min=1, help="KIVI quantisation group (tokens for keys, channels for values)")
    kivi_residual_length: int = option(16, min=1, help="KIVI full-precision residual (a multiple of the group)")
    num_sinks: int = option(4, min=1, help="sink tokens of the sinks ring")
    recall_rows: int = option(4, min=1, help="recall sequences per pair-to-query distance (the batch "
                                             "is this x the number of distances)")
    seq_len: int = option(128, min=8, help="tokens per held-out perplexity window")
    ppl_prefix: int = option(64, min=2, help="tokens of each window prefilled with the press; the rest is scored")
    ppl_windows: int = option(16, min=1, help="held-out windows (the text batch; also the timing batch)")
    timing_ratios: tuple[float, ...] = option((0.25, 0.5, 0.75, 0.9), min=0.0, max=0.99,
                                              help="ratios at which prefill and decode are timed "
                                                   "(a subset of ratios; empty: no timing)")
    repeats: int = option(3, min=1, help="timed measurements per figure (median)")
    min_seconds: float = option(0.05, min=0.0, help="calibrated length of one measurement (s)")
    decoding_prompt: int = option(16, min=1, help="DecodingPress run: held-out prompt tokens")
    decoding_calls: int = option(8, min=1, help="DecodingPress run: generate calls (each after the "
                                                "first feeds one newline token)")
    decoding_tokens_per_call: int = option(63, min=1, help="DecodingPress run: tokens generated per call")
    decoding_interval: int = option(32, min=1, help="DecodingPress compression_interval")
    decoding_target: int = option(64, min=1, help="DecodingPress target_size")


# ----------------------------------------------------------------------------- methods

_NAME = re.compile(r"^\s*([A-Za-z]+)\s*(?:\(\s*([A-Za-z]+)\s*\))?\s*$")


def parse_press(name: str):
    """(wrapper or None, scorer) from 'Scorer' or 'Wrapper(Scorer)'; ValueError naming the choices."""
    m = _NAME.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a press name or Wrapper(Inner)")
    outer, inner = m.group(1), m.group(2)
    if inner is None:
        if outer not in SCORERS:
            raise ValueError(f"unknown press {outer!r}; presses: {', '.join(SCORERS)}; wrappers: "
                             f"{', '.join(w + '(Inner)' for w in WRAPPERS)}")
        return None, outer
    if outer not in WRAPPERS:
        raise ValueError(f"unknown wrapper {outer!r} in {name!r}; wrappers: {', '.join(WRAPPERS)}")
    if inner not in SCORERS:
        raise ValueError(f"unknown inner press {inner!r} in {name!r}; presses: {', '.join(SCORERS)}")
    return outer, inner


def make_press(name: str, ratio: float, c: Config, seed: int = 0):
    outer, inner = parse_press(name)
    r = float(ratio)
    scorer = {
        "Knorm": lambda: P.KnormPress(r),
        "KeyDiff": lambda: P.KeyDiffPress(r),
        "StreamingLLM": lambda: P.StreamingLLMPress(r, n_sink=c.n_sink),
        "Random": lambda: P.RandomPress(r, seed=seed),
        "SnapKV": lambda: P.SnapKVPress(r, window_size=c.window_size, kernel_size=c.kernel_size),
        "PyramidKV": lambda: P.PyramidKVPress(r, window_size=c.window_size, kernel_size=c.kernel_size),
        "TOVA": lambda: P.TOVAPress(r),
        "ObservedAttention": lambda: P.ObservedAttentionPress(r),
        "ExpectedAttention": lambda: P.ExpectedAttentionPress(r, n_future_positions=c.n_future_positions,
                                                              n_sink=c.n_sink),
        "KVzip": lambda: _kvzip(r, c),
    }[inner]()
    if outer is None:
        return scorer
    return {
        "AdaKV": lambda: P.AdaKVPress(scorer),
        "CriticalKV": lambda: P.CriticalKVPress(scorer),
        "ChunkKV": lambda: P.ChunkKVPress(scorer, chunk_length=c.chunk_length),
        "KeyRerotation": lambda: P.KeyRerotationPress(scorer),
    }[outer]()


def _kvzip(ratio: float, c: Config):
    """KVzipPress for the bundled byte-level models: the reconstruction prompt in the
    ByteTokenizer's chat format (kvpress's repeat prompts, then the template's suffix after a
    user message); the contexts here are raw (<bos> + text, no chat prefix), so only <bos> is
    the prefix."""
    from kvjax.press.kvzip import REPEAT_PART_PROMPT, REPEAT_PROMPT, chat_pieces

    tok = kvjax.ByteTokenizer()
    enc = lambda t: tuple(tok.encode(t, add_special_tokens=False))  # noqa: E731
    return P.KVzipPress(ratio, n_sink=c.n_sink, prefix_length=1, suffix_ids=enc(chat_pieces(tok)[1]),
                        repeat_ids=enc(REPEAT_PROMPT), repeat_part_ids=enc(REPEAT_PART_PROMPT))


@dataclass(frozen=True)
class Method:
    name: str            # row label
    family: str          # "press" | one of BASELINES
    ratios: tuple        # nominal ratios it runs at (None: ratio-free baseline)


def methods(c: Config) -> list[Method]:
    out = []
    for b in c.baselines:
        if b in ("dense", "int8", "kivi2", "kivi4"):
            label = {"dense": "dense", "int8": "int8", "kivi2": "KIVI-2", "kivi4": "KIVI-4"}[b]
            out.append(Method(label, b, (None,)))
    for name in c.presses:
        out.append(Method(re.sub(r"\s+", "", name), "press", tuple(c.ratios)))
    for b in c.baselines:
        if b in ("window", "sinks"):
            out.append(Method(b if b == "window" else f"sinks {c.num_sinks}+ring", b, tuple(c.ratios)))
    return out


def _check_models(c: Config) -> None:
    """Both models resolvable; the recall model kvjax-trained; KVzip only on byte-level text
    models (its reconstruction prompt is written in the byte tokenizer's ids)."""
    from pathlib import Path

    from kvjax.bundled import bundled_names

    check_model("press_benchmark.text_model", c.text_model)
    check_model("press_benchmark.recall_model", c.recall_model)
    recall_task("press_benchmark.recall_model", c.recall_model)
    byte_level = (c.text_model in bundled_names()
                  or (Path(c.text_model).expanduser() / "kvjax_tokenizer.json").is_file())
    if not byte_level and any(parse_press(n)[1] == "KVzip" for n in c.presses):
        raise ConfigError(f"press_benchmark.presses: KVzip's reconstruction prompt is built for the "
                          f"byte-level models; text_model {c.text_model!r} has another tokenizer "
                          f"(remove KVzip from presses)")


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    if c.kernel_size % 2 == 0:
        raise ConfigError(f"press_benchmark.kernel_size: {c.kernel_size} must be odd (kvpress pools "
                          f"with an odd kernel)")
    for i, name in enumerate(c.presses):
        try:
            make_press(name, 0.5, c)
        except ValueError as e:
            raise ConfigError(f"press_benchmark.presses[{i}]: {e}") from None
    if len(set(c.presses)) != len(c.presses):
        raise ConfigError(f"press_benchmark.presses: a press is listed twice: {list(c.presses)}")
    if len(set(c.ratios)) != len(c.ratios):
        raise ConfigError(f"press_benchmark.ratios: a ratio is listed twice: {list(c.ratios)}")
    for r in c.timing_ratios:
        if r not in c.ratios:
            raise ConfigError(f"press_benchmark.timing_ratios: {r} is not one of ratios {list(c.ratios)}")
    if c.ppl_prefix >= c.seq_len:
        raise ConfigError(f"press_benchmark.ppl_prefix: {c.ppl_prefix} must be below seq_len={c.seq_len}")
    if c.kivi_residual_length % c.kivi_group_size:
        raise ConfigError(f"press_benchmark.kivi_residual_length: {c.kivi_residual_length} must be a "
                          f"multiple of kivi_group_size={c.kivi_group_size}")
    t, i = c.decoding_tokens_per_call, c.decoding_interval
    if (t + 1) % i or (i > 1 and t + 1 < 2 * i):
        raise ConfigError(f"press_benchmark.decoding_tokens_per_call: {t} + 1 (the call's one prompt "
                          f"token) must be a multiple of decoding_interval={i}, at least twice it, so "
                          f"that every call ends on a compaction and the next call fits in the "
                          f"target_size + interval slots")
    if c.decoding_prompt >= c.decoding_target:
        raise ConfigError(f"press_benchmark.decoding_prompt: {c.decoding_prompt} must be below "
                          f"decoding_target={c.decoding_target} (a longer prompt is compacted at once, "
                          f"which shifts the schedule)")
    for key in ("window_size", "n_sink"):
        if getattr(c, key) >= c.ppl_prefix:
            raise ConfigError(f"press_benchmark.{key}: {getattr(c, key)} must be below ppl_prefix="
                              f"{c.ppl_prefix} (the press scores the prefix with it)")
    _check_models(c)


# ----------------------------------------------------------------------------- caches

def _press_pools(press) -> bool:
    """A pooling press (AdaKV) turns an empty dense cache into one pool of K x its slots."""
    return bool(getattr(press, "pooled", False))


def _run_cache(cfg, B: int, slots: int, press):
    """The empty cache a press prefills into: per-head pressed layout of `slots` slots per layer,
    or (a pooling press) a dense cache that the press turns into a pool of K x slots."""
    if _press_pools(press):
        return kvjax.init_cache(cfg, B, slots)
    return P.pressed_cache(cfg, B, [slots] * cfg.num_layers)


def _drop_newest(cache):
    """The query-aware protocol's cache: each row's newest token (the query's last) taken back."""
    return drop_newest(cache, 1)


def _kivi_slots(tokens: int, R: int) -> int:
    """Fewest slots S (a multiple of R) with S >= tokens: kvjax's host checks hold a KIVI cache to
    max_len = S tokens (kivi.capacity would allow S + R - 1)."""
    return -(-tokens // R) * R


# ----------------------------------------------------------------------------- models and data

def _load(name: str):
    """(cfg, params, name) of a model by any kvjax.load_model name (tests call it)."""
    cfg, params, _ = load_named("press_benchmark.model", name)
    return cfg, params, name


def _recall_task(name) -> data.RecallTask:
    """The RecallTask of a kvjax-trained recall model, by name or folder."""
    return recall_task("press_benchmark.recall_model", str(name))


@dataclass
class Setting:
    """One model's workload: the tokens, the context length n, and the slots beyond it."""
    cfg: object
    params: object
    n: int                # context tokens that are compressed
    room: int             # slots the run needs after the context (query + answer, or the scored rest)
    B: int
    run_slots: int = 0    # slots per layer of every press's run cache


@dataclass
class Recall:
    """The recall sequences: prompts (<bos> + pairs + query), answers, and the distances covered."""
    task: data.RecallTask
    batch: data.RecallBatch
    prompts: np.ndarray   # int [B, W]
    answers: np.ndarray   # int [B, V]
    distances: list
    q_len: int            # query tokens: '?' + the key


@dataclass
class Results:
    """One row per (method name, ratio), and the errors of the parts that raised."""
    rows: dict = field(default_factory=dict)      # (method name, ratio) -> row dict
    errors: list = field(default_factory=list)    # (method, ratio, part, message)

    def row(self, m: Method, ratio) -> dict:
        key = (m.name, ratio)
        if key not in self.rows:
            self.rows[key] = {"method": m.name, "family": m.family, "ratio": ratio}
        return self.rows[key]

    def attempt(self, m: Method, ratio, part: str, fn):
        """fn(), or None after recording its error: a press that cannot run here is not fatal."""
        try:
            return fn()
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            self.errors.append((m.name, ratio, part, msg))
            self.row(m, ratio).setdefault("errors", []).append(f"{part}: {msg}")
            return None


def _recall_workload(ctx, c: Config) -> tuple[Setting, Recall]:
    rcfg, rparams, _ = load_named("press_benchmark.recall_model", c.recall_model)
    task = recall_task("press_benchmark.recall_model", c.recall_model)
    distances = task.distances()
    B = c.recall_rows * len(distances)
    batch = data.recall_batch(task, np.random.default_rng(ctx.seed), B,
                              distance=np.resize(np.array(distances), B))
    prompts, answers = data.recall_prompts(batch)                                   # [B, W], [B, V]
    q_len = 1 + task.key_len
    n_ctx = prompts.shape[1] - q_len
    return (Setting(rcfg, rparams, n_ctx, q_len + task.value_len, B),
            Recall(task, batch, prompts, answers, distances, q_len))


def _text_workload(c: Config) -> tuple[Setting, np.ndarray, np.ndarray]:
    """(setting, the held-out token stream, its windows int [B, seq_len + 1])."""
    tcfg, tparams, tok = load_named("press_benchmark.text_model", c.text_model)
    held = heldout_stream(tok)
    windows = data.text_eval_windows(held, c.seq_len, c.ppl_windows)
    return Setting(tcfg, tparams, c.ppl_prefix, c.seq_len - c.ppl_prefix, windows.shape[0]), held, windows


def _note_workload(ctx, c: Config, rec: Setting, rw: Recall, txt: Setting) -> None:
    rcfg, tcfg, distances = rec.cfg, txt.cfg, rw.distances
    ctx.note(f"Recall model: {c.recall_model} ({rcfg.num_layers} layers, {rcfg.num_kv_heads} kv heads, "
             f"head_dim {rcfg.head_dim}); {rec.B} sequences ({c.recall_rows} per distance, "
             f"{len(distances)} distances {distances[0]}..{distances[-1]}), context {rec.n} tokens "
             f"(<bos> + {rw.task.num_pairs} pairs), query {rw.q_len} tokens, answer {rw.task.value_len}. "
             f"Text model: {c.text_model} ({tcfg.num_layers} layers, {tcfg.num_kv_heads} kv heads, "
             f"head_dim {tcfg.head_dim}); {txt.B} held-out windows of {c.seq_len} tokens: the first "
             f"{c.ppl_prefix} pressed, the next {txt.room} scored.")


def _size_run_caches(rec: Setting, rw: Recall, txt: Setting, presses: dict) -> None:
    """One slot count per model for every press and ratio (the ratio is data, not a new program):
    the largest budget (per kv head for a pooling press) plus the room after the context."""
    for s, ns in ((rec, (rec.n, rec.n + rw.q_len)), (txt, (txt.n,))):
        need = [max(P.layer_budgets(p, s.cfg, n)) // (s.cfg.num_kv_heads if _press_pools(p) else 1)
                for p in presses.values() for n in ns]
        s.run_slots = max(need, default=1) + s.room


def _measure_methods(ctx, c: Config, ms, presses, rec, rw, txt, windows, res: Results) -> dict:
    """Recall and text measurements of every method at every ratio; returns dense's bytes per
    token and perplexity (the reference of the memory saved)."""
    dense = {}
    with ctx.progress(sum(len(m.ratios) for m in ms), "methods") as advance:
        for m in ms:
            for ratio in m.ratios:
                advance(note=f"{m.name} {'' if ratio is None else ratio}")
                row = res.row(m, ratio)
                p = presses.get((m.name, ratio))
                timed = ratio in c.timing_ratios or ratio is None and bool(c.timing_ratios)
                res.attempt(m, ratio, "recall", lambda: _recall(c, rec, rw, m, ratio, p, row))
                res.attempt(m, ratio, "text", lambda: _text(c, txt, m, ratio, p, windows, row, timed))
                if m.family == "dense":
                    dense = {"recall": row.get("recall_bytes_per_token"),
                             "text": row.get("text_bytes_per_token"), "ppl": row.get("ppl")}
    return dense


def _memory_saved(rows: dict, dense: dict) -> None:
    """Memory saved against dense per model, and the ratio axis of the ratio-free baselines."""
    for (name, ratio), row in rows.items():
        for model in ("recall", "text"):
            bpt, ref = row.get(f"{model}_bytes_per_token"), dense.get(model)
            row[f"mem_saved_{model}"] = (1 - bpt / ref) if bpt and ref else None
        if row["family"] == "dense":
            row["ratio"] = 0.0
        elif ratio is None:
            row["ratio"] = row["mem_saved_recall"]
        if row.get("ppl") and dense.get("ppl"):
            row["ppl_vs_dense"] = row["ppl"] / dense["ppl"] - 1


# ----------------------------------------------------------------------------- the run

def run(ctx, c: Config) -> dict:
    ms = methods(c)
    res = Results()
    rec, rw = _recall_workload(ctx, c)
    txt, held, windows = _text_workload(c)
    _note_workload(ctx, c, rec, rw, txt)
    presses = {(m.name, r): make_press(m.name, r, c, ctx.seed)
               for m in ms if m.family == "press" for r in m.ratios}
    _size_run_caches(rec, rw, txt, presses)
    dense = _measure_methods(ctx, c, ms, presses, rec, rw, txt, windows, res)
    _memory_saved(res.rows, dense)
    for row in res.rows.values():
        ctx.log(row)
    decoding = _decoding(ctx, c, txt.cfg, txt.params, held)     # a long generation in constant memory
    return _report(ctx, c, ms, res.rows, res.errors, decoding)


# ----------------------------------------------------------------------------- recall

def _greedy(cfg, params, tokens, lengths, cache, V):
    """Feed a right-padded chunk, then decode V tokens greedily: int [B, V]."""
    logits, cache = kvjax.prefill(cfg, params, tokens, lengths, cache)
    out = [np.asarray(logits).argmax(-1).astype(np.int32)]
    for _ in range(V - 1):
        logits, cache = kvjax.decode_step(cfg, params, out[-1], cache)
        out.append(np.asarray(logits).argmax(-1).astype(np.int32))
    return np.stack(out, 1), cache


def _baseline_cache(cfg, B, m: Method, c: Config, tokens: int, ratio, n: int):
    """The cache a ratio-free or ring baseline runs in, for `tokens` tokens in all
    (rings: the kept share of the n-token context plus the same room the presses get)."""
    if m.family in ("dense", "int8"):
        return kvjax.init_cache(cfg, B, tokens, kind=m.family)
    if m.family in ("kivi2", "kivi4"):
        R = c.kivi_residual_length
        return kvjax.init_cache(cfg, B, _kivi_slots(tokens, R), kind="kivi", bits=int(m.family[-1]),
                                group_size=c.kivi_group_size, residual_length=R)
    kept = int(P.n_kept(np.array([n]), ratio)[0])
    slots = kept + (tokens - n)
    if m.family == "window":
        return kvjax.init_cache(cfg, B, slots, kind="window")
    return kvjax.init_cache(cfg, B, slots, kind="sinks", num_sinks=c.num_sinks)


def _context_bytes(cfg, B, m: Method, c: Config, ratio, n: int, run_cache, press):
    """(bytes, predicted bytes or None, slots per layer) of the cache that holds exactly the
    compressed n-token context: the run's cache cut to what the method keeps (presses, dense,
    int8), or one allocated at that size (KIVI, rings)."""
    if m.family == "press":
        sizes = P.layer_budgets(press, cfg, n)
        cut = cut_slots(run_cache, sizes)
        predicted = None if cut.pooled else P.cache_bytes(cfg, B, sizes)
        return cut.nbytes, predicted, sizes
    if m.family in ("dense", "int8"):
        cut = cut_slots(run_cache, [n] * cfg.num_layers)
        return cut.nbytes, kvjax.cache_bytes(cfg, B, n, kind=m.family), [n] * cfg.num_layers
    if m.family in ("kivi2", "kivi4"):
        R = c.kivi_residual_length
        S = _kivi_slots(n, R)
        q = dict(bits=int(m.family[-1]), group_size=c.kivi_group_size, residual_length=R)
        alloc = kvjax.init_cache(cfg, B, S, kind="kivi", **q)
        return alloc.nbytes, kvjax.cache_bytes(cfg, B, S, kind="kivi", **q), [S] * cfg.num_layers
    kept = int(P.n_kept(np.array([n]), ratio)[0])
    sinks = c.num_sinks if m.family == "sinks" else None
    alloc = kvjax.init_cache(cfg, B, kept, kind=m.family, num_sinks=sinks)
    return alloc.nbytes, kvjax.cache_bytes(cfg, B, kept, kind=m.family, num_sinks=sinks), [kept] * cfg.num_layers


def _recall(c, s: Setting, rw: Recall, m: Method, ratio, press, row):
    cfg, params, B, n = s.cfg, s.params, s.B, s.n
    prompts, answers = rw.prompts, rw.answers
    W = prompts.shape[1]
    q_len = W - n
    V = answers.shape[1]
    dist = rw.batch.distances[:, 0]
    last = np.zeros((B, q_len), np.int32)
    last[:, 0] = prompts[:, -1]                                   # the query's last token, re-read

    def score(pred, key):
        hit = (pred == answers).all(-1)
        row[key] = float(hit.mean())
        row[f"{key}_by_distance"] = [float(hit[dist == d].mean()) for d in rw.distances]

    # query-agnostic: the context alone is pressed; the query comes after
    if m.family == "press":
        cache = _run_cache(cfg, B, s.run_slots, press)
    else:
        cache = _baseline_cache(cfg, B, m, c, n + s.room, ratio, n)
    _, cache = kvjax.prefill(cfg, params, prompts, np.full(B, n), cache, press=press)
    nbytes, predicted, sizes = _context_bytes(cfg, B, m, c, ratio, n, cache, press)
    row.update(recall_cache_bytes=nbytes, recall_cache_bytes_predicted=predicted, recall_slots=sizes,
               recall_batch=B, recall_context=n, recall_bytes_per_token=nbytes / (B * n))
    pred, _ = _greedy(cfg, params, prompts[:, n:], np.full(B, q_len), cache, V)
    score(pred, "recall_agnostic")

    # query-aware: context + query pressed together, the query's last token re-read after
    if m.family == "press":
        cache = _run_cache(cfg, B, s.run_slots, press)
        _, cache = kvjax.prefill(cfg, params, prompts, np.full(B, W), cache, press=press)
        cache = _drop_newest(cache)
    else:
        cache = _baseline_cache(cfg, B, m, c, n + s.room, ratio, n)
        _, cache = kvjax.prefill(cfg, params, prompts, np.full(B, W - 1), cache)
    pred, _ = _greedy(cfg, params, last, np.ones(B, np.int32), cache, V)
    score(pred, "recall_aware")


# ----------------------------------------------------------------------------- text: perplexity, time

def _text(c, s: Setting, m: Method, ratio, press, windows, row, timed: bool):
    cfg, params, B, n = s.cfg, s.params, s.B, s.n
    prefix = windows[:, :n]
    rest = windows[:, n:c.seq_len]                                 # read through the cache
    targets = windows[:, n + 1:c.seq_len + 1]                      # what each read token predicts
    lens = np.full(B, n, np.int32)
    if m.family == "press":
        cache = _run_cache(cfg, B, s.run_slots, press)
    else:
        cache = _baseline_cache(cfg, B, m, c, c.seq_len, ratio, n)
    _, cache = kvjax.prefill(cfg, params, prefix, lens, cache, press=press)
    nbytes, predicted, sizes = _context_bytes(cfg, B, m, c, ratio, n, cache, press)
    row.update(text_cache_bytes=nbytes, text_cache_bytes_predicted=predicted, text_slots=sizes,
               text_batch=B, text_context=n, text_bytes_per_token=nbytes / (B * n))
    if timed:
        row.update(_time_decode(c, s, m, ratio, press, cache, rest[:, 0]))

    # the scored rest: every token read through the compressed cache
    adding = host.per_token(cfg, cache) * rest.shape[1]
    if m.family not in ("window", "sinks") and (host.fills(cache).max(1) + adding > host.slots(cache)).any():
        raise ValueError(f"{m.name}: no room to read {rest.shape[1]} tokens after the prefix")
    logits, cache = stream_program(cfg, params, jnp.asarray(rest, jnp.int32), cache)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -np.asarray(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0])
    row.update(nll=float(nll.mean()), ppl=float(np.exp(nll.mean())))
    if timed:
        row.update(_time_prefill(c, s, press, prefix, lens, cache))


def _time_decode(c, s: Setting, m: Method, ratio, press, cache, tok) -> dict:
    """Timing fields of one decode step on a cache of the compressed prefix + 1 slot, and its
    slots per layer. Each timed call steps and then drops the token again."""
    cfg, params = s.cfg, s.params
    step_cache = _decode_cache(cfg, s.B, m, c, ratio, s.n, cache, press)
    slots = [int(x) for x in host.slots(step_cache)]
    tok = jnp.asarray(tok, jnp.int32)

    def step(st):
        st = kvjax.decode_step(cfg, params, tok, st, check=False)[1]
        return drop_newest(st, 1, check=False)

    _, t = measure(step, step_cache, repeats=c.repeats, min_seconds=c.min_seconds)
    return {**t.fields("decode"), "decode_slots": slots}


def _time_prefill(c, s: Setting, press, prefix, lens, cache) -> dict:
    """Timing fields of the prefix's prefill with the press, into the run's cache emptied each call."""
    def fill(st):
        return kvjax.prefill(s.cfg, s.params, prefix, lens, empty_rows(st, check=False), press=press)[1]

    _, t = measure(fill, cache, repeats=c.repeats, min_seconds=c.min_seconds)
    return t.fields("prefill")


def _decode_cache(cfg, B, m: Method, c: Config, ratio, n: int, cache, press):
    """A cache of new arrays (it is donated while `cache` goes on) holding the compressed n-token
    prefix plus one free slot (per kv head in a pool). KIVI and rings: an empty cache allocated
    at that size; a step's cost depends neither on the values held nor on the position."""
    if m.family == "press":
        per = host.per_token(cfg, cache)
        return cut_slots(cache, [b + per for b in P.layer_budgets(press, cfg, n)])
    if m.family in ("dense", "int8"):
        return cut_slots(cache, [n + 1] * cfg.num_layers)
    return _baseline_cache(cfg, B, m, c, n + 1, ratio, n)


# ----------------------------------------------------------------------------- DecodingPress

def _decoding(ctx, c: Config, cfg, params, held):
    dp = P.DecodingPress(P.KnormPress(), compression_interval=c.decoding_interval,
                         target_size=c.decoding_target)
    slots = dp.slots_needed()
    cache = kvjax.init_cache(cfg, 1, slots)
    prompt = held[None, :c.decoding_prompt].astype(np.int32)
    newline = np.array([[ord("\n")]], np.int32)
    points = []
    generated = 0
    for call in ctx.track(range(c.decoding_calls), "DecodingPress calls"):
        tokens = prompt if call == 0 else newline
        out = kvjax.generate(cfg, params, tokens, [tokens.shape[1]], max_new_tokens=c.decoding_tokens_per_call,
                             cache=cache, press=dp)
        cache = out.cache
        generated += int(np.asarray(out.lengths)[0])
        total = int(np.asarray(cache.lengths)[0])
        fills = np.stack([np.asarray(f) for f in cache.head_fill])                  # [L, 1, K]
        kept = np.asarray(P.kept_positions(cache)[0])
        pt = {"call": call + 1, "tokens": total, "generated": generated, "cache_bytes": cache.nbytes,
              "fill_min": int(fills.min()), "fill_max": int(fills.max()),
              "newest_kept": int(kept.max()), "dense_bytes": kvjax.cache_bytes(cfg, 1, total)}
        points.append(pt)
        ctx.log({"decoding_press": True, **pt})
    predicted = kvjax.cache_bytes(cfg, 1, slots, pressed=True)
    flat = len({p["cache_bytes"] for p in points}) == 1 and points[0]["cache_bytes"] == predicted
    bounded = all(p["fill_max"] <= slots for p in points)
    return {"points": points, "slots": slots, "predicted": predicted, "flat": flat, "bounded": bounded,
            "press": dp}


# ----------------------------------------------------------------------------- report

def _cell(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def _report(ctx, c: Config, ms, rows, errors, decoding) -> dict:
    dense = next((r for r in rows.values() if r["family"] == "dense"), {})
    _leaderboard_table(ctx, c, ms, rows)
    _memory_table(ctx, ms, rows)
    headline = _best_table(ctx, c, rows)
    _decoding_table(ctx, c, decoding)
    bytes_exact = _protocol_note(ctx, rows)
    if errors:
        ctx.table("Errors (a method that raised; its other measurements still ran)",
                  ["method", "ratio", "part", "error"], [list(e) for e in errors])
    else:
        ctx.note("Every method ran at every ratio without an error.")

    _plot(ctx, c, ms, rows, dense)
    _plot_decoding(ctx, c, decoding)
    pts = decoding["points"]
    headline.update({
        "ok": bool(decoding["flat"] and decoding["bounded"] and bytes_exact),
        "dense_recall_agnostic": dense.get("recall_agnostic"), "dense_ppl": dense.get("ppl"),
        "decoding_bytes": pts[-1]["cache_bytes"], "decoding_dense_bytes": pts[-1]["dense_bytes"],
        "decoding_flat": decoding["flat"], "bytes_exact": bytes_exact, "errors": len(errors),
        "methods": len(ms), "rows": len(rows)})
    return headline


def _scores(row) -> str:
    return (f"{_cell(row.get('recall_agnostic'))} / {_cell(row.get('recall_aware'))} / "
            f"{_cell(row.get('ppl'), 3)}")


def _leaderboard_table(ctx, c: Config, ms, rows) -> None:
    """One row per method, one column per ratio (a ratio-free baseline repeats its one cell)."""
    ratios = list(c.ratios)
    lb_rows = []
    for m in ms:
        if m.ratios == (None,):
            row = rows.get((m.name, None), {})
            label = m.name if m.family == "dense" else (
                f"{m.name} (saves {100 * (row.get('mem_saved_recall') or 0):.0f}% / "
                f"{100 * (row.get('mem_saved_text') or 0):.0f}%)")
            lb_rows.append([label] + [_scores(row)] * len(ratios))
        else:
            lb_rows.append([m.name] + [_scores(rows.get((m.name, r), {})) for r in ratios])
    ctx.table("Recall query-agnostic / recall query-aware / held-out perplexity, by compression ratio "
              "(ratio-free baselines repeated across; their memory saving, recall / text model, in brackets)",
              ["method"] + [f"ratio {r}" for r in ratios], lb_rows)


def _memory_table(ctx, ms, rows) -> None:
    mem_rows = []
    for m in ms:
        for r in m.ratios:
            row = rows.get((m.name, r), {})
            mem_rows.append([m.name, row.get("ratio"), row.get("recall_bytes_per_token"),
                             row.get("text_bytes_per_token"),
                             None if row.get("mem_saved_text") is None else f"{100 * row['mem_saved_text']:.1f}%",
                             row.get("prefill_ms"), row.get("decode_ms"),
                             "yes" if row.get("prefill_valid", True) and row.get("decode_valid", True) else "NO"])
    ctx.table("Memory and time: bytes per context token (recall / text cache holding the compressed "
              "context), memory saved on the text model, prefill of the text prefix with the press and "
              "one decode step (text model, median ms)",
              ["method", "ratio", "bytes/token recall", "bytes/token text", "saved (text)", "prefill ms",
               "decode ms", "timing valid"], mem_rows)


def _best(rows_at_ratio, key, lower=False):
    """(method, value) of the best row at one ratio by `key`, or (None, None)."""
    ok = [x for x in rows_at_ratio if x.get(key) is not None]
    if not ok:
        return None, None
    x = (min if lower else max)(ok, key=lambda x: x[key])
    return x["method"], x[key]


def _best_table(ctx, c: Config, rows) -> dict:
    """Best method per ratio (presses and rings); returns the headline's best_* entries."""
    best_rows, headline = [], {}
    for r in c.ratios:
        cand = [row for (name, rr), row in rows.items() if rr == r]
        a, aware, ppl = _best(cand, "recall_agnostic"), _best(cand, "recall_aware"), _best(cand, "ppl", lower=True)
        best_rows.append([r, f"{a[0]} ({_cell(a[1])})", f"{aware[0]} ({_cell(aware[1])})",
                          f"{ppl[0]} ({_cell(ppl[1], 3)})"])
        headline[f"best_query_agnostic_{r}"] = a[0]
        headline[f"best_query_aware_{r}"] = aware[0]
        headline[f"best_ppl_{r}"] = ppl[0]
    ctx.table("Best method per compression ratio",
              ["ratio", "recall query-agnostic", "recall query-aware", "perplexity"], best_rows)
    return headline


def _decoding_table(ctx, c: Config, decoding) -> None:
    pts = decoding["points"]
    ctx.table(f"DecodingPress(KnormPress, compression_interval={c.decoding_interval}, target_size="
              f"{c.decoding_target}) on the text model: memory after each generate call",
              ["call", "tokens in cache's history", "generated", "cache bytes", "fill min..max (slots/head)",
               "dense cache bytes (all tokens)"],
              [[p["call"], p["tokens"], p["generated"], p["cache_bytes"], f"{p['fill_min']}..{p['fill_max']}",
                p["dense_bytes"]] for p in pts])
    ctx.note(f"DecodingPress: {pts[-1]['generated']} tokens generated in {c.decoding_calls} calls into "
             f"{decoding['slots']} slots per head (target_size + compression_interval): "
             f"{pts[-1]['cache_bytes']:,} bytes at every point (kvjax.cache_bytes(..., pressed=True) "
             f"predicts {decoding['predicted']:,}; constant: {'yes' if decoding['flat'] else 'NO'}), "
             f"while a dense cache would need {pts[-1]['dense_bytes']:,} bytes by the end. Each call "
             f"ends on a compaction, so the fill read after a call is the target.")


def _protocol_note(ctx, rows) -> bool:
    """The protocol note; returns whether measured bytes equal the predicted for every method."""
    bytes_exact = all(row.get(f"{mod}_cache_bytes") == row.get(f"{mod}_cache_bytes_predicted")
                      for row in rows.values() for mod in ("recall", "text")
                      if row.get(f"{mod}_cache_bytes_predicted") is not None)
    ctx.note("Protocol. Query-agnostic recall: context pressed alone, query fed after (kvpress's "
             "evaluation). Query-aware: context and query pressed in one chunk, then the query's last "
             "token is read again through the compressed cache before the answer (a pressed chunk "
             "attends to all of itself, so an answer taken from that chunk's own logits would equal "
             "dense). Rings get the kept share of the context plus the same room as the presses. "
             "Bytes per token: the cache holding only the compressed context (run cache cut to the "
             "method's slots, or allocated at that size), divided by batch x context tokens; "
             f"measured = predicted (kvjax.press.cache_bytes / kvjax.cache_bytes) for every method but "
             f"the pooled AdaKV layout, which has no predictor: {'yes' if bytes_exact else 'NO'}. "
             "Decode time: one step on a cache of the compressed prefix + 1 slot (KIVI and rings: "
             "an allocated cache of that size; the cost does not depend on the values).")
    return bytes_exact


def _style(i):
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return {"color": cmap((2 * i) % 20 + (2 * i // 20) % 2), "marker": "osD^v<>ph*"[i % 10]}


def _plot(ctx, c, ms, rows, dense):
    fig, axes = plots.figure(ncols=3, width=5.0, height=4.2)
    panels = [("recall_agnostic", "recall", "exact-match recall", "Recall, query-agnostic"),
              ("recall_aware", "recall", "exact-match recall", "Recall, query-aware"),
              ("ppl", "text", "held-out perplexity", "Held-out perplexity (text model)")]
    for ax, (key, model, ylabel, title) in zip(axes, panels):
        for i, m in enumerate(ms):
            st = _style(i)
            if m.family == "dense":
                if dense.get(key) is not None:
                    ax.axhline(dense[key], color="black", ls="--", lw=1, label="dense")
                continue
            if m.ratios == (None,):
                row = rows.get((m.name, None), {})
                x, y = row.get(f"mem_saved_{model}"), row.get(key)
                if x is not None and y is not None:
                    ax.scatter([x], [y], s=60, color=st["color"], marker="X", label=m.name, zorder=3)
                continue
            pts = [(r, rows.get((m.name, r), {}).get(key)) for r in m.ratios]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ls = ":" if m.family in ("window", "sinks") else "-"
                ax.plot([x for x, _ in pts], [y for _, y in pts], ls=ls, marker=st["marker"], markersize=4,
                        color=st["color"], label=m.name)
        ax.set_xlabel("compression ratio (int8/KIVI: memory saved)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    ctx.save_figure(fig, "press_benchmark.png")


def _plot_decoding(ctx, c, decoding):
    pts = decoding["points"]
    fig, axes = plots.figure(ncols=2, width=5.0)
    x = [p["tokens"] for p in pts]
    axes[0].plot(x, [p["cache_bytes"] for p in pts], marker="o", markersize=4,
                 label=f"DecodingPress (target {c.decoding_target}, interval {c.decoding_interval})")
    axes[0].plot(x, [p["dense_bytes"] for p in pts], marker="s", markersize=4, label="dense (every token)")
    axes[0].set_xlabel("tokens in the sequence so far")
    axes[0].set_ylabel("KV cache bytes")
    axes[0].set_title("Memory during a long generation", fontsize=10)
    axes[0].grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].plot(x, [p["fill_max"] for p in pts], marker="o", markersize=4, label="fill (max over heads)")
    axes[1].plot(x, [p["fill_min"] for p in pts], marker="v", markersize=4, label="fill (min over heads)")
    axes[1].axhline(decoding["slots"], color="red", ls="--", lw=1, label="slots allocated")
    axes[1].axhline(c.decoding_target, color="gray", ls=":", lw=1, label="target_size")
    axes[1].set_xlabel("tokens in the sequence so far")
    axes[1].set_ylabel("slots used per kv head")
    axes[1].set_title("Cache fill after each call", fontsize=10)
    axes[1].set_ylim(0, decoding["slots"] * 1.15)
    axes[1].grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    ctx.save_figure(fig, "decoding_memory.png")
