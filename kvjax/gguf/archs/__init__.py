"""Per-architecture rules of GGUF files, one small module per family group:

  base.py         the rule type (`Arch`), the fields and tensor names every architecture
                  shares, helpers
  llama.py        llama (Llama 2/3, Mistral): Q/K permutation undone
  llama3_rope.py  rope_freqs.weight -> llama3 rope_scaling
  gemma.py        gemma, gemma2, gemma3: 1 + w norms, hard-coded windows and scales
  qwen.py         qwen2, qwen3          phi3.py  phi3 (fused, partial rotary, longrope)
  olmo2.py        olmo2 (post-norms, whole-projection q/k norms)

`ARCHS` maps general.architecture to its `Arch`; kvjax.gguf.arch applies them generically.
"""
from __future__ import annotations

from . import gemma, llama, olmo2, phi3, qwen
from .base import LAYER, TOP, Arch

# llama, gemma3 first: the architectures kvjax read first (error messages list them so).
ARCHS = {r.name: r for m in (llama, gemma, qwen, phi3, olmo2) for r in m.RULES}

__all__ = ["ARCHS", "Arch", "LAYER", "TOP"]
