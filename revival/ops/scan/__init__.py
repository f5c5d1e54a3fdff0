"""Linear recurrences: the minGRU/minLSTM log-space scan, a chunked diagonal linear recurrence, Mamba-2's SSD and
the gated delta rule of Gated DeltaNet. Each fast path has a plain loop (`*_reference`) beside it."""

from .delta_rule import gated_delta_rule, gated_delta_rule_reference
from .linear_recurrence import linear_recurrence_chunked, linear_recurrence_reference
from .log_scan import (
    g,
    log_g,
    log_space_scan,
    mingru_log_terms,
    mingru_scan,
    mingru_step,
    minlstm_log_terms,
    minlstm_scan,
    minlstm_step,
)
from .ssd import ssd, ssd_reference

__all__ = [
    "g",
    "gated_delta_rule",
    "gated_delta_rule_reference",
    "linear_recurrence_chunked",
    "linear_recurrence_reference",
    "log_g",
    "log_space_scan",
    "mingru_log_terms",
    "mingru_scan",
    "mingru_step",
    "minlstm_log_terms",
    "minlstm_scan",
    "minlstm_step",
    "ssd",
    "ssd_reference",
]
