"""The KV cache and every layout it takes; see core.py for the layouts and their arrays.

  core.py     KVCache, the kinds, cache_bytes, empty_cache, per-layer ring sizes
  alloc.py    init_cache: an empty cache on one device or on a mesh
  dense.py    dense / int8 / ring (window, sinks, hybrid) slots, writes and reads
  pressed.py  per-head (pressed) and pooled (AdaKV) layouts
  kivi.py     KIVI 2/4-bit storage
  paged.py    the engine's page pools, page-table writes and paged attention
  sharded.py  the sharded layout of each kind on a mesh
  surgery.py  truncate a row, drop its newest tokens, empty it (benchmarks, speculation)
  attend.py   one layer's attention over whichever layout the cache has (the model's seam)
"""
from .alloc import init_cache
from .core import DEFAULT_SINKS, KINDS, KIVI_DEFAULTS, PAGED, KVCache, cache_bytes, empty_cache, layer_rings
from .dense import (assemble, chunk_slots, layer_arrays, quantize_int8, read_layer, scatter_rows,
                    slot_positions, write_layer)
from .pressed import (as_pooled, as_pressed, assemble_pressed, gather_layer_heads, write_layer_heads)
from .sharded import cache_shardings, init_sharded_cache, layout_name, mesh_of
from .surgery import cut_slots, drop_newest, empty_rows, truncate, used_slots
