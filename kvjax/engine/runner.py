"""The engine's model runner: a scheduler step (scheduler.py) in, device calls, sampled tokens out.

Axis letters: B rows of a call, T chunk width, W pages per row, L layers, P pages in the
pool, K kv heads, Z tokens per page, H head dim, X top log-probabilities returned.

It owns what lives on the device: the parameters, the paged key/value pools (L arrays
[P, K, Z, H] each, donated to every call) and their placement on a mesh, and it counts the
programs compiled for its calls (`programs.trace_count`: a new trace of a jitted program is
a new compilation). It decides nothing: which rows run, with which pages and shapes, is in
the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from ..buckets import pow2
from ..cache.paged import init_pools
from ..config import ModelConfig
from . import programs
from .scheduler import DecodeStep, PrefillStep
from .speculative import spec_decode_steps


@dataclass
class DecodeCall:
    """A decode call in flight (its outputs not read yet)."""
    step: DecodeStep
    state: dict          # the call's inputs (device)
    final: dict          # its final tok, lens, n, active (device): a chained call starts from them
    outputs: tuple       # tokens [k, B], emitted [k, B], logprob outputs or None (device)


class Runner:
    """Parameters and pools on the device (one, or a mesh: see `_Placement`), and the calls."""

    def __init__(self, cfg: ModelConfig, params, mesh, num_pages: int, page_size: int, dtype,
                 max_slots: int, speculate=None):
        self.cfg, self.num_pages, self.page_size, self.dtype = cfg, num_pages, page_size, dtype
        self._place = _Placement(cfg, mesh, max_slots)
        self.mesh, self.min_rows = self._place.mesh, self._place.min_rows
        self.params = self._place.params(params)
        # speculation (engine/speculative.py): the plan, and a draft model's parameters and
        # pools (addressed by the target's page table: same pages, the draft's layers and heads)
        self.plan = speculate.plan() if speculate is not None else None
        self.draft_cfg = self.plan.draft_cfg if self.plan is not None else None
        self.dparams = speculate.params if self.draft_cfg is not None else None
        self.keys, self.values = self._new_pools(cfg)
        self.dpools = self._new_pools(self.draft_cfg) if self.draft_cfg is not None else None
        self.counters = dict(compilations=0, prefill_calls=0, decode_calls=0)

    def _new_pools(self, c: ModelConfig):
        return init_pools(c.num_layers, self.num_pages, c.num_kv_heads, self.page_size, c.head_dim,
                          self.dtype, self._place.pool_sharding)

    def pools_lost(self) -> bool:
        """Whether a failed call took the pools with it (donated, then not returned)."""
        pools = list(self.keys) + list(self.values) + (list(self.dpools[0]) + list(self.dpools[1])
                                                       if self.draft_cfg is not None else [])
        return any(a.is_deleted() for a in pools)

    def reset_pools(self):
        """Fresh zeroed pools (after a failed call: the donated ones may be gone)."""
        self.keys, self.values = self._new_pools(self.cfg)
        if self.draft_cfg is not None:
            self.dpools = self._new_pools(self.draft_cfg)

    def prefill(self, step: PrefillStep) -> dict:
        """Run one prefill chunk; its outputs on the host (see Scheduler.update_from_output)."""
        samp = dict(step.sampling, targets=step.targets)
        args = self._place.rows(step.tokens, step.lengths, step.starts, step.table, samp, step.index)
        traces = programs.trace_count()
        out, self.keys, self.values = programs.prefill_chunk(
            self.cfg, self.params, self.keys, self.values, *args, step.logprobs, step.prompt_logprobs,
            self._place.pool_sharding)
        if self.draft_cfg is not None:      # the draft's pools take the same tokens at the same pages
            _, dk, dv = programs.prefill_chunk(self.draft_cfg, self.dparams, *self.dpools, *args, False, False,
                                               self._place.pool_sharding)
            self.dpools = (dk, dv)
        self.counters["compilations"] += programs.trace_count() - traces
        self.counters["prefill_calls"] += 1
        return jax.device_get(out)

    def dispatch_decode(self, step: DecodeStep, prev: DecodeCall | None = None) -> DecodeCall:
        """Start one decode call (asynchronously). A chained step (step.state None) continues
        on the device from `prev`, the call in flight: its last tokens, lengths, counts and
        active flags."""
        if step.state is None:
            state = {**prev.state, **prev.final}
            (table,) = self._place.rows(step.table)
        else:
            state, table = self._place.rows(step.state, step.table)
        traces = programs.trace_count()
        if self.plan is not None and "hist" in state:     # a speculative call (Scheduler.speculating)
            out, final, self.keys, self.values, self.dpools = spec_decode_steps(
                self.cfg, self.params, self.keys, self.values, state, table, step.steps, step.logprobs,
                self.plan, self._place.pool_sharding, self.dparams, self.dpools)
            outputs = out
        else:
            toks, emitted, extra, final, self.keys, self.values = programs.decode_steps(
                self.cfg, self.params, self.keys, self.values, state, table, step.steps, step.logprobs,
                self._place.pool_sharding)
            outputs = (toks, emitted, extra)
        self.counters["compilations"] += programs.trace_count() - traces
        self.counters["decode_calls"] += 1
        return DecodeCall(step, state, final, outputs)

    def collect(self, call: DecodeCall) -> dict:
        """A decode call's outputs on the host (waits for it): token and emitted [S, B] (a row's
        tokens first, in order: emitted[:, b] is a prefix), and logprob [S, B], top, top_ids
        [S, B, X] when the step asked for them. S is the call's steps; a speculative call packs
        its iterations' accepted runs (S = steps x (k + 1)) and adds its proposal counts
        (proposed / accepted / forwards [B]) and the rows' adaptive state (rate / off [B])."""
        if self.plan is not None and "hist" in call.state:
            return _pack(*jax.device_get((call.outputs, {k: call.final[k] for k in ("rate", "off")})))
        toks, emitted, extra = jax.device_get(call.outputs)
        out = {"token": toks, "emitted": emitted}
        if extra is not None:
            out["logprob"], out["top"], out["top_ids"] = extra
        return out


def _pack(out: dict, final: dict) -> dict:
    """A speculative call's outputs in the plain call's layout: each row's emitted tokens of every
    iteration (token [steps, B, k + 1], count [steps, B]) one after another from index 0."""
    steps, B, k1 = out["token"].shape
    S = steps * k1
    keep = np.arange(k1)[None, None, :] < out["count"][..., None]               # [steps, B, k + 1]
    order = np.argsort(~keep.transpose(1, 0, 2).reshape(B, S), axis=1, kind="stable")   # kept first
    gather = lambda a: np.take_along_axis(a.transpose(1, 0, 2, *range(3, a.ndim)).reshape(B, S, *a.shape[3:]),  # noqa: E731
                                          order.reshape(B, S, *([1] * (a.ndim - 3))), axis=1).swapaxes(0, 1)
    packed = {"token": gather(out["token"]), "emitted": np.arange(S)[:, None] < out["count"].sum(0)[None, :]}
    for name in ("logprob", "top", "top_ids"):
        if name in out:
            packed[name] = gather(out[name])
    packed.update({name: out[name] for name in ("proposed", "accepted", "forwards")}, **final)
    return packed


class _Placement:
    """Where the engine's arrays live: one device, or a mesh (requests over "data", kv heads
    of the pools and the model's heads over "model", the pool's pages replicated over data)."""

    def __init__(self, cfg: ModelConfig, mesh, max_slots: int):
        self.cfg, self.mesh = cfg, mesh
        self.min_rows = 1
        self.pool_sharding = None
        if mesh is None:
            return
        from .. import sharding
        sharding.check_mesh(cfg, mesh)
        self.mesh = mesh = sharding.auto_axes(mesh)   # jax.make_mesh's Explicit axes: see sharding.py
        d = mesh.shape["data"]
        self.min_rows = pow2(d)
        if self.min_rows != d:
            raise ValueError(f"Engine: the mesh's data axis ({d}) must be a power of two (request rows "
                             f"are bucketed to powers of two and split over it)")
        from jax.sharding import NamedSharding, PartitionSpec as P
        heads = sharding.layout(cfg, mesh)["kv_heads"]
        self.pool_sharding = NamedSharding(mesh, P(None, heads, None, None))

    def params(self, params):
        if self.mesh is None:
            return params
        from ..sharding import shard_params
        return shard_params(self.cfg, params, self.mesh)

    def rows(self, *trees):
        """Host arrays whose first axis is the request rows, placed for the program."""
        if self.mesh is None:
            return trees          # jit moves NumPy arguments itself (its fast C++ path)
        from ..sharding import batch_sharding, to_global
        return jax.tree.map(lambda a: to_global(a, batch_sharding(self.mesh, np.ndim(a))), trees)
