"""Triton mLSTM kernels (GPU). Filled in by the GPU kernel work; `available()` says whether they can run."""


def available() -> bool:
    return False
