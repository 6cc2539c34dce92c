"""Speculative decoding: proposals verified by the target model, output exactly the target's.

    out = kvjax.generate(cfg, params, prompts, lens, max_new_tokens=256, max_len=2048,
                         speculate=kvjax.PromptLookup(num_tokens=4, max_ngram=3))
    out = kvjax.generate(..., speculate=kvjax.DraftModel(draft_cfg, draft_params, num_tokens=4))
    out.stats.mean_accepted_length     # tokens per target forward (1.0: plain decoding)

Proposers: `PromptLookup` copies what followed the latest earlier occurrence of the row's
last n-gram in its prompt and output (on device, no second model); `DraftModel` runs a smaller
model sharing the target's vocabulary, with its own cache kept in step; `DraftModel.early_exit`
makes one from the target's first layers (self-speculation through its final norm and head).

Exactness: greedy rows emit exactly plain greedy decoding's tokens; sampling rows are drawn
from exactly the target's distribution (verify.py: the speculative sampling rule). Caches:
dense, int8, window, sinks, hybrid, KIVI and pressed (a rejected token is a length that
does not advance; rings get `num_tokens` slack slots beyond the window they attend over, so
a rejected write never overwrites a key still in the window; a KIVI verify chunk never
completes a residual block; a pressed cache's rejected slots are emptied and its per-head
fills set back: loop.roll_back); a press in the same call presses the prompt as plain
generate does, and a DecodingPress compacts after the same committed tokens as plain
decoding (a verify chunk never crosses a compaction). Meshes are refused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ...cache import KVCache, init_cache
from ...config import ModelConfig
from .loop import SpecPlan, SpecStats, speculative_loop

__all__ = ["PromptLookup", "DraftModel", "SpecStats", "SpeculativeOutput", "generate_speculative",
           "parse_speculate", "tokens_to_verify"]

SPEC_FORMS = "prompt-lookup:K, early-exit:LAYERS:K or draft:PATH_OR_NAME:K"

# Cost-aware switch: the most tokens one verify forward may hold over all rows (B x (k + 1))
# before it stops being nearly free. A decode forward is bound by reading the weights until
# its tokens' FLOPs catch up: measured on this project's 2-core CPU (SmolLM2-135M, float32,
# prompt lookup against plain decoding: 20 tokens per forward (B=4, k=4) 1.06x; 48 tokens
# (B=16, k=2) 0.99x on repeated code but 0.59x on open-ended chat; 80 tokens 0.91x), and
# on accelerators the roofline's ridge (an H100 in bfloat16: ~990 TFLOP/s / 3.35 TB/s ~ 300
# FLOP per byte, 2 FLOP per parameter per token against 2 bytes per parameter read: ~300
# tokens; not yet measured here).
AUTO_VERIFY_TOKENS = {"cpu": 24}
AUTO_VERIFY_TOKENS_ACCELERATOR = 256

# Prompt lookup's shortest n-gram by backend ("auto"): a failed verify forward costs about 2.8
# plain steps on this project's CPU (SmolLM2 at batch 1, 17 rows), so a one-token match, which
# is often a common word or symbol, proposes more than it pays for there; where verifying is
# nearly free (accelerators) every match is worth trying. Chosen by replaying SmolLM2's greedy
# outputs on the benchmark's prompts (BUILD_NOTES, "Which n-grams to propose from").
AUTO_MIN_NGRAM = {"cpu": 2}
AUTO_MIN_NGRAM_ACCELERATOR = 1


def verify_budget(max_verify_tokens) -> int | None:
    """A proposer's `max_verify_tokens` as a token count (None: no limit); "auto" by backend."""
    if max_verify_tokens == "auto":
        return AUTO_VERIFY_TOKENS.get(jax.default_backend(), AUTO_VERIFY_TOKENS_ACCELERATOR)
    return max_verify_tokens


def tokens_to_verify(speculate, batch: int) -> int:
    """Proposals per row a batch of `batch` rows verifies under the proposer's budget: its
    num_tokens, fewer when B x (k + 1) would pass max_verify_tokens, 0 (decode plainly) when
    not even one fits."""
    budget = verify_budget(speculate.max_verify_tokens)
    k = int(speculate.num_tokens)
    return k if budget is None else max(0, min(k, budget // batch - 1))


@dataclass(frozen=True)
class PromptLookup:
    """Propose the `num_tokens` tokens that followed the latest earlier occurrence of the row's
    last n-gram (n from max_ngram down to min_ngram) in its prompt and output so far.
    min_ngram "auto": AUTO_MIN_NGRAM by backend (2 on CPU, 1 on accelerators).
    min_accept / cooldown: a row whose running acceptance rate falls below min_accept stops
    proposing for `cooldown` iterations (open-ended text then decodes at plain speed), or
    until its lookup, still computed on every step (it is free), proposes the token the step
    emits: the text has turned to copying again.
    max_verify_tokens: the most tokens a verify forward holds over all rows (B x (k + 1));
    a larger batch proposes fewer tokens per row, or decodes plainly (large batches are
    compute-bound, where verifying costs what it saves); "auto": AUTO_VERIFY_TOKENS by
    backend; None: no limit."""
    num_tokens: int = 4
    max_ngram: int = 5
    min_ngram: int | str = "auto"
    min_accept: float = 0.25
    cooldown: int = 64
    max_verify_tokens: int | str | None = "auto"

    def check(self, cfg: ModelConfig) -> None:
        _check_common(self)
        for name in ("max_ngram", "min_ngram"):
            v = getattr(self, name)
            auto = name == "min_ngram"
            if auto and isinstance(v, str) and v == "auto":
                continue
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                alt = " or 'auto'" if auto else ""
                raise ValueError(f"PromptLookup.{name} must be an int >= 1{alt}, got {v!r}")
        if not isinstance(self.min_ngram, str) and self.min_ngram > self.max_ngram:
            raise ValueError(f"PromptLookup.min_ngram={self.min_ngram} exceeds max_ngram={self.max_ngram}")

    def resolved_min_ngram(self) -> int:
        """min_ngram as a count: "auto" by backend (AUTO_MIN_NGRAM), never above max_ngram."""
        if not isinstance(self.min_ngram, str):
            return int(self.min_ngram)
        return min(int(self.max_ngram), AUTO_MIN_NGRAM.get(jax.default_backend(), AUTO_MIN_NGRAM_ACCELERATOR))

    def plan(self) -> SpecPlan:
        return SpecPlan(int(self.num_tokens), int(self.max_ngram), self.resolved_min_ngram(), None,
                        float(self.min_accept), int(self.cooldown))


@dataclass(frozen=True, eq=False)
class DraftModel:
    """A draft model (cfg, params) sharing the target's vocabulary proposes `num_tokens` tokens
    per iteration (sampled from its own distribution after the target's temperature / top-k /
    top-p; greedy rows take its argmax); its cache is prefilled with the prompt and rolled back
    with the target's. max_verify_tokens: as PromptLookup's."""
    cfg: ModelConfig
    params: object
    num_tokens: int = 4
    min_accept: float = 0.25
    cooldown: int = 16
    max_verify_tokens: int | str | None = "auto"

    @classmethod
    def early_exit(cls, cfg: ModelConfig, params, layers: int, num_tokens: int = 4, **kw) -> "DraftModel":
        """Self-speculation: the target's first `layers` layers, then its own final norm and head
        (no second set of weights; the draft shares the target's arrays)."""
        if not isinstance(layers, (int, np.integer)) or not 1 <= layers < cfg.num_layers:
            raise ValueError(f"early_exit layers must be in [1, {cfg.num_layers - 1}] for a "
                             f"{cfg.num_layers}-layer model, got {layers!r}")
        changes = {"num_layers": int(layers), "name": f"{cfg.name}-exit{layers}"}
        if cfg.layer_types is not None:
            changes["layer_types"] = tuple(cfg.layer_types[:layers])
        dcfg = dataclasses.replace(cfg, **changes)
        dparams = {k: v for k, v in params.items()
                   if not k.startswith("layers_") or int(k.split("_")[1]) < layers}
        return cls(dcfg, dparams, num_tokens, **kw)

    def check(self, cfg: ModelConfig) -> None:
        _check_common(self)
        if self.cfg.vocab_size != cfg.vocab_size:
            raise ValueError(f"DraftModel: the draft's vocabulary ({self.cfg.vocab_size} tokens) differs from "
                             f"the target's ({cfg.vocab_size}); a draft must share the target's tokenizer")

    def plan(self) -> SpecPlan:
        return SpecPlan(int(self.num_tokens), draft_cfg=self.cfg, min_accept=float(self.min_accept),
                        cooldown=int(self.cooldown))


def parse_speculate(spec: str, cfg: ModelConfig | None, params, load=None, max_ngram: int | None = None):
    """A proposer from its command-line form (`kvjax serve --speculate`, experiment configs):

    prompt-lookup:K          PromptLookup(num_tokens=K, max_ngram (None: its default))
    early-exit:LAYERS:K      DraftModel.early_exit with the target's first LAYERS layers (a
                             share in (0, 1) is rounded to a count of the target's layers)
    draft:PATH_OR_NAME:K     DraftModel of the model `load(PATH_OR_NAME)` returns as (cfg, params)

    cfg None only checks the form (returns None for early-exit and draft). ValueError naming
    the spec on anything else."""
    head, _, rest = spec.partition(":")
    try:
        if head == "prompt-lookup" and rest and ":" not in rest:
            return PromptLookup(num_tokens=_count(rest),
                                **({} if max_ngram is None else {"max_ngram": max_ngram}))
        if head == "early-exit" and rest.count(":") == 1:
            share, k = rest.split(":")
            share, k = float(share), _count(k)
            if share <= 0 or (share >= 1 and share != int(share)):
                raise ValueError("LAYERS must be a whole number of layers or a share in (0, 1)")
            if cfg is None:
                return None
            layers = int(share) if share >= 1 else max(1, round(share * cfg.num_layers))
            return DraftModel.early_exit(cfg, params, layers, num_tokens=k)
        if head == "draft" and ":" in rest:
            where, k = rest.rsplit(":", 1)
            k = _count(k)
            if not where:
                raise ValueError("the draft model's path or name is empty")
            if cfg is None:
                return None
            if load is None:
                raise ValueError("no model loader given for a draft model")
            dcfg, dparams = load(where)
            draft = DraftModel(dcfg, dparams, num_tokens=k)
            draft.check(cfg)
            return draft
    except ValueError as e:
        raise ValueError(f"speculate {spec!r}: {e}") from None
    raise ValueError(f"speculate {spec!r}: expected {SPEC_FORMS}")


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"K must be a whole number of proposed tokens, got {text!r}")
    return int(text)


def _check_common(p) -> None:
    name = type(p).__name__
    k = p.num_tokens
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= 64:
        raise ValueError(f"{name}.num_tokens must be an int in [1, 64], got {k!r}")
    if not 0.0 <= float(p.min_accept) <= 1.0:
        raise ValueError(f"{name}.min_accept must be in [0, 1], got {p.min_accept!r}")
    if not isinstance(p.cooldown, (int, np.integer)) or p.cooldown < 0:
        raise ValueError(f"{name}.cooldown must be an int >= 0, got {p.cooldown!r}")
    m = p.max_verify_tokens
    if m is not None and m != "auto" and (not isinstance(m, (int, np.integer)) or isinstance(m, bool) or m < 2):
        raise ValueError(f"{name}.max_verify_tokens must be 'auto', None or an int >= 2, got {m!r}")


class SpeculativeOutput(NamedTuple):
    tokens: jax.Array      # int32 [B, N]: new tokens; after a row's end, pad_token_id
    lengths: jax.Array     # int32 [B]: tokens generated per row, EOS included
    cache: KVCache         # prompt + every generated token
    stats: SpecStats       # proposed / accepted / target forwards per row


def plain_output(out) -> SpeculativeOutput:
    """A plain generate's output as a speculative one (no proposals; one forward per token
    after the first), for batches the verify budget sends to plain decoding."""
    zeros = jnp.zeros_like(out.lengths)
    return SpeculativeOutput(out.tokens, out.lengths, out.cache,
                             SpecStats(zeros, zeros, jnp.maximum(out.lengths - 1, 0)))


def check_cache(cfg: ModelConfig, cache: KVCache, num_tokens: int, where: str = "generate(speculate=...)") -> None:
    """Speculation rolls a rejected token back by not advancing the row's length (and, on a
    ring, forgetting the positions past it; on a pressed cache, emptying its slots and setting
    its fills back: loop.roll_back): dense, int8, pressed and KIVI caches (a KIVI verify chunk
    never completes a residual block: loop.kivi_room); window, sinks and hybrid
    ones whose rings hold at least `num_tokens` slots more than the window they attend over
    (a verify chunk then never overwrites a key the next query still needs)."""
    if cache.kind not in ("dense", "int8", "window", "sinks", "kivi"):
        raise ValueError(f"{where}: speculative decoding runs on dense, int8, window, sinks, KIVI, hybrid and "
                         f"pressed caches; this is a {cache.kind!r} cache")
    fix = (f"(init_cache(..., ring_slack={num_tokens}); generate allocates that itself when it makes the cache)")
    if cache.kind in ("window", "sinks") and cache.slack < num_tokens:
        raise ValueError(f"{where}: this {cache.kind} cache's ring has {cache.slack} slots beyond its window; "
                         f"speculating {num_tokens} tokens needs {num_tokens} {fix}")
    short = [(i, r, cfg.layer_window(i)) for i, r in enumerate(cache.rings)
             if r and r - cfg.layer_window(i) < num_tokens]
    if short:
        i, r, w = short[0]
        raise ValueError(f"{where}: layer {i}'s ring holds {r} slots for a window of {w}; speculating "
                         f"{num_tokens} tokens needs {w + num_tokens} {fix}")


def generate_speculative(cfg: ModelConfig, params, logits, cache: KVCache, prompt_tok: np.ndarray,
                         prompt_lens: np.ndarray, N: int, knobs, plan: SpecPlan, speculate, draft_cache=None):
    """The speculative decode after a prefill (logits [B, V] of each row's last prompt token;
    `cache` holds the prompt, `draft_cache` a DraftModel's prefill of it; `plan`: the
    proposer's `plan()`, with a DecodingPress's schedule where one runs). Histories for prompt
    lookup are the prompts [B, S] (host) plus room for N tokens."""
    B, S = prompt_tok.shape
    hist = np.zeros((B, S + N), np.int32)
    hist[:, :S] = prompt_tok
    dparams = speculate.params if isinstance(speculate, DraftModel) else None
    toks, n, cache, stats = speculative_program(cfg, params, logits, cache, jnp.asarray(hist),
                                                jnp.asarray(prompt_lens, jnp.int32), int(N), knobs,
                                                plan, dparams, draft_cache)
    return SpeculativeOutput(toks, n, cache, stats)


@partial(jax.jit, static_argnums=(0, 6, 8), donate_argnums=(3,))
def speculative_program(cfg, params, logits, cache, hist, hist_len, N, knobs, plan, dparams, dcache):
    return speculative_loop(cfg, params, logits, cache, hist, hist_len, N, knobs, plan, dparams, dcache)


def draft_cache_for(speculate, B: int, max_len: int, kind: str = "dense"):
    """An empty cache for a DraftModel's own prefill (None for prompt lookup)."""
    if not isinstance(speculate, DraftModel):
        return None
    return init_cache(speculate.cfg, B, max_len, kind=kind, hybrid=False)
