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

Compilation cache: the suite compiles many identical programs in different modules (the
same tiny presets, shapes and decode loops), and `_free_compiled_programs` drops them after
each module. `pytest_configure` points JAX's persistent compilation cache at a directory
made fresh for this run (shared by the pytest-xdist workers, removed at the end), so a
program compiled once is read back instead of compiled again: never a result from an
earlier run or another checkout. KVJAX_TEST_COMPILE_CACHE=0 turns it off.

Parallel: pyproject's addopts run the suite on pytest-xdist workers (`-n auto`, capped by
`pytest_xdist_auto_num_workers` below; `-n 0` runs in one process), a whole module per
worker (`--dist loadfile`) so module-scoped fixtures are built once.

Parity: tests that need torch/transformers call `require_module`, which skips when the
package is missing, or fails when KVJAX_REQUIRE_PARITY=1 (set by .ci/run), so CI cannot
pass by silently skipping the comparisons with the reference implementation.
"""
import gc
import importlib
import os
import shutil
import tempfile

# Tests compile thousands of small programs and run each a few times: LLVM's optimisation
# passes cost more than they save (test_decode_equivalence: 111 s -> 87 s, session 12). Only
# here, never for users; an XLA_FLAGS that names its own level is left alone.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax
import numpy as np
import pytest
from hypothesis import settings

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile("repro", derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("KVJAX_HYPOTHESIS_PROFILE", "repro"))

REQUIRE_PARITY = "KVJAX_REQUIRE_PARITY"
COMPILE_CACHE = "KVJAX_TEST_COMPILE_CACHE"
_OWN_CACHE = []      # the directory this process made (the xdist controller, or a plain run)


def pytest_configure(config):
    """A fresh persistent compilation cache for this run (see the module docstring)."""
    path = os.environ.get(COMPILE_CACHE)
    if path == "0":
        return
    if not path:                       # the first process of the run: workers inherit the env
        path = tempfile.mkdtemp(prefix="kvjax-test-jit-")
        os.environ[COMPILE_CACHE] = path
        _OWN_CACHE.append(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    for path in _OWN_CACHE:
        shutil.rmtree(path, ignore_errors=True)
        os.environ.pop(COMPILE_CACHE, None)


# The modules that take longest (seconds of one worker, session 12), started first so that
# no long module is left running alone at the end of a parallel run.
LONGEST_FIRST = ["test_speculative.py", "test_press.py", "test_sharding.py", "test_kvpress_real.py",
                 "test_serve.py", "test_gguf.py", "test_engine.py", "test_decode_equivalence.py",
                 "test_cache_kinds.py", "test_long_press_benchmark.py", "test_engine_speculative.py",
                 "test_shared_prefill.py", "test_hf_families.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the rest keep their order


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each worker's XLA runs its programs on
    every core; compilation, most of this suite's time, is single-threaded)."""
    return max(1, min(4, os.cpu_count() or 1))


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
