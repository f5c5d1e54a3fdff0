"""The training loop: AdamW, warmup + cosine, clipping, accumulation, evaluation, atomic checkpoints, exact resume.

`Trainer(run_config).train()` builds the corpus, tokenizer, model and optimizer from a `RunConfig`, trains, evaluates on
whole validation documents with the state carried, logs metrics (CSV, TensorBoard) and writes a loss-curve PNG.
`resume=True` restores the latest complete checkpoint (model, optimizer, scheduler, RNG states, data position, counters)
and continues bit-identically on CPU.
"""

from __future__ import annotations

import contextlib
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import load_corpus
from ..data.packing import PackedDataset, iter_document_tokens
from ..data.tokenizers import count_utf8_bytes, load_tokenizer, make_tokenizer
from ..models import LanguageModel
from . import checkpoint as ckpt
from .config import RunConfig
from .logging import MetricsLogger, plot_loss_curves
from .schedule import warmup_cosine


class TrainingStopped(RuntimeError):
    """Raised when training cannot go on (too many non-finite losses in a row)."""


@dataclass
class EvalResult:
    loss: float  # mean nats per token
    perplexity: float
    bits_per_byte: float
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity, "bpb": self.bits_per_byte, "tokens": self.tokens}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


ATTENTION_LETTERS = frozenset("a")  # pattern letters whose state is a KV cache


def uses_attention(model: LanguageModel) -> bool:
    return any(letter in ATTENTION_LETTERS for letter in model.config.pattern)


def _document_nll(model: LanguageModel, tokens: torch.Tensor, context_length: int, autocast) -> float:
    """Summed next-token NLL of tokens[1:] given tokens[:-1] (tokens: (T,) on the model's device).

    Recurrent models: segments of `context_length` with the state carried, so every token sees its whole prefix.
    Models with attention: sliding windows of `context_length` tokens with stride `context_length // 2`, each read
    from a fresh state, so no query attends further back than the context it was trained on (a KV cache carried over
    a whole document would put keys at distances never seen in training).
    """
    total, n = 0.0, tokens.numel()
    if not uses_attention(model):
        state = None
        for start in range(0, n - 1, context_length):
            segment = tokens[start : start + context_length + 1]
            with autocast():
                logits, state = model(segment[None, :-1], state)
            total += F.cross_entropy(logits[0].float(), segment[1:], reduction="sum").item()
        return total
    stride = max(1, context_length // 2)
    for start in range(0, n - 1, stride):
        end = min(start + stride, n - 1)  # predict tokens[start + 1 : end + 1]
        begin = max(0, end - context_length)
        with autocast():
            logits, _ = model(tokens[None, begin:end])
        scored = end - start
        total += F.cross_entropy(logits[0, -scored:].float(), tokens[start + 1 : end + 1], reduction="sum").item()
    return total


@torch.no_grad()
def evaluate(model: LanguageModel, documents: list[bytes], tokenizer, context_length: int, device: torch.device,
             max_tokens: int = 65536, autocast=contextlib.nullcontext, show_progress: bool = False) -> EvalResult:
    """Loss, perplexity and bits per byte on whole documents: every token of a document is predicted from its
    prefix, the whole prefix for recurrent models (state carried across `context_length` segments), the last
    `context_length // 2` to `context_length - 1` tokens for models with attention (see `_document_nll`).

    Documents are read in order until `max_tokens` targets are reached (the last document is read whole)."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens, used = 0.0, 0, []
    progress = tqdm(total=len(documents), desc="evaluating", unit="doc", disable=not show_progress, leave=False)
    for document in documents:  # one at a time: iter_document_tokens skips empty documents
        if total_tokens >= max_tokens:
            break
        progress.update(1)
        tokens = next(iter_document_tokens([document], tokenizer), None)
        if tokens is None:
            continue
        total_nll += _document_nll(model, tokens.to(device), context_length, autocast)
        total_tokens += tokens.numel() - 1
        used.append(document)
    progress.close()
    if was_training:
        model.train()
    if total_tokens == 0:
        raise ValueError("validation: no non-empty documents to evaluate")
    loss = total_nll / total_tokens
    return EvalResult(loss, math.exp(min(loss, 50.0)), total_nll / math.log(2) / count_utf8_bytes(used), total_tokens)


class Trainer:
    def __init__(self, run: RunConfig, resume: bool = False, corpus=None, print_fn=print):
        self.run = run
        self.cfg = run.train
        self.print = print_fn
        self.out_dir = Path(self.cfg.out_dir)
        self.device = resolve_device(self.cfg.device)
        precision = self.cfg.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        seed_everything(self.cfg.seed)

        self.corpus = corpus if corpus is not None else load_corpus(run.data.corpus, show_progress=self.cfg.progress)
        resume_from = ckpt.resolve_checkpoint(self.out_dir) if resume else None
        if resume_from is not None:
            self.tokenizer = load_tokenizer(resume_from)
        else:
            self.tokenizer = make_tokenizer(run.data.tokenizer, self.corpus.train, vocab_size=run.data.bpe_vocab_size)
        self.model_config = run.model_config(vocab_size=self.tokenizer.vocab_size)
        if self.model_config.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size: {self.model_config.vocab_size} is smaller than the tokenizer's "
                             f"vocabulary ({self.tokenizer.vocab_size}); remove it or make it >= "
                             f"{self.tokenizer.vocab_size}")
        self.model = LanguageModel(self.model_config).to(self.device)
        self.dataset = PackedDataset.from_documents(self.corpus.train, self.tokenizer, run.data.context_length,
                                                    seed=self.cfg.seed, show_progress=self.cfg.progress)
        self.optimizer = self._make_optimizer()
        cfg = self.cfg
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.step = 0
        self.position = 0  # data position (sequences read)
        self.tokens_seen = 0
        self.bad_steps_in_a_row = 0
        self.skipped_steps = 0
        self.last_eval: EvalResult | None = None
        self.train_tokens_per_s = float("nan")
        if resume_from is not None:
            self._restore(resume_from)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            (decay if param.ndim >= 2 and "embedding" not in name else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2))

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step, "position": self.position, "tokens_seen": self.tokens_seen,
            "bad_steps_in_a_row": self.bad_steps_in_a_row, "skipped_steps": self.skipped_steps,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(), "corpus": self.corpus.describe(),
        }

    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(self.out_dir, self.step, self.model, self.tokenizer, self.run.to_dict(),
                                    self._trainer_state(), keep=self.cfg.keep_checkpoints)

    def _restore(self, checkpoint_dir: Path) -> None:
        from ..models.checkpoint import from_pretrained

        loaded = from_pretrained(checkpoint_dir, device=self.device)
        self.model.load_state_dict(loaded.state_dict())
        state = ckpt.load_trainer_state(checkpoint_dir)
        if state["corpus"]["content_hash"] != self.corpus.content_hash:
            raise ValueError(f"resume: the corpus changed since {checkpoint_dir} was written (content hash "
                             f"{state['corpus']['content_hash'][:12]} vs {self.corpus.content_hash[:12]})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        for name in ("step", "position", "tokens_seen", "bad_steps_in_a_row", "skipped_steps"):
            setattr(self, name, state[name])
        self.print(f"resumed from {checkpoint_dir} at step {self.step}")

    # -- training ----------------------------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step (with accumulation). Returns the mean loss; a non-finite loss skips the update."""
        self.model.train()
        total = 0.0
        for _ in range(self.cfg.grad_accum):
            batch = self.dataset.batch(self.position, self.cfg.batch_size)
            self.position += self.cfg.batch_size
            inputs, targets = batch.input_ids.to(self.device), batch.targets.to(self.device)
            with self._autocast():
                logits, _ = self.model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            (loss / self.cfg.grad_accum).backward()
            total += loss.item() / self.cfg.grad_accum
            self.tokens_seen += targets.numel()
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps_in_a_row += 1
            self.skipped_steps += 1
            if self.bad_steps_in_a_row >= self.cfg.max_bad_steps:
                raise TrainingStopped(
                    f"training stopped at step {self.step}: {self.bad_steps_in_a_row} non-finite losses in a row "
                    f"(train.max_bad_steps={self.cfg.max_bad_steps}); lower train.lr or check the data")
            return total
        self.bad_steps_in_a_row = 0
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def evaluate(self) -> EvalResult:
        documents = self.corpus.validation[: self.cfg.eval_docs]
        return evaluate(self.model, documents, self.tokenizer, self.run.data.context_length, self.device,
                        self.cfg.eval_max_tokens, self._autocast)

    def train(self) -> dict[str, Any]:
        """Train to `train.steps`; returns a summary (losses, throughput, memory, paths)."""
        logger = MetricsLogger(self.out_dir, tensorboard=self.cfg.tensorboard)
        losses: list[float] = []
        interval: list[float] = []  # finite losses since the last log row (the row logs their mean)
        train_time, timed_tokens = 0.0, 0
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"train {self.run.model['preset']}",
                   disable=not self.cfg.progress, unit="step", dynamic_ncols=True)
        try:
            while self.step < self.cfg.steps:
                tokens_before, start = self.tokens_seen, time.perf_counter()
                loss = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - start
                train_time += elapsed
                timed_tokens += self.tokens_seen - tokens_before
                self.step += 1
                losses.append(loss)
                if math.isfinite(loss):
                    interval.append(loss)
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    self.train_tokens_per_s = timed_tokens / max(train_time, 1e-9)
                    mean_loss = sum(interval) / len(interval) if interval else float("nan")
                    interval.clear()
                    logger.log(self.step, "train", loss=mean_loss, lr=self.scheduler.get_last_lr()[0],
                               tokens=self.tokens_seen, tokens_per_s=self.train_tokens_per_s,
                               peak_mem_mb=peak_memory_mb(self.device), skipped_steps=self.skipped_steps)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{self.train_tokens_per_s:,.0f}")
                if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                    self.last_eval = self.evaluate()
                    logger.log(self.step, "val", **self.last_eval.as_dict())
                    bar.write(f"step {self.step}: val loss {self.last_eval.loss:.4f}  "
                              f"ppl {self.last_eval.perplexity:.2f}  bpb {self.last_eval.bits_per_byte:.4f}")
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            logger.close()
        plot = plot_loss_curves({self.run.model["preset"]: logger.csv_path}, self.out_dir / "loss.png")
        return {
            "step": self.step, "losses": losses, "tokens_seen": self.tokens_seen,
            "train_tokens_per_s": self.train_tokens_per_s, "skipped_steps": self.skipped_steps,
            "val": None if self.last_eval is None else self.last_eval.as_dict(),
            "peak_mem_mb": peak_memory_mb(self.device), "parameters": self.model.num_parameters(),
            "corpus": self.corpus.describe(), "metrics_csv": str(logger.csv_path), "plot": str(plot),
        }
