"""Replay prompt lookup on a model's real greedy outputs: which n-gram range and switch pay.

    python benchmarks/lookup_replay.py                         # SmolLM2, 6 prompts per task
    python benchmarks/lookup_replay.py --prompts 3 --verify-cost 1.2 2.8

Speculative decoding's output is the model's own whatever is proposed, so how well a
proposer does is a property of the greedy text alone: this script generates each prompt's
greedy continuation once (plain `kvjax.generate`, the speculative kind's prompts), then
replays the prompt-lookup loop on it with kvjax's own proposer (`lookup.propose`) and
adaptive switch (`loop.adapt`, with the lookup's `shadow_hits`), one row at a time: each
iteration proposes from the history, accepts the leading run that equals the greedy text,
emits it and the next token. Per setting and task it reports tokens per target forward and
the decode speedup under a cost model: a verify forward costs `--verify-cost` plain steps
(about 2.8 on this project's 2-core CPU for SmolLM2 at batch 1 with up to 17 rows, from
the measured decode speedups; about 1 where a forward is bound by reading the weights), a
step without proposals costs 1. Also the oracle: at every step the longest run any
position of the history would have given, proposed only where it pays under the cost model.

Session 15's finding (BUILD_NOTES, "Which n-grams to propose from"): at CPU cost a
one-token match proposes more than it pays for (min_ngram 2), and the shadow re-enable
matters most where verifying is cheap.
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.decode.speculative import lookup
from kvjax.decode.speculative.loop import adapt, shadow_hits
from kvjax.runner.kinds.speculative import _encode, prompts


def greedy_texts(model: str, tasks, n: int, new_tokens: int, seed: int) -> dict:
    """{task: [(prompt ids, greedy continuation ids)]} by plain generate, one prompt at a time."""
    cfg, params, tok = kvjax.load_model(model)
    eos = [e for e in tok.eos_ids if e < cfg.vocab_size] or None
    out = {}
    for task in tasks:
        rows = []
        for text in prompts(task, n, seed):
            ids = _encode(tok, text, True)
            res = kvjax.generate(cfg, params, np.array([ids], np.int32), np.array([len(ids)], np.int32),
                                 max_new_tokens=new_tokens, eos_token_id=eos, max_len=len(ids) + new_tokens)
            rows.append((ids, [int(x) for x in np.asarray(res.tokens)[0][:int(res.lengths[0])]]))
        out[task] = rows
    return out


def replay(ids, gen, spec: kvjax.PromptLookup, cost: float, shadow_on: bool = True):
    """(target forwards, modelled cost in plain steps) of prompt lookup on one greedy text
    (shadow_on False: the switch without the lookup's shadow hits, as before session 15)."""
    plan, k = spec.plan(), spec.num_tokens
    H = len(ids) + len(gen) + 1
    hist = np.zeros((1, H), np.int32)
    hist[0, :len(ids) + 1] = ids + gen[:1]
    t, forwards, total = 1, 0, 0.0
    rate, off = jnp.ones((1,), jnp.float32), jnp.zeros((1,), jnp.int32)
    while t < len(gen):
        drafts, nv = lookup.propose(jnp.asarray(hist), jnp.asarray([len(ids) + t], jnp.int32), k,
                                    plan.max_ngram, plan.min_ngram)
        drafts, found = np.asarray(drafts)[0], int(nv[0])
        n = min(found, len(gen) - t - 1) if int(off[0]) <= 0 else 0
        m = 0
        while m < n and drafts[m] == gen[t + m]:
            m += 1
        shadow = shadow_hits(jnp.asarray([found > 0]), jnp.asarray(drafts[None]), jnp.asarray([gen[t]])) \
            if shadow_on else None
        rate, off = adapt(rate, off, jnp.asarray([n]), jnp.asarray([m]), plan, shadow)
        hist[0, len(ids) + t:len(ids) + t + m + 1] = gen[t:t + m + 1]
        t, forwards, total = t + m + 1, forwards + 1, total + (cost if n else 1.0)
    return forwards, total


def oracle(ids, gen, k: int, cost: float) -> float:
    """Modelled cost of the best copying proposer: at each step the longest run (up to k) of
    the text ahead that starts anywhere in the history, proposed only where it pays."""
    h, t, total = ids + gen[:1], 1, 0.0
    while t < len(gen):
        best = 0
        for j in range(len(h)):
            m = 0
            while m < k and j + m < len(h) and t + m < len(gen) - 1 and h[j + m] == gen[t + m]:
                m += 1
            best = max(best, m)
        m = best if best + 1 > cost else 0
        total += cost if m else 1.0
        h, t = h + gen[t:t + m + 1], t + m + 1
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", nargs="+", default=["repeat_code", "edit_code", "quote", "chat"])
    ap.add_argument("--prompts", type=int, default=6, help="prompts per task")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--num-tokens", type=int, default=16, help="proposed tokens per iteration")
    ap.add_argument("--verify-cost", type=float, nargs="+", default=[2.8, 1.2])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    texts = greedy_texts(a.model, a.tasks, a.prompts, a.new_tokens, a.seed)
    settings = {f"n-gram {lo}-{hi}, cooldown {cd}{'' if sh else ', no shadow'}":
                (kvjax.PromptLookup(a.num_tokens, max_ngram=hi, min_ngram=lo, cooldown=cd), sh)
                for lo, hi, cd, sh in [(1, 3, 16, False), (1, 3, 16, True), (1, 5, 64, True), (2, 5, 64, True),
                                       (3, 5, 64, True)]}
    for cost in a.verify_cost:
        print(f"\nverify forward = {cost} plain steps; {a.model}, {a.prompts} prompts per task, "
              f"{a.num_tokens} proposed tokens: decode speedup (tokens / forward)")
        print("| setting | " + " | ".join(a.tasks) + " |\n|" + " --- |" * (len(a.tasks) + 1))
        for name, (spec, sh) in settings.items():
            cells = []
            for task in a.tasks:
                runs = [replay(i, g, spec, cost, sh) for i, g in texts[task]]
                steps = sum(len(g) - 1 for _, g in texts[task])
                cells.append(f"{steps / sum(c for _, c in runs):.2f} ({steps / sum(f for f, _ in runs):.2f})")
            print(f"| {name} | " + " | ".join(cells) + " |")
        cells = [f"{sum(len(g) - 1 for _, g in texts[t]) / sum(oracle(i, g, a.num_tokens, cost) for i, g in texts[t]):.2f}"
                 for t in a.tasks]
        print("| oracle | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
