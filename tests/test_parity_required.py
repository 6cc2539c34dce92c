"""KVJAX_REQUIRE_PARITY=1 turns a missing parity dependency (torch, transformers) into a
failure instead of a skip, so CI cannot pass with the reference comparisons silently off.

The module is hidden by a None entry in sys.modules, which makes `import` raise
ImportError exactly as an uninstalled package does.
"""
import sys

import pytest

from conftest import REQUIRE_PARITY, require_module


@pytest.mark.parametrize("name", ["torch", "transformers"])
def test_missing_module_skips_by_default_and_fails_when_required(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delenv(REQUIRE_PARITY, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{name} not importable .*: parity needs it"):
        require_module(name, "parity needs it")
    for value in ("0", ""):                 # only "1" makes it mandatory
        monkeypatch.setenv(REQUIRE_PARITY, value)
        with pytest.raises(pytest.skip.Exception):
            require_module(name, "parity needs it")
    monkeypatch.setenv(REQUIRE_PARITY, "1")
    with pytest.raises(pytest.fail.Exception, match=f"KVJAX_REQUIRE_PARITY=1 but {name} cannot be imported"):
        require_module(name, "parity needs it")


def test_present_module_is_returned_whatever_the_switch(monkeypatch):
    monkeypatch.setenv(REQUIRE_PARITY, "1")
    assert require_module("json", "stdlib") is sys.modules["json"]
