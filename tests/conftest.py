"""Test-session setup shared by every test file."""

import importlib.util
import os

import torch

# Triton's CPU interpreter must be chosen before triton is first imported; without a GPU, the kernel tests use it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    from tests._triton_interpreter import install

    install()  # faster scans and device-function calls in the interpreter (bit-identical results)
