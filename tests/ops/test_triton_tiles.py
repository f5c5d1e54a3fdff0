"""The chunkwise Triton kernels load every transposed operand transposed from memory: no `tl.trans`, `.T`,
`.permute` or `.transpose` in their code (a transposed matrix-unit result feeding another product is the pattern
behind wrong gradients on Hopper in fla #640)."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest


@pytest.mark.parametrize("package", ["revival.ops.delta_rule.triton", "revival.ops.ssd.triton"])
def test_no_kernel_transposes_a_computed_tile(package):
    folder = pathlib.Path(importlib.import_module(package).__file__).parent
    sources = sorted(folder.glob("*.py"))
    assert len(sources) >= 4
    for path in sources:
        attributes = {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}
        assert not attributes & {"trans", "T", "permute", "transpose"}, path.name
