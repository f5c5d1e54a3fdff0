"""Evaluation beyond the loss: synthetic tasks (`revival eval task`), length extrapolation (`revival eval CHECKPOINT
--extrapolate`) and an lm-eval-harness adapter (`revival.eval.harness`, the optional extra `eval`). docs/eval.md.
"""
