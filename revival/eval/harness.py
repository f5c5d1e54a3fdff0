"""The three requests of lm-eval-harness, answered by a revival model: `RevivalScorer` (no lm_eval needed here).

    scorer = RevivalScorer.from_pretrained("runs/xlstm-tiny", batch_size=16)
    scorer.loglikelihood([("The capital of France is", " Paris")])   # [(log p, is_greedy)]
    scorer.loglikelihood_rolling(["a whole document"])                # [log p of every token]
    scorer.generate_until([("Q: 2+2=\\nA:", {"until": ["\\n"], "max_gen_toks": 8})])

`revival.eval.lm_eval_model.RevivalLM` wraps it as an lm_eval `LM` (pip install 'revival[eval]'), docs/eval.md.

Conventions (the ones revival trains with): every text is read after the end-of-text token, as each training
document is, so a context may be empty; a context is cut on the left to `max_length` tokens (the training context by
default). loglikelihood requests are batched longest first, right-padded (a causal model never reads the padding);
generate_until requests with the same generation arguments are batched, left-padded with an attention mask (each row
generates what it would alone); loglikelihood_rolling reads one document at a time, scored as `revival eval` scores
it (the whole prefix for recurrent models, windows of max_length for attention).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError

__all__ = ["RevivalScorer"]

DEFAULT_MAX_GEN_TOKS = 256


class RevivalScorer:
    """loglikelihood / loglikelihood_rolling / generate_until over a `LanguageModel` and its tokenizer."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 2048, show_progress: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise UserError(f"max_length: expected an integer >= 2, got {max_length!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length, self.show_progress = batch_size, max_length, show_progress

    @classmethod
    def from_pretrained(cls, checkpoint: str, device: str = "auto", batch_size: int = 8,
                        max_length: int | None = None) -> RevivalScorer:
        """A run directory, checkpoints/ folder or model directory; max_length defaults to the run's context."""
        from ..train.checkpoint import load_for_inference

        model, tokenizer, _, run_config = load_for_inference(checkpoint, device)
        context = int((run_config.get("data") or {}).get("context_length") or 2048)
        return cls(model, tokenizer, batch_size=batch_size, max_length=max_length or context)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _progress(self, total: int, description: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=description, disable=not self.show_progress, leave=False)

    # ---------------------------------------------------------------------------------------------- loglikelihood
    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): (sum of log p(continuation tokens | eos + context), whether greedy
        decoding would produce exactly the continuation)."""
        encoded = []
        for context, continuation in requests:
            continuation_ids = self.tokenizer.encode(continuation)
            if not continuation_ids:
                raise UserError(f"loglikelihood: the continuation {continuation!r} has no tokens")
            tokens = [self.tokenizer.eos_id, *self.tokenizer.encode(context), *continuation_ids]
            tokens = tokens[-(self.max_length + 1) :]
            encoded.append((tokens, min(len(continuation_ids), len(tokens) - 1)))
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(encoded)
        progress = self._progress(len(encoded), "loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(encoded[batch[0]][0]) - 1
            inputs = torch.full((len(batch), width), self.tokenizer.eos_id, dtype=torch.long)
            for row, index in enumerate(batch):
                tokens = encoded[index][0]
                inputs[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
            with self._autocast():
                logits, _ = self.model(inputs.to(self.device))
            log_probs = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
            for row, index in enumerate(batch):
                tokens, count = encoded[index]
                end = len(tokens) - 1
                targets = torch.tensor(tokens[-count:], device=self.device)
                scores = log_probs[row, end - count : end]
                results[index] = (float(scores.gather(1, targets[:, None]).sum()),
                                  bool((scores.argmax(-1) == targets).all()))
            progress.update(len(batch))
        progress.close()
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """For each text: the sum of log p over all its tokens, read after eos (perplexity tasks)."""
        from ..train.trainer import _document_nll

        results = []
        for text in texts:
            tokens = torch.tensor([self.tokenizer.eos_id, *self.tokenizer.encode(text)], dtype=torch.long)
            if tokens.numel() < 2:
                results.append(0.0)
                continue
            results.append(-_document_nll(self.model, tokens.to(self.device), self.max_length, self._autocast))
        return results

    # ---------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """For each (context, gen_kwargs): the text generated after eos + context, cut before the first of
        gen_kwargs["until"] (a string or list; default: the end-of-text token). Greedy unless gen_kwargs sets
        do_sample=True or temperature > 0; at most max_gen_toks tokens (default 256)."""
        groups: dict[str, list[int]] = {}
        for index, (_, arguments) in enumerate(requests):
            groups.setdefault(json.dumps(arguments or {}, sort_keys=True, default=str), []).append(index)
        results: list[str | None] = [None] * len(requests)
        progress = self._progress(len(requests), "generate_until")
        for key, indices in groups.items():
            arguments = dict(json.loads(key))
            until = arguments.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_new = int(arguments.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            do_sample = bool(arguments.pop("do_sample", False))
            temperature = float(arguments.pop("temperature", 1.0)) if do_sample else 0.0  # 0: greedy
            keep = max(1, self.max_length - max_new)
            prompts = [[self.tokenizer.eos_id, *self.tokenizer.encode(requests[i][0])][-keep:] for i in indices]
            order = sorted(range(len(indices)), key=lambda j: -len(prompts[j]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                width = len(prompts[batch[0]])
                ids = torch.full((len(batch), width), self.tokenizer.eos_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, j in enumerate(batch):
                    ids[row, width - len(prompts[j]) :] = torch.tensor(prompts[j])
                    mask[row, width - len(prompts[j]) :] = 1
                with self._autocast():
                    out = self.model.generate(ids.to(self.device), max_new, temperature=temperature,
                                              stop_tokens=[self.tokenizer.eos_id], attention_mask=mask.to(self.device))
                for row, j in enumerate(batch):
                    new = out[row, width:].tolist()
                    if self.tokenizer.eos_id in new:
                        new = new[: new.index(self.tokenizer.eos_id)]
                    text = self.tokenizer.decode(new)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    results[indices[j]] = text
                progress.update(len(batch))
        progress.close()
        return results
