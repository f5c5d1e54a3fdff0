"""Test-session setup shared by every test file."""

import os

import torch

# Triton's CPU interpreter must be chosen before triton is first imported; without a GPU, the kernel tests use it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
