"""Shared test setup: float32 on CPU, strict broadcasting, small seeded models,
reproducible Hypothesis runs, and the switch that makes parity tests mandatory.

Tests run under `jax_numpy_rank_promotion="raise"`, so an implicit rank-broadcast
bug (e.g. [B] + [B, T]) fails loudly instead of silently computing something else.

Hypothesis: the default profile "repro" is derandomized (examples are a fixed function
of the test), so a failure in CI reproduces on any machine with the same command.
`KVJAX_HYPOTHESIS_PROFILE=explore` draws fresh random examples (for local bug hunting;
a failure prints a @reproduce_failure blob). Both have no deadline: the first example
of a jitted function includes its compilation.

Compiled programs: every XLA CPU executable keeps memory mappings until its jit cache is
cleared, and the whole suite compiles enough programs in one process to pass Linux's
default vm.max_map_count (65,530), where the compiler segfaults (seen: 43k mappings half
way through). `_free_compiled_programs` clears JAX's caches after each test module.

Parity: tests that need torch/transformers call `require_module`, which skips when the
package is missing, or fails when KVJAX_REQUIRE_PARITY=1 (set by .ci/run), so CI cannot
pass by silently skipping the comparisons with the reference implementation.
"""
import gc
import importlib
import os

import jax
import numpy as np
import pytest
from hypothesis import settings

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile("repro", derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("KVJAX_HYPOTHESIS_PROFILE", "repro"))

REQUIRE_PARITY = "KVJAX_REQUIRE_PARITY"


def require_module(name: str, reason: str):
    """Import `name`, or skip (module level too) when it is missing; with
    KVJAX_REQUIRE_PARITY=1 a missing module is a test failure instead of a skip."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        error = e            # raise outside the handler: no chained traceback in the report
    if os.environ.get(REQUIRE_PARITY) == "1":
        pytest.fail(f"{REQUIRE_PARITY}=1 but {name} cannot be imported ({error}): {reason}. "
                    f"Install the parity extras (pip install -e '.[parity]'; torch CPU build) "
                    f"or unset {REQUIRE_PARITY} to skip these tests.", pytrace=False)
    pytest.skip(f"{name} not importable ({error}): {reason}", allow_module_level=True)

# The core families every model-level test covers.
FAMILIES = ["gpt2-tiny", "llama-tiny", "mistral-tiny", "qwen2-tiny", "mqa-tiny", "llama3-tiny"]

# Weights drawn with std 0.2 instead of 0.02: random tiny models at 0.02 have nearly flat
# logits, where float32 reduction-order noise could flip a greedy argmax between two
# mathematically equal paths. At 0.2 the top logit is decisive.
INIT_STD = 0.2

_PARAMS = {}


def model(name: str):
    """(cfg, params) for a preset, built once per test session."""
    import kvjax

    if name not in _PARAMS:
        cfg = kvjax.ModelConfig.preset(name)
        _PARAMS[name] = (cfg, kvjax.init_params(cfg, jax.random.key(0), std=INIT_STD))
    return _PARAMS[name]


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drop every compiled program after a test module (see the module docstring)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
