"""Optional `transformers` interop: tests skip, naming the installed version, when it lacks what they need."""

from __future__ import annotations

import importlib

import pytest


def transformers_attribute(module: str, name: str):
    """`transformers.<module>.<name>`; skips the calling test (or module) when transformers is not installed or its
    installed version does not have it (e.g. `xLSTMLayer`, absent from transformers 5.17)."""
    transformers = pytest.importorskip("transformers")
    try:
        return getattr(importlib.import_module(f"transformers.{module}"), name)
    except (ImportError, AttributeError) as error:
        pytest.skip(f"transformers {transformers.__version__} has no transformers.{module}.{name} ({error})",
                    allow_module_level=True)
