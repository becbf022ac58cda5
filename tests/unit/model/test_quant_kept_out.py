"""bitsandbytes stays unimported by runs that quantise nothing (PEFT would import it whenever installed)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from dstrain.model.quant import bitsandbytes_kept_out


def test_inside_the_block_bitsandbytes_looks_missing_and_after_it_imports_again(monkeypatch):
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    with bitsandbytes_kept_out(load_in_4bit=False):
        assert importlib.util.find_spec("bitsandbytes") is None  # what PEFT's is_bnb_available asks
        with pytest.raises(ImportError):
            import bitsandbytes  # noqa: F401
    assert "bitsandbytes" not in sys.modules


def test_a_4bit_run_or_an_earlier_import_is_left_alone(monkeypatch):
    marker = object()
    monkeypatch.setitem(sys.modules, "bitsandbytes", marker)
    with bitsandbytes_kept_out(load_in_4bit=False):
        assert sys.modules["bitsandbytes"] is marker
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    with bitsandbytes_kept_out(load_in_4bit=True):
        assert "bitsandbytes" not in sys.modules
