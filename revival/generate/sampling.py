"""Sampling from a recurrent (or attention) language model: prefill once, then one token per step with carried state.

    stream(model, input_ids, max_new_tokens, ...)   -> iterator over new tokens as they are sampled
    generate(model, input_ids, max_new_tokens, ...) -> prompt + new tokens

`input_ids` is a list of ints or a 1-d tensor (one sequence: tokens are yielded as ints, `generate` returns a 1-d
tensor) or a (B, T) tensor (a batch: tokens are yielded as (B,) tensors, `generate` returns (B, T + new)).
`model(ids (B, T), state) -> (logits (B, T, V), state)` is all that is used.

Logits processing, in order: repetition penalty (HF convention: a seen token's positive logit is divided by the
penalty, a negative one multiplied), then temperature 0 means greedy argmax; otherwise logits / temperature, top-k,
top-p (nucleus: the smallest set of most likely tokens whose probability reaches p), then a multinomial draw.
With `stop_tokens`, a sequence stops after emitting one (the stop token is included); in a batch, finished rows repeat
their stop token until every row has stopped.
Hugging Face-style arguments are accepted as well: do_sample, max_length, eos_token_id, num_return_sequences, a
streamer, attention_mask (see `generate`). Unlike transformers, the default samples (temperature 1.0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from ..errors import UserError


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V), previous_ids (B, L): penalize every token id present in the row's previous ids."""
    if penalty == 1.0 or previous_ids.shape[1] == 0:
        return logits
    seen = logits.gather(1, previous_ids)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, previous_ids, seen)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value kept), set the rest to -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability is >= p (at least one), -inf the rest."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
    remove_sorted = mass_before >= p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, previous_ids: torch.Tensor, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None,
                   repetition_penalty: float = 1.0) -> torch.Tensor:
    """logits (B, V) -> processed float32 logits (B, V) ready for softmax (temperature must be > 0 here)."""
    logits = apply_repetition_penalty(logits.float(), previous_ids, repetition_penalty)
    logits = logits / temperature
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    if top_p is not None:
        logits = apply_top_p(logits, top_p)
    return logits


def sample_next(logits: torch.Tensor, previous_ids: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, repetition_penalty: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row: logits (B, V), previous_ids (B, L) -> (B,) long."""
    if temperature == 0:
        return apply_repetition_penalty(logits.float(), previous_ids, repetition_penalty).argmax(dim=-1)
    processed = process_logits(logits, previous_ids, temperature, top_k, top_p, repetition_penalty)
    probs = torch.softmax(processed, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _as_batch(input_ids, vocab_size: int) -> tuple[torch.Tensor, bool]:
    """-> (ids (B, T) long, was_single_sequence)."""
    if isinstance(input_ids, (list, tuple)):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
            raise UserError("input_ids: expected a list of ints, a 1-d tensor or a (B, T) tensor")
        input_ids = torch.tensor(list(input_ids), dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dim() not in (1, 2):
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise UserError(f"input_ids: expected a list of ints, a 1-d or a (B, T) integer tensor, got {got}")
    single = input_ids.dim() == 1
    ids = input_ids.unsqueeze(0) if single else input_ids
    if ids.shape[1] == 0:
        raise UserError("input_ids: expected at least one prompt token, got an empty prompt")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise UserError(f"input_ids: token ids must lie in [0, {vocab_size}), got min {int(ids.min())}, "
                         f"max {int(ids.max())}")
    return ids.long(), single


def _check_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_tokens, seed,
                vocab_size: int) -> list[int]:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise UserError(f"temperature: expected a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k: expected None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise UserError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
    if (isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float))
            or not repetition_penalty > 0):
        raise UserError(f"repetition_penalty: expected a number > 0 (1.0 = none), got {repetition_penalty!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UserError(f"seed: expected None or an int, got {seed!r}")
    if stop_tokens is None:
        return []
    stops = [stop_tokens] if isinstance(stop_tokens, int) else list(stop_tokens) if isinstance(
        stop_tokens, Iterable) else None
    if stops is None or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                                for t in stops):
        raise UserError(f"stop_tokens: expected None, an int or a list of ints in [0, {vocab_size}), "
                         f"got {stop_tokens!r}")
    return stops


def _step(model, ids: torch.Tensor, state, attention_mask: torch.Tensor | None = None):
    """One no-grad forward in eval mode; returns (last-position logits (B, V), state)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if attention_mask is None:
                logits, state = model(ids, state)
            else:
                logits, state = model(ids, state, attention_mask=attention_mask)
    finally:
        model.train(was_training)
    return logits[:, -1], state


def _resolve_hf_arguments(ids: torch.Tensor, max_new_tokens, temperature, stop_tokens, do_sample, max_length,
                          eos_token_id, num_return_sequences, attention_mask):
    """The Hugging Face-style arguments in revival's terms: -> (ids, max_new_tokens, temperature, stop_tokens)."""
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise UserError(f"attention_mask: expected a tensor shaped like input_ids {tuple(ids.shape)}, got {got}")
        values = attention_mask.to(ids.device)
        if values.is_floating_point() or not bool(((values == 0) | (values == 1)).all()):
            raise UserError("attention_mask: expected 0/1 entries (integer or bool)")
        if not bool((values[:, 1:] >= values[:, :-1]).all()) or not bool(values[:, -1].all()):
            raise UserError("attention_mask: expected left padding (each row zeros, then ones up to the last token)")
    if max_length is not None:
        if max_new_tokens is not None:
            raise UserError(f"max_length and max_new_tokens: expected one of them, got {max_length} and "
                            f"{max_new_tokens}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < ids.shape[1]:
            raise UserError(f"max_length: expected an integer >= the prompt length {ids.shape[1]} (prompt + new "
                            f"tokens), got {max_length!r}")
        max_new_tokens = max_length - ids.shape[1]
    if max_new_tokens is None:
        raise UserError("max_new_tokens: expected the number of tokens to generate (or max_length), got None")
    if do_sample is not None:
        if not isinstance(do_sample, bool):
            raise UserError(f"do_sample: expected True, False or None, got {do_sample!r}")
        if do_sample and temperature == 0:
            raise UserError("do_sample=True with temperature=0: expected a temperature > 0 to sample")
        if not do_sample:
            temperature = 0.0
    if eos_token_id is not None:
        if stop_tokens is not None and stop_tokens != eos_token_id:
            raise UserError(f"eos_token_id and stop_tokens: expected one of them (the same thing), got "
                            f"{eos_token_id!r} and {stop_tokens!r}")
        stop_tokens = eos_token_id
    if (isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int)
            or num_return_sequences < 1):
        raise UserError(f"num_return_sequences: expected an integer >= 1, got {num_return_sequences!r}")
    if num_return_sequences > 1:
        if temperature == 0:
            raise UserError(f"num_return_sequences={num_return_sequences} with greedy decoding: every sequence would "
                            "be the same; sample (temperature > 0 or do_sample=True)")
        ids = ids.repeat_interleave(num_return_sequences, dim=0)
    return ids, max_new_tokens, temperature, stop_tokens


def stream(model, input_ids, max_new_tokens: int | None = None, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, repetition_penalty: float = 1.0, stop_tokens=None,
           seed: int | None = None, *, do_sample: bool | None = None, max_length: int | None = None,
           eos_token_id=None, num_return_sequences: int = 1, attention_mask: torch.Tensor | None = None) -> Iterator:
    """Yield each new token (an int for a single sequence, a (B,) tensor for a batch) as soon as it is sampled.

    The Hugging Face-style arguments are accepted too (see `generate`)."""
    return _checked_stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                           stop_tokens, seed, do_sample, max_length, eos_token_id, num_return_sequences,
                           attention_mask)[2]


def _checked_stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_tokens,
                    seed, do_sample, max_length, eos_token_id, num_return_sequences, attention_mask):
    """`stream`'s and `generate`'s arguments checked: the prompt rows (B, T), whether the input was one sequence,
    and the iterator over the new tokens (nothing runs before its first token is asked for)."""
    vocab_size = model.config.vocab_size
    ids, single = _as_batch(input_ids, vocab_size)
    ids, max_new_tokens, temperature, stop_tokens = _resolve_hf_arguments(
        ids, max_new_tokens, temperature, stop_tokens, do_sample, max_length, eos_token_id, num_return_sequences,
        attention_mask)
    single = single and num_return_sequences == 1
    stops = _check_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_tokens, seed, vocab_size)
    tokens = _stream(model, ids, single, max_new_tokens, float(temperature), top_k, top_p, float(repetition_penalty),
                     stops, seed, _padding(attention_mask, num_return_sequences))
    return ids, single, tokens


def _padding(attention_mask: torch.Tensor | None, num_return_sequences: int) -> torch.Tensor | None:
    """The (validated) left-padding mask, repeated like the prompts; None when nothing is padded."""
    if attention_mask is None or bool((attention_mask != 0).all()):
        return None
    return attention_mask.long().repeat_interleave(num_return_sequences, dim=0)


def _stream(model, ids, single, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stops, seed,
            attention_mask=None):
    if max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    ids = ids.to(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    finished_with = torch.zeros(ids.shape[0], dtype=torch.long, device=device)
    history = ids
    if attention_mask is not None:  # the pad is the rows' first document: the prompt sees none of it
        attention_mask = attention_mask.to(device)
        # the repetition penalty sees each row's own tokens only: pads read as a copy of the row's last token
        history = torch.where(attention_mask.bool(), ids, ids[:, -1:])
    logits, state = _step(model, ids, None, attention_mask)
    for step in range(max_new_tokens):
        token = sample_next(logits, history if repetition_penalty != 1.0 else history[:, :0], temperature, top_k,
                            top_p, repetition_penalty, generator)
        token = torch.where(finished, finished_with, token)
        if stops:
            newly = ~finished & torch.isin(token, stop_tensor)
            finished_with = torch.where(newly, token, finished_with)
            finished = finished | newly
        if repetition_penalty != 1.0:
            history = torch.cat([history, token[:, None]], dim=1)
        yield int(token[0]) if single else token
        if step + 1 == max_new_tokens or bool(finished.all()):
            return
        logits, state = _step(model, token[:, None], state)


def generate(model, input_ids, max_new_tokens: int | None = None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0, stop_tokens=None,
             seed: int | None = None, *, do_sample: bool | None = None, max_length: int | None = None,
             eos_token_id=None, num_return_sequences: int = 1, streamer=None,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt followed by the generated tokens: (T + n,) for a single sequence, (B, T + n) for a batch.

    Hugging Face-style arguments: `do_sample` (False: greedy; True: sample at `temperature`; None: greedy exactly
    when temperature == 0), `max_length` (prompt + new tokens, instead of `max_new_tokens`), `eos_token_id` (the same
    as `stop_tokens`), `num_return_sequences` (each prompt row repeated, sampled independently: (B * n, T + new)),
    `streamer` (an object with `put(ids)` / `end()` as in transformers -- it gets the prompt first, then each new
    token as a (B,) tensor -- or a callable called with each new token as it is sampled), `attention_mask` (B, T) of
    0/1 for left-padded prompts of different lengths: each row generates exactly what its unpadded prompt alone
    would (the pad is a document of its own that the prompt never sees, docs/math.md).
    """
    ids, single, tokens = _checked_stream(model, input_ids, max_new_tokens, temperature, top_k, top_p,
                                          repetition_penalty, stop_tokens, seed, do_sample, max_length, eos_token_id,
                                          num_return_sequences, attention_mask)
    if streamer is not None and not (callable(streamer) or hasattr(streamer, "put")):
        raise UserError(f"streamer: expected a callable or an object with put() and end(), got {type(streamer)}")
    has_put = hasattr(streamer, "put")
    if has_put:
        streamer.put(ids.cpu())
    new = []
    for token in tokens:
        new.append(token)
        if has_put:
            streamer.put(torch.tensor([token]) if single else token.cpu())
        elif streamer is not None:
            streamer(token)
    if has_put and hasattr(streamer, "end"):
        streamer.end()
    device = next(model.parameters()).device
    ids = ids.to(device)
    if new:
        new_ids = torch.tensor(new, dtype=torch.long, device=device)[None] if single else torch.stack(new, dim=1)
        ids = torch.cat([ids, new_ids], dim=1)
    return ids[0] if single else ids
