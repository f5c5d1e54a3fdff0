"""Pure functions over tensors: the math. No nn.Module, no config.

mLSTM (`mlstm`, `mlstm_step`), sLSTM (`slstm`, `slstm_step`), linear recurrences for minGRU/minLSTM (`mingru_scan`,
`minlstm_scan`, `linear_recurrence_chunked`), Mamba-2's SSD (`ssd`) and the gated delta rule (`gated_delta_rule`).
Each recurrence is a package `revival.ops.<op>` (`mlstm`, `slstm`, `linear_scan`, `ssd`, `delta_rule`, `conv`,
`attention`) laid out the same way: see docs/architecture.md. Fused elementwise output stages with a Triton pass
on CUDA beside their PyTorch form live in `revival.ops.fused` (`soft_cap`, `gated_head_norm`, `swiglu`).
"""

from .delta_rule import gated_delta_rule
from .linear_scan import linear_recurrence_chunked, mingru_scan, minlstm_scan
from .mlstm import mlstm, mlstm_step
from .slstm import slstm, slstm_step
from .ssd import ssd

__all__ = [
    "gated_delta_rule",
    "linear_recurrence_chunked",
    "mingru_scan",
    "minlstm_scan",
    "mlstm",
    "mlstm_step",
    "slstm",
    "slstm_step",
    "ssd",
]
