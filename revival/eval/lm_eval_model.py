"""revival models as an lm-eval-harness `LM` (the optional extra: pip install 'revival[eval]').

    import lm_eval
    from revival.eval.lm_eval_model import RevivalLM

    lm = RevivalLM("runs/xlstm-125m", batch_size=16)           # or RevivalLM(model=..., tokenizer=...)
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

Importing this module registers the model name "revival" with lm_eval, so
`lm_eval.simple_evaluate(model="revival", model_args="pretrained=runs/xlstm-125m,batch_size=16")` works as well.
The requests are answered by `revival.eval.harness.RevivalScorer` (its docstring: batching, truncation, eos).
"""

from __future__ import annotations

from ..errors import UserError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # the extra is not installed
    raise ImportError("revival.eval.lm_eval_model needs lm-eval-harness: pip install 'revival[eval]' "
                      f"(or pip install lm_eval); {error}") from None

from .harness import RevivalScorer

__all__ = ["RevivalLM"]


@register_model("revival")
class RevivalLM(LM):
    """An lm_eval `LM` over a revival checkpoint (`pretrained`: a run or model directory) or a given model and
    tokenizer."""

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, batch_size: int | str = 8,
                 max_length: int | str | None = None, device: str = "auto", show_progress: bool = False):
        super().__init__()
        batch_size = int(batch_size)
        max_length = None if max_length is None else int(max_length)
        if (pretrained is None) == (model is None):
            raise UserError("RevivalLM: expected either pretrained (a run or model directory) or model= and "
                            "tokenizer=, not both or neither")
        if pretrained is not None:
            self.scorer = RevivalScorer.from_pretrained(pretrained, device=device, batch_size=batch_size,
                                                        max_length=max_length)
        else:
            if tokenizer is None:
                raise UserError("RevivalLM: model= needs tokenizer= as well")
            self.scorer = RevivalScorer(model, tokenizer, batch_size=batch_size, max_length=max_length or 2048,
                                        show_progress=show_progress)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> RevivalLM:
        """lm_eval's "key=value,key=value" model_args (batch_size and device from the command line too)."""
        arguments = dict(item.split("=", 1) for item in arg_string.split(",") if item.strip())
        for key, value in (additional_config or {}).items():
            if value is not None and key in ("batch_size", "device"):
                arguments.setdefault(key, value)
        return cls(**arguments)

    @property
    def device(self):
        return self.scorer.device

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([request.args for request in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        return self.scorer.loglikelihood_rolling([request.args[0] for request in requests])

    def generate_until(self, requests) -> list[str]:
        return self.scorer.generate_until([request.args for request in requests])
