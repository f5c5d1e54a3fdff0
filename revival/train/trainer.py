"""The training loop: AdamW, warmup + cosine, clipping, accumulation, evaluation, atomic checkpoints, exact resume.

`Trainer(run_config).train()` builds the corpus, tokenizer, model and optimizer from a `RunConfig`, trains, evaluates on
whole validation documents with the state carried, logs metrics (CSV, TensorBoard) and writes a loss-curve PNG.
`resume=True` restores the latest complete checkpoint (model, optimizer, scheduler, RNG states, data position, counters)
and continues bit-identically on CPU. An `out_dir` that holds an earlier run needs `resume=True` or `overwrite=True`.
`model.init_from: DIR` starts from a saved model (its config, weights and tokenizer): fine-tuning.
On CPU, a run whose estimated memory or time does not fit the machine stops before loading any data unless
`force=True` (`estimate_cost`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import resource
import shutil
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
from ..devices import resolve_device as _resolve_device
from ..errors import UserError
from ..layers.moe import moe_aux_loss
from ..models import LanguageModel, ModelConfig
from ..models.checkpoint import check_state_dict
from . import checkpoint as ckpt
from . import distributed
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
    documents: int = 0  # documents read

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity, "bpb": self.bits_per_byte, "tokens": self.tokens}


def resolve_device(name: str, argument: str = "train.device") -> torch.device:
    """`revival.devices.resolve_device`, naming the option train.device in errors."""
    return _resolve_device(name, argument)


# -- what a run costs on CPU -----------------------------------------------------------------------------------------
CPU_FLOPS_PER_THREAD = 50e9  # optimistic fp32 training rate per CPU thread: the estimate errs towards "it fits"
ACTIVATION_FLOATS = 32  # float32 values kept for backward per token, channel and block (tiny presets: 35-100)
MAX_CPU_HOURS = 24.0


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def estimate_cost(config: ModelConfig, batch_size: int, context_length: int, steps: int,
                  grad_accum: int = 1) -> dict[str, float]:
    """Rough training cost on CPU: {"parameters", "memory_bytes", "seconds"}.

    memory: weights + gradients + AdamW moments (16 bytes a parameter) + activations kept for backward
    (`ACTIVATION_FLOATS` per token, channel and block) + logits and their gradient; time: 6 FLOPs per parameter and
    token at `CPU_FLOPS_PER_THREAD` per torch thread. Both are estimates from parameters x tokens, meant to tell a
    CPU-sized run from a GPU-sized one, not to predict either closely."""
    with torch.device("meta"):
        parameters = LanguageModel(config).num_parameters()
    tokens = batch_size * context_length
    activations = tokens * (config.d_model * config.num_blocks * ACTIVATION_FLOATS + 3 * config.vocab_size) * 4
    seconds = 6 * parameters * tokens * grad_accum * steps / (CPU_FLOPS_PER_THREAD * torch.get_num_threads())
    return {"parameters": parameters, "memory_bytes": 16 * parameters + activations, "seconds": seconds}


def _format_duration(seconds: float) -> str:
    for unit, scale in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * scale:
            return f"{seconds / scale:,.0f} {unit}"
    return f"{seconds:.0f} s"


def check_fits_on_cpu(config: ModelConfig, run: RunConfig) -> None:
    """Raise UserError when a CPU run would not fit in memory or would take more than `MAX_CPU_HOURS`."""
    d, t = run.data, run.train
    cost = estimate_cost(config, t.batch_size, d.context_length, t.steps, t.grad_accum)
    memory = machine_memory_bytes()
    too_big = cost["memory_bytes"] > 0.8 * memory
    too_long = cost["seconds"] > MAX_CPU_HOURS * 3600
    if not (too_big or too_long):
        return
    raise UserError(
        f"train.device: {t.device!r} means the CPU here, and this run is GPU-sized: {cost['parameters'] / 1e6:.1f}M "
        f"parameters x {t.batch_size} x {d.context_length} tokens a step need about "
        f"{cost['memory_bytes'] / 2**30:.0f} GiB (this machine: {memory / 2**30:.0f} GiB) and about "
        f"{_format_duration(cost['seconds'])} for {t.steps} steps at an optimistic "
        f"{CPU_FLOPS_PER_THREAD * torch.get_num_threads() / 1e9:.0f} GFLOP/s; train on a GPU (train.device=cuda), "
        "try a tiny config (configs/*-tiny.yaml), or pass --force (Python: force=True) to start anyway")


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
    return EvalResult(loss, math.exp(min(loss, 50.0)), total_nll / math.log(2) / count_utf8_bytes(used), total_tokens,
                      len(used))


@torch.no_grad()
def packed_losses(model: LanguageModel, rows: PackedDataset, device: torch.device, max_tokens: int,
                  autocast=contextlib.nullcontext, batch_size: int = 8) -> dict[str, float]:
    """Mean next-token loss over the first packed rows (up to `max_tokens` targets, at least one row), with every
    layer reset at each document start and with the state carried across documents."""
    was_training = model.training
    model.eval()
    count = min(len(rows), max(1, max_tokens // rows.context_length))
    totals = {"packed_loss_reset": 0.0, "packed_loss_carried": 0.0}
    tokens = 0
    for start in range(0, count, batch_size):
        batch = rows.batch(start, min(batch_size, count - start))
        inputs, targets = batch.input_ids.to(device), batch.targets.to(device)
        for key, starts in (("packed_loss_reset", batch.doc_start.to(device)), ("packed_loss_carried", None)):
            with autocast():
                logits, _ = model(inputs, document_starts=starts)
            totals[key] += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        tokens += targets.numel()
    if was_training:
        model.train()
    return {key: total / tokens for key, total in totals.items()}


RUN_OUTPUTS = ("metrics.csv", "loss.png", "tensorboard", "checkpoints")  # what a run writes into train.out_dir
OPTIMIZER_KEYS = ("lr", "weight_decay", "beta1", "beta2")  # train keys a resumed run applies to the optimizer


class Trainer:
    """Train a model described by a `RunConfig` (see the module docstring and docs/cli.md).

        trainer = Trainer(load_run_config("configs/xlstm-tiny.yaml", ["train.steps=100"]))
        summary = trainer.train()          # losses, throughput, validation, paths
        trainer.model, trainer.tokenizer   # the trained model and its tokenizer
        trainer.model.save_pretrained("my-model", tokenizer=trainer.tokenizer)

    resume: continue the latest checkpoint in `train.out_dir`; overwrite: replace an earlier run's outputs there (one
    of the two is needed when `train.out_dir` holds an earlier run); force: train on CPU even where `estimate_cost`
    says it does not fit; corpus: a `Corpus` to use instead of loading `data.corpus`; print_fn: where messages go.
    """

    def __init__(self, run: RunConfig, resume: bool = False, corpus=None, print_fn=print, overwrite: bool = False,
                 force: bool = False):
        if resume and overwrite:
            raise UserError("resume and overwrite: expected at most one of them")
        self.run = run
        self.cfg = run.train
        self.world = distributed.init_world(self.cfg.parallel, self.cfg.device)  # rank, world size, device
        self.print = print_fn if self.world.is_main else distributed.silent
        self.show_progress = self.cfg.progress and self.world.is_main
        self.out_dir = Path(self.cfg.out_dir)
        self.device = self.world.device
        if self.cfg.device == "auto" and self.device.type == "cpu":
            self.print("train.device: auto -> cpu (no CUDA device found)")
        precision = self.cfg.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        seed_everything(self.cfg.seed)

        resume_from = self._resume_checkpoint() if resume else None
        if resume_from is None:
            self._prepare_out_dir(overwrite)
        else:  # before any data is loaded: say at once when the checkpoint cannot take this config
            resume_state = ckpt.load_trainer_state(resume_from)
            changed_train = self._check_resumable(resume_from, ckpt.load_run_config_dict(resume_from),
                                                  resume_state["step"])
        pretrained = None
        self.tokenizer = None
        if resume_from is not None:
            self.tokenizer = load_tokenizer(resume_from)
            pretrained = _load_model(resume_from, self.device)
            self.model_config = pretrained.config
        elif run.model.get("init_from") is not None:
            pretrained, self.tokenizer = self._init_from(run.model["init_from"])
            self.model_config = pretrained.config
        else:
            vocab_size = run.data.bpe_vocab_size if run.data.tokenizer == "bpe" else 257  # checked once trained
            self.model_config = run.model_config(vocab_size=vocab_size)
        if self.device.type == "cpu" and not force:
            check_fits_on_cpu(self.model_config, run)
        if self.cfg.warmup_steps > self.cfg.steps:
            self.print(f"warning: train.warmup_steps ({self.cfg.warmup_steps}) > train.steps ({self.cfg.steps}): the "
                       "learning rate never reaches train.lr")

        self.corpus = corpus if corpus is not None else load_corpus(
            run.data.corpus, show_progress=self.show_progress, **run.data.corpus_options())
        if self.tokenizer is None:
            self.tokenizer = make_tokenizer(run.data.tokenizer, self.corpus.train, vocab_size=run.data.bpe_vocab_size)
            self.model_config = run.model_config(vocab_size=self.tokenizer.vocab_size)
        if self.model_config.vocab_size < self.tokenizer.vocab_size:
            raise UserError(f"model.vocab_size: {self.model_config.vocab_size} is smaller than the tokenizer's "
                            f"vocabulary ({self.tokenizer.vocab_size}); remove it or make it >= "
                            f"{self.tokenizer.vocab_size}")
        if pretrained is not None:
            self.model = pretrained.to(device=self.device, dtype=torch.float32)
        else:
            self.model = LanguageModel(self.model_config).to(self.device)
        if self.cfg.activation_checkpointing:
            self.model.set_activation_checkpointing(True)
        self.train_module = distributed.wrap_model(self.model, self.world, self.autocast_dtype)  # runs the steps
        self.dataset = PackedDataset.from_documents(self.corpus.train, self.tokenizer, run.data.context_length,
                                                    seed=self.cfg.seed, show_progress=self.show_progress)
        self._validation_rows: PackedDataset | bool | None = None  # built at the first evaluation
        self.optimizer = self._make_optimizer()
        cfg = self.cfg
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.step = 0
        self.position = 0  # data position (sequences read)
        self.tokens_seen = 0
        self.bad_steps_in_a_row = 0
        self.skipped_steps = 0
        self.resumed_from: Path | None = None
        self.last_eval: EvalResult | None = None
        self.train_tokens_per_s = float("nan")
        if resume_from is not None:
            self._restore(resume_from, resume_state, changed_train)

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the gradients' global norm to train.grad_clip (FSDP: on the local shards); returns the norm."""
        return distributed.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)

    def _gradient_sync(self, enabled: bool):
        """The context of a micro-batch's forward and backward: gradients reduced across ranks only when `enabled`."""
        return distributed.gradient_sync(self.train_module, self.world, enabled)

    def _make_optimizer(self, fused: bool | None = None, local_shards: bool | None = None) -> torch.optim.Optimizer:
        """AdamW, weight decay on matrices only. `fused`: torch's fused AdamW, a few multi-tensor kernels for the whole
        update (plain tensors and FSDP's DTensors alike; foreach's are several times more, and slower on DTensors);
        None: fused on CUDA only, so the CPU keeps foreach (the reference of the bit-exact distributed tests).
        `local_shards`: step FSDP's DTensor parameters through their local shards (`distributed.LocalShardAdamW`, the
        same update and state without DTensor dispatch); None: under FSDP only."""
        if fused is None:
            fused = self.device.type == "cuda"
        if local_shards is None:
            local_shards = self.world.parallel == "fsdp"
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            (decay if param.ndim >= 2 and "embedding" not in name else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        adamw = distributed.LocalShardAdamW if local_shards else torch.optim.AdamW
        return adamw(groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2),
                     fused=True if fused else None)  # False would turn off foreach too; None keeps it

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # -- the run folder, init_from -----------------------------------------------------------------------------------
    def _prepare_out_dir(self, overwrite: bool) -> None:
        """Refuse to mix a new run into an earlier one's outputs; with `overwrite`, remove those outputs first."""
        earlier = [name for name in RUN_OUTPUTS if (self.out_dir / name).exists()]
        if not earlier:
            return
        if not overwrite:
            raise UserError(
                f"train.out_dir: {str(self.out_dir)!r} holds an earlier run ({', '.join(earlier)}); pass --resume to "
                "continue it, --overwrite to replace it (Python: resume=True / overwrite=True), or choose another "
                "train.out_dir")
        for name in earlier if self.world.is_main else ():
            path = self.out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.print(f"overwrite: removed the earlier run's {', '.join(earlier)} from {self.out_dir}")

    def _resume_checkpoint(self) -> Path:
        try:
            return ckpt.resolve_checkpoint(self.out_dir)
        except FileNotFoundError:
            raise UserError(f"--resume: no checkpoint in train.out_dir {str(self.out_dir)!r} (expected "
                            f"{self.out_dir / 'checkpoints' / 'latest'}); start without --resume") from None

    def _init_from(self, source: str) -> tuple[LanguageModel, Any]:
        """The model (config + weights) and tokenizer of `model.init_from`, with the section's other keys applied."""
        directory = ckpt.resolve_checkpoint(source, argument="model.init_from")
        tokenizer = load_tokenizer(directory)
        pretrained = _load_model(directory, torch.device("cpu"))
        overrides = {key: value for key, value in self.run.model.items() if key != "init_from"}
        if overrides:
            try:
                config = pretrained.config.replace(**overrides)
                model = LanguageModel(config)
                check_state_dict(model, pretrained.state_dict(), source=f"model.init_from {source!r}")
            except ValueError as error:
                raise UserError(f"model: {error} (the other model keys must keep every weight's shape)") from None
            model.load_state_dict(pretrained.state_dict())
            pretrained = model
        self.print(f"init_from: {directory} ({pretrained.num_parameters():,} parameters, its {tokenizer.kind} "
                   f"tokenizer of {tokenizer.vocab_size} tokens; data.tokenizer is not used)")
        return pretrained, tokenizer

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        state = {
            "step": self.step, "position": self.position, "tokens_seen": self.tokens_seen,
            "bad_steps_in_a_row": self.bad_steps_in_a_row, "skipped_steps": self.skipped_steps,
            "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state(), "corpus": self.corpus.describe(),
        }
        if not self.world.distributed:  # distributed runs write it sharded, into the checkpoint's dcp/
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def save_checkpoint(self) -> Path:
        if self.world.distributed:
            return distributed.save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, self.tokenizer,
                                               self.run.to_dict(), self._trainer_state(), self.world,
                                               keep=self.cfg.keep_checkpoints)
        return ckpt.save_checkpoint(self.out_dir, self.step, self.model, self.tokenizer, self.run.to_dict(),
                                    self._trainer_state(), keep=self.cfg.keep_checkpoints)

    def _restore(self, checkpoint_dir: Path, state: dict[str, Any], changed_train: list[str]) -> None:
        if state["corpus"]["content_hash"] != self.corpus.content_hash:
            raise UserError(f"resume: the corpus changed since {checkpoint_dir} was written (content hash "
                            f"{state['corpus']['content_hash'][:12]} vs {self.corpus.content_hash[:12]})")
        distributed.load_optimizer_state(checkpoint_dir, self.model, self.optimizer, state)  # any world size
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        for name in ("step", "position", "tokens_seen", "bad_steps_in_a_row", "skipped_steps"):
            setattr(self, name, state[name])
        if changed_train:
            self._apply_train_changes()
        self.resumed_from = checkpoint_dir
        self.print(f"resumed from {checkpoint_dir} at step {self.step}")

    def _check_resumable(self, checkpoint_dir: Path, saved_run: dict[str, Any], step: int) -> list[str]:
        """Errors for changes a checkpoint cannot take (model, data, steps already done); notices for train changes.
        Returns the changed train keys."""
        current = self.run.to_dict()
        for section in ("model", "data"):
            saved = saved_run.get(section) or {}
            if section == "data":
                saved = {**dataclasses.asdict(type(self.run.data)()), **saved}
            differences = _differences(saved, current[section])
            if differences:
                raise UserError(
                    f"resume: the {section} section differs from the checkpoint's ({'; '.join(differences)}); "
                    f"{checkpoint_dir} cannot continue with it: drop those overrides, or start a new run "
                    "(--overwrite or another train.out_dir)")
        if self.cfg.steps <= step:
            raise UserError(f"train.steps: {self.cfg.steps}, but {checkpoint_dir} is at step {step} already; "
                            f"resume with train.steps > {step} to train further")
        saved_train = {**dataclasses.asdict(type(self.cfg)()), **(saved_run.get("train") or {})}
        changed = []
        for key, value in current["train"].items():
            if key in ("progress", "out_dir") or saved_train.get(key) == value:
                continue
            changed.append(key)
            effect = " (the RNG state is restored from the checkpoint)" if key == "seed" else ""
            self.print(f"resume: train.{key} changed from {saved_train.get(key)!r} to {value!r}{effect}")
        return changed

    def _apply_train_changes(self) -> None:
        """Put the current optimizer settings into the restored optimizer and recompute the learning rate."""
        cfg = self.cfg
        decay_group, no_decay_group = self.optimizer.param_groups
        decay_group["weight_decay"] = cfg.weight_decay
        for group in self.optimizer.param_groups:
            group["initial_lr"] = cfg.lr
            group["betas"] = (cfg.beta1, cfg.beta2)
        self.scheduler.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        factor = warmup_cosine(self.scheduler.last_epoch, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # -- training ----------------------------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step (with accumulation). Returns the mean loss; a non-finite loss skips the update."""
        self.model.train()
        total = 0.0
        for micro_batch in range(self.cfg.grad_accum):
            start = distributed.rank_position(self.position, self.cfg.batch_size, self.world)
            batch = self.dataset.batch(start, self.cfg.batch_size)
            self.position += self.cfg.batch_size * self.world.world_size
            inputs, targets = batch.input_ids.to(self.device), batch.targets.to(self.device)
            starts = batch.doc_start.to(self.device) if self.run.data.reset_at_documents else None
            last = micro_batch == self.cfg.grad_accum - 1
            with self._gradient_sync(enabled=last):
                with self._autocast():
                    logits, _ = self.train_module(inputs, document_starts=starts)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
                aux_loss = moe_aux_loss(self.model)  # MoE load balancing: trained on, not reported in `loss`
                ((loss if aux_loss is None else loss + aux_loss) / self.cfg.grad_accum).backward()
            total += loss.item() / self.cfg.grad_accum
            self.tokens_seen += targets.numel() * self.world.world_size
        total = distributed.mean_over_ranks(total, self.world)
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
        self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def evaluate(self) -> EvalResult:
        documents = self.corpus.validation[: self.cfg.eval_docs]
        return evaluate(self.model, documents, self.tokenizer, self.run.data.context_length, self.device,
                        self.cfg.eval_max_tokens, self._autocast)

    def evaluate_packed(self) -> dict[str, float]:
        """Validation loss on packed rows like the training ones, both modes: every layer reset at each document
        start ("reset") and the state run on across documents ("carried")."""
        if self._validation_rows is None:
            documents = self.corpus.validation[: self.cfg.eval_docs]
            try:
                self._validation_rows = PackedDataset.from_documents(documents, self.tokenizer,
                                                                     self.run.data.context_length, shuffle=False)
            except UserError:  # fewer validation tokens than one row: whole documents only
                self._validation_rows = False
        if self._validation_rows is False:
            return {}
        return packed_losses(self.model, self._validation_rows, self.device, self.cfg.eval_max_tokens // 4,
                             self._autocast)

    def eval_scope(self, result: EvalResult) -> str:
        """What the training-time validation read (fewer documents than `revival eval`, which reads the split)."""
        return (f"{result.tokens:,} tokens: {result.documents} of {len(self.corpus.validation)} validation documents, "
                "whole, until train.eval_max_tokens; `revival eval` reads them all")

    def train(self) -> dict[str, Any]:
        """Train to `train.steps`; returns a summary (losses, throughput, memory, paths)."""
        logger = (MetricsLogger(self.out_dir, tensorboard=self.cfg.tensorboard, resume_step=self.step,
                                print_fn=self.print) if self.world.is_main else distributed.NullLogger(self.out_dir))
        losses: list[float] = []
        interval: list[float] = []  # finite losses since the last log row (the row logs their mean)
        train_time, timed_tokens = 0.0, 0
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"train {self.run.model.get('preset', 'model')}",
                   disable=not self.show_progress, unit="step", dynamic_ncols=True)
        evaluated = False
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
                    lr = self.scheduler.get_last_lr()[0]
                    logger.log(self.step, "train", loss=mean_loss, lr=lr, tokens=self.tokens_seen,
                               tokens_per_s=self.train_tokens_per_s, peak_mem_mb=peak_memory_mb(self.device),
                               skipped_steps=self.skipped_steps)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{self.train_tokens_per_s:,.0f}")
                    if not self.cfg.progress:  # no bar: a log line instead
                        self.print(f"step {self.step}/{self.cfg.steps}: loss {mean_loss:.4f}  lr {lr:.3g}  "
                                   f"{self.train_tokens_per_s:,.0f} tokens/s")
                if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                    self.last_eval = self.evaluate()
                    packed = self.evaluate_packed()
                    logger.log(self.step, "val", **self.last_eval.as_dict(), **packed)
                    scope = "" if evaluated else f" ({self.eval_scope(self.last_eval)})"
                    evaluated = True
                    if self.world.is_main:
                        bar.write(f"step {self.step}: val loss {self.last_eval.loss:.4f}  ppl "
                                  f"{self.last_eval.perplexity:.2f}  bpb {self.last_eval.bits_per_byte:.4f}{scope}"
                                  + (f"; packed rows: loss {packed['packed_loss_reset']:.4f} with document resets, "
                                     f"{packed['packed_loss_carried']:.4f} carried across" if packed else ""),
                                  file=sys.stdout)
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            logger.close()
        plot = self.out_dir / "loss.png"
        if self.world.is_main:
            plot_loss_curves({self.run.model.get("preset", "model"): logger.csv_path}, plot)
        return {
            "step": self.step, "losses": losses, "tokens_seen": self.tokens_seen,
            "train_tokens_per_s": self.train_tokens_per_s, "skipped_steps": self.skipped_steps,
            "val": None if self.last_eval is None else self.last_eval.as_dict(),
            "peak_mem_mb": peak_memory_mb(self.device), "parameters": self.model.num_parameters(),
            "corpus": self.corpus.describe(), "metrics_csv": str(logger.csv_path), "plot": str(plot),
        }


def _load_model(directory: Path, device: torch.device) -> LanguageModel:
    from ..models import from_pretrained

    try:
        return from_pretrained(directory, device=device)
    except UserError:
        raise
    except ValueError as error:  # a config.json or weights file that does not describe a loadable model
        raise UserError(f"checkpoint {str(directory)!r}: {error}") from None


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
            for key in sorted(set(saved) | set(current), key=str) if saved.get(key) != current.get(key)]
