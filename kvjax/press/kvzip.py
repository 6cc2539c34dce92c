"""KVzip (Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction"): a context's KV pairs are scored by the attention they receive while the
model is asked to repeat the context, then the best (layer, kv head, position) triples are
kept. kvpress 0.5.5's `KVzipPress`, at any batch size, inside one jit, in a pooled cache.

Axis letters: B batch, T context tokens, R reconstruction tokens, K kv heads, N query heads,
G = N / K, H head dim, D model, L layers.

What one `kvjax.prefill(cfg, params, context, lengths, cache, press=KVzipPress(...))` does
(the cache must be empty; `context` starts with the chat template's prefix, e.g.
`<|im_start|>user\\n`, of `prefix_length` tokens):

1. The context is prefilled into a scratch cache that keeps every token (its logits are the
   prefill's result, as with every press: the chunk attends to all of itself).
2. Reconstruction (kvpress `prepare`): the content after the prefix is cut into chunks of
   `chunk_size` tokens; for each chunk the model reads, after the whole context,
   `repeat prompt + suffix + chunk` (teacher forcing: the chunk itself), where the repeat
   prompt is "\\n\\nRepeat the previous context exactly." for the first chunk and "\\n\\nRepeat
   the part of the previous context exactly, starting with" + the previous chunk's last 8
   tokens for later ones, and the suffix is the template's text after a user message (e.g.
   `<|im_end|>\\n<|im_start|>assistant\\n`). Positions continue after the context; every
   chunk starts again from the context alone.
3. Score (kvpress `score_kvzip`), per layer: the reconstruction queries (rotated, as attention
   used them) attend, with one softmax scaled by 1/sqrt(head_dim), over the first
   min(n_sink, chunk start) context keys, the chunk's context keys and their own keys
   (causal); the score of a context position is the maximum of its attention over the
   queries and the G query heads of its kv head. `kvzip_plus_normalization` divides each
   query's row by the norm of its attention input and multiplies each key's column by
   ||v W_o|| for that query head. Positions no chunk reconstructs (the template prefix)
   score 0; the first `n_sink` positions get the row's maximum + 1 (always kept).
4. Select (kvpress `compress_post`): layerwise=False prunes the int(L*K*n*ratio) lowest
   scores of the whole row (so layers keep different amounts); layerwise=True prunes
   int(K*n*ratio) per layer. Within a layer the heads keep uneven counts.
5. The kept (token, head) pairs are written into the caller's cache in the pooled layout
   AdaKVPress uses (one pool of K * max_len slots per layer, a head id per slot), at their
   original positions; later tokens continue at the uncompressed length.

kvpress only masks pruned keys (no memory saved); here the pool holds only the kept pairs.
Each layer's pool is fixed (K * max_len slots). With layerwise=True every layer keeps the
same count, so `press.init_cache` sizes the pools exactly. With layerwise=False a layer may
keep anything from 0 to all of its K * n pairs; `press.init_cache` therefore sizes pools for
all of them (kvpress's selection exactly, no saving beyond the scratch), and a smaller cache
caps each layer at its pool: the selection is then the best kept-budget pairs among those
within their layer's top-(pool size) (kvpress's whenever no layer's share exceeds its pool;
otherwise the excess goes to the next-best pairs of other layers, so the total is kept).

A later turn (a prefill into a non-empty cache) is refused: KVzip scores a context by
reconstructing it from an empty cache.
"""
from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .base import Keep, LayerInputs, Press, check_ratio, top_per_head

REPEAT_PROMPT = "\n\nRepeat the previous context exactly."
REPEAT_PART_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
PREV_POSTFIX = 8          # kvpress `prepare(prev_postfix_size=8)`
_NEG = float(jnp.finfo(jnp.float32).min)


def chat_pieces(tokenizer) -> tuple[str, str]:
    """(prefix text, suffix text) of a user message in the tokenizer's chat template, split as
    kvpress does: around a dummy content, with the generation prompt and enable_thinking=False.
    A Hugging Face tokenizer without a template gives ("", "\\n") (kvpress's fallback); the
    byte tokenizer always has a format (its own, or a Jinja template set on it)."""
    from ..tokenizer import ByteTokenizer

    if not isinstance(tokenizer, ByteTokenizer) and getattr(tokenizer, "chat_template", None) is None:
        return "", "\n"
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                         add_generation_prompt=True, tokenize=False, enable_thinking=False)
    head, suffix = text.split(separator)
    return head.split(dummy)[0], suffix


def _chat_encode(tokenizer, text: str) -> list[int]:
    """Ids of template text as a chat context starts: the byte tokenizer's chat ids begin with
    <bos> (its template text cannot hold it); Hugging Face templates write their own."""
    from ..tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        if tokenizer.chat_template is not None:     # a Jinja template writes <bos> itself
            return tokenizer.encode_with_specials(text, add_special_tokens=False)
        return tokenizer.encode(text)
    return tokenizer.encode(text, add_special_tokens=False)


def chat_context(tokenizer, context: str) -> tuple[list[int], str]:
    """(context ids, question suffix) for a KVzip context, as kvpress's pipeline builds them:
    the context as the start of a user message (template prefix + text), and the text that
    must follow a question (the rest of the message and the generation prompt)."""
    prefix, suffix = chat_pieces(tokenizer)
    return _chat_encode(tokenizer, prefix + context), suffix


@dataclass(frozen=True)
class KVzipPress(Press):
    """kvpress's KVzipPress (see the module docstring). Arguments as kvpress: compression_ratio,
    layerwise, n_sink, kvzip_plus_normalization, chunk_size. The reconstruction prompt needs
    the chat template's pieces: pass `tokenizer=` (any kvjax tokenizer; its chat template, or
    kvpress's fallback without one), or the ids themselves: `prefix_length` (template tokens
    at the start of every context row), `suffix_ids` (the template after a user message),
    `repeat_ids` and `repeat_part_ids` (the two repeat prompts, encoded)."""
    compression_ratio: float = 0.0
    layerwise: bool = False
    n_sink: int = 4
    kvzip_plus_normalization: bool = False
    chunk_size: int = 2048
    prefix_length: int | None = None
    suffix_ids: tuple = ()
    repeat_ids: tuple = ()
    repeat_part_ids: tuple = ()
    tokenizer: InitVar = None
    pooled = True
    whole_model = True    # kvjax.prefill hands it to kvjax/decode/kvzip.py (model passes of its own)

    def __post_init__(self, tokenizer):
        check_ratio(self.compression_ratio)
        for name in ("n_sink", "chunk_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "chunk_size" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'chunk_size' else 0}, got {v!r}")
        if tokenizer is not None:
            if self.prefix_length is not None or self.suffix_ids or self.repeat_ids or self.repeat_part_ids:
                raise ValueError("KVzipPress: give tokenizer= or the ids (prefix_length, suffix_ids, "
                                 "repeat_ids, repeat_part_ids), not both")
            prefix, suffix = chat_pieces(tokenizer)
            enc = lambda t: tuple(int(i) for i in tokenizer.encode(t, add_special_tokens=False))  # noqa: E731
            object.__setattr__(self, "prefix_length", len(_chat_encode(tokenizer, prefix)))
            object.__setattr__(self, "suffix_ids", enc(suffix))
            object.__setattr__(self, "repeat_ids", enc(REPEAT_PROMPT))
            object.__setattr__(self, "repeat_part_ids", enc(REPEAT_PART_PROMPT))
        if self.prefix_length is None or not self.repeat_ids or not self.repeat_part_ids:
            raise ValueError("KVzipPress needs the reconstruction prompt: pass tokenizer= (a kvjax "
                             "tokenizer, e.g. kvjax.load_tokenizer(folder)) or prefix_length, suffix_ids, "
                             "repeat_ids and repeat_part_ids")
        p = self.prefix_length
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ValueError(f"prefix_length must be an int >= 0, got {self.prefix_length!r}")
        for name in ("suffix_ids", "repeat_ids", "repeat_part_ids"):
            ids = tuple(getattr(self, name))
            if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"{name} must be token ids (ints >= 0), got {ids!r}")
            object.__setattr__(self, name, tuple(int(i) for i in ids))

    # ------------------------------------------------------------------ host side

    def host_budgets(self, n, cfg):
        raise ValueError("KVzipPress runs its own reconstruction passes in kvjax.prefill: prefill the "
                         "context with press=KVzipPress(...), then generate from the returned cache")

    def kept_bound(self, n, cfg):
        """Pool slots per layer and row: layerwise, the layer's kept pairs; otherwise all K * n
        (a layer may keep all of its pairs under the global selection)."""
        n = np.asarray(n, np.int64)
        K, L = cfg.num_kv_heads, cfg.num_layers
        if self.layerwise:
            kept = K * n - (K * n * self.compression_ratio).astype(np.int64)
        else:
            kept = K * n
        return np.broadcast_to(kept, (L, len(n))).astype(np.int64).copy()

    def keep(self, inp: LayerInputs) -> Keep:
        raise ValueError("KVzipPress scores with whole-model reconstruction passes; use it through "
                         "kvjax.prefill(..., press=KVzipPress(...))")


def pool_slots(cache, layer: int) -> int:
    """(token, head) pairs layer `layer` of an empty cache can pool: K x slots, or a pool's slots."""
    return cache.layer_slots(layer) * (1 if cache.pooled else cache.keys[layer].shape[1])


def chunk_plan(T: int, prefix: int, chunk: int, n_repeat: int, n_part: int, n_suffix: int):
    """Static reconstruction chunks for a context of width T: (start, reconstruction width,
    chunk width). kvpress: one chunk unless the content is longer than chunk_size."""
    content = T - prefix
    count = 1 if content <= chunk else -(-content // chunk)
    out = []
    for i in range(count):
        start = prefix + i * chunk
        width = min(chunk, T - start) if count > 1 else content
        q = n_repeat if i == 0 else n_part + min(PREV_POSTFIX, chunk)
        out.append((start, q + n_suffix + width, width))
    return tuple(out)


@dataclass(eq=False)
class ChunkScorer:
    """Scores one reconstruction chunk inside each layer's attention (kvjax.press's per-layer
    hook) and records them; keeps none of the reconstruction tokens. Lives for one trace."""
    press: KVzipPress
    ctx: list                 # per layer (keys, values) [B, K, T, H] of the context
    start: int                # first context position of the chunk (static)
    width: int                # chunk width (static)
    chunk_len: jax.Array      # int32 [B] real chunk tokens per row
    sink: int                 # min(n_sink, start)
    out: list = dataclasses.field(default_factory=list)
    needs_attention = False

    def keep(self, inp: LayerInputs) -> Keep:
        self.out.append(_chunk_scores(self, inp))
        B, R, K = inp.k.shape[:3]
        return Keep(jnp.zeros((B, K, R), bool))


def _chunk_scores(sc: ChunkScorer, inp: LayerInputs) -> jax.Array:
    """float32 [B, K, width]: the chunk's context positions' max attention (kvpress score_kvzip)."""
    kc, vc = sc.ctx[inp.layer]
    B, R, N, H = inp.q_rot.shape
    K = kc.shape[1]
    s, a, w = sc.sink, sc.start, sc.width
    keys = jnp.concatenate([kc[:, :, :s], kc[:, :, a:a + w], jnp.swapaxes(inp.k, 1, 2)], axis=2)   # [B,K,J,H]
    q = inp.q_rot.astype(jnp.float32).reshape(B, R, K, N // K, H)
    logits = jnp.einsum("brkgh,bkjh->bkgrj", q, keys.astype(jnp.float32)) / np.sqrt(H)
    j = jnp.arange(s + w + R)
    i = jnp.arange(R)
    chunk_ok = (j[None, :] < s) | ((j[None, :] - s) < sc.chunk_len[:, None])                      # [B, J]
    own = j[None, None, :] - (s + w)                                                               # [1,1,J]
    causal = (own <= i[None, :, None]) & (own < inp.lengths[:, None, None])                        # [B, R, J]
    visible = jnp.where(j[None, None, :] < s + w, chunk_ok[:, None, :], causal)                   # [B, R, J]
    attn = jax.nn.softmax(jnp.where(visible[:, None, None], logits, _NEG), axis=-1)               # [B,K,G,R,J]
    if sc.press.kvzip_plus_normalization:
        h_norm = jnp.linalg.norm(inp.x.astype(jnp.float32), axis=-1)                               # [B, R]
        attn = attn / h_norm[:, None, None, :, None]
        vals = jnp.concatenate([vc[:, :, :s], vc[:, :, a:a + w], jnp.swapaxes(inp.v, 1, 2)], axis=2)
        wo = inp.o_kernel.astype(jnp.float32).reshape(K, N // K, H, -1)                          # [K,G,H,D]
        wov = jnp.linalg.norm(jnp.einsum("bkjh,kghd->bkgjd", vals.astype(jnp.float32), wo), axis=-1)
        attn = attn * wov[:, :, :, None, :]
    valid_q = i[None, :] < inp.lengths[:, None]                                                    # [B, R]
    cols = jnp.where(valid_q[:, None, None, :, None], attn[..., s:s + w], -jnp.inf)
    return cols.max(axis=(2, 3))                                                                   # [B, K, w]


def rep_tokens(press: KVzipPress, tokens, lengths, start: int, rep_width: int, width: int, first: bool):
    """int32 [B, rep_width] reconstruction tokens of one chunk and their lengths [B]."""
    B, T = tokens.shape
    if first:
        q = jnp.broadcast_to(jnp.asarray(press.repeat_ids, jnp.int32), (B, len(press.repeat_ids)))
    else:
        tail = min(PREV_POSTFIX, press.chunk_size)
        q = jnp.concatenate([jnp.broadcast_to(jnp.asarray(press.repeat_part_ids, jnp.int32),
                                              (B, len(press.repeat_part_ids))),
                             tokens[:, start - tail:start]], axis=1)
    suffix = jnp.broadcast_to(jnp.asarray(press.suffix_ids, jnp.int32), (B, len(press.suffix_ids)))
    rep = jnp.concatenate([q, suffix, tokens[:, start:start + width]], axis=1)
    chunk_len = jnp.clip(lengths - start, 0, width)
    rep_len = jnp.where(chunk_len > 0, q.shape[1] + suffix.shape[1] + chunk_len, 0)
    assert rep.shape[1] == rep_width
    return rep, rep_len.astype(jnp.int32), chunk_len.astype(jnp.int32)
