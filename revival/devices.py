"""`resolve_device`: the one reading of a device option ("auto", "cpu", "cuda", "cuda:N") for every command."""

from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(name: str | torch.device, argument: str = "device") -> torch.device:
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N" (or a torch.device, returned as is);
    `argument` names the option in errors."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{argument}: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{argument}: {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device
