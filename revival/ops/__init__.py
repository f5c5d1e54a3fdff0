"""Pure functions over tensors: the math. No nn.Module, no config.

mLSTM (`mlstm`, `mlstm_step`), sLSTM (`slstm`, `slstm_step`), linear recurrences for minGRU/minLSTM (`mingru_scan`,
`minlstm_scan`, `linear_recurrence_chunked`), Mamba-2's SSD (`ssd`) and the gated delta rule (`gated_delta_rule`).
Output stages with a Triton pass on CUDA beside their PyTorch form: `soft_cap.soft_cap` (logit / gate soft-capping)
`gated_head_norm.gated_head_norm` (the xLSTM-7B layer's sigmoid(o) * per-head norm) and `swiglu.swiglu` (SwiGLU's
silu(gate) * up on the packed up-projection).
"""

from .mlstm import mlstm, mlstm_step
from .scan import gated_delta_rule, linear_recurrence_chunked, mingru_scan, minlstm_scan, ssd
from .slstm import slstm, slstm_step

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
