"""Synthetic tasks: seeded, exact generators of (inputs, targets) for recall, state tracking and copying.

    data = mqar(vocab_size=8192, seq_len=256, num_kv_pairs=16, num_examples=3000, seed=1)
    data.inputs   (N, T) long: the token sequences, right-padded with PAD_ID (0)
    data.targets  (N, T) long: the token the model must output after reading inputs[:, :t + 1]; -100 where nothing
                  is scored (a causal LM's logits[:, t] are compared with targets[:, t] directly, no shift)

Tasks (GENERATORS maps the names to the functions):
    mqar                 Zoology's multi-query associative recall: key-value pairs, then the keys again at
                         power-law distances; each queried key is scored on its value.
    parity               the xLSTM paper's / Deletang et al.'s parity: a bit string, then QUERY; the answer is
                         whether it holds an odd number of ones.
    modular_arithmetic   an expression of digits 0-4 and + - * (no brackets, * binds tighter), then QUERY; the
                         answer is its value mod 5 (Deletang et al.'s regular "modular arithmetic").
    bracket_matching     a string of ( ) [ ], then QUERY; the answer is whether it is balanced (Dyck-2).
    selective_copying    Mamba's selective copying: data tokens scattered among noise tokens, then SEPARATOR;
                         the data tokens are to be output in order (teacher forced).

Every generator takes `seed` and draws from its own `numpy.random.Generator`, so the same arguments give the same
tensors on every machine. Lengths of the formal languages are drawn uniformly in [min_length, max_length] (the
xLSTM paper trains on 3-40 and tests on 40-256).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import reject_unknown

__all__ = ["GENERATORS", "IGNORE", "PAD_ID", "TaskData", "bracket_matching", "generate", "modular_arithmetic",
           "mqar", "parity", "selective_copying"]

PAD_ID = 0
IGNORE = -100  # targets not scored (the cross-entropy's ignore_index)


@dataclass(frozen=True)
class TaskData:
    """One split of a task: `inputs` and `targets` (N, T) long, `lengths` (N,) the unpadded length of each example,
    `vocab_size` (every id < it), `chance` the accuracy of guessing uniformly among the answers."""

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor
    vocab_size: int
    chance: float

    def __len__(self) -> int:
        return self.inputs.shape[0]


def _check(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or \
            (high is not None and value > high):
        expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return int(value)


def _lengths(rng: np.random.Generator, num_examples: int, min_length: int, max_length: int) -> np.ndarray:
    _check("min_length", min_length, 1)
    _check("max_length", max_length, min_length)
    return rng.integers(min_length, max_length + 1, size=num_examples)


def _sample_distinct(rng: np.random.Generator, num_examples: int, low: int, high: int, size: int) -> np.ndarray:
    """(num_examples, size) ids from [low, high), distinct within a row: a uniformly random ordered draw without
    replacement (rows with a repeat are drawn again, which leaves exactly that distribution)."""
    if 4 * size > high - low:  # few rows would come out distinct: order the whole pool by random keys instead
        return np.argsort(rng.random((num_examples, high - low)), axis=1)[:, :size] + low
    out = rng.integers(low, high, size=(num_examples, size))
    redo = np.arange(num_examples)
    while True:
        ordered = np.sort(out[redo], axis=1)
        redo = redo[(ordered[:, 1:] == ordered[:, :-1]).any(axis=1)]
        if not len(redo):
            return out
        out[redo] = rng.integers(low, high, size=(len(redo), size))


def _pack(sequences: list[list[int]], answers: list[list[tuple[int, int]]], vocab_size: int,
          chance: float) -> TaskData:
    """Right-pad `sequences`; `answers[i]` lists (position, token) targets of example i."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    T = int(lengths.max())
    inputs = torch.full((len(sequences), T), PAD_ID, dtype=torch.long)
    targets = torch.full((len(sequences), T), IGNORE, dtype=torch.long)
    for i, (sequence, answer) in enumerate(zip(sequences, answers)):
        inputs[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        for position, token in answer:
            targets[i, position] = token
    return TaskData(inputs, targets, lengths, vocab_size, chance)


# ------------------------------------------------------------------------------------------------------------ MQAR
def mqar(vocab_size: int = 8192, seq_len: int = 64, num_kv_pairs: int = 4, num_examples: int = 1000, seed: int = 0,
         power_a: float = 0.01, random_non_queries: bool = False) -> TaskData:
    """Multi-query associative recall as in Zoology (Arora et al. 2023): keys from [1, vocab_size / 2), values from
    [vocab_size / 2, vocab_size), `num_kv_pairs` distinct pairs first (k1 v1 k2 v2 ...), then every key once more at an
    even offset of the rest of the sequence drawn without replacement with probability ~ gap^(power_a - 1); the token
    at a queried key is scored on the key's value. The other positions hold 0 (random tokens if random_non_queries).
    """
    _check("seq_len", seq_len, 4)
    _check("num_kv_pairs", num_kv_pairs, 1)
    _check("num_examples", num_examples, 1)
    if seq_len % 2 or 4 * num_kv_pairs > seq_len:
        raise ValueError(f"seq_len: expected an even length >= 4 * num_kv_pairs = {4 * num_kv_pairs}, got {seq_len}")
    if vocab_size // 2 - 1 < num_kv_pairs or vocab_size <= seq_len:
        raise ValueError(f"vocab_size: expected more than seq_len={seq_len} and 2 * num_kv_pairs + 2, got "
                         f"{vocab_size}")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a: expected a number in (0, 1], got {power_a!r}")
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    keys = _sample_distinct(rng, num_examples, 1, half, num_kv_pairs)
    values = _sample_distinct(rng, num_examples, half, vocab_size, num_kv_pairs)
    context = 2 * num_kv_pairs
    space = (seq_len - context) // 2  # query slots: the even offsets after the key-value pairs
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    # Gumbel top-k: the k slots with the largest log p + Gumbel noise are a draw without replacement from p
    scores = np.log(p / p.sum()) + rng.gumbel(size=(num_examples, space))
    gaps = np.argsort(-scores, axis=1)[:, :num_kv_pairs]
    inputs = np.zeros((num_examples, seq_len), dtype=np.int64)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    if random_non_queries:
        filler = rng.integers(0, vocab_size, size=(num_examples, seq_len - context))
        inputs[:, context:] = filler
    positions = context + 2 * gaps
    np.put_along_axis(inputs, positions, keys, axis=1)
    targets = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    np.put_along_axis(targets, positions, values, axis=1)
    lengths = torch.full((num_examples,), seq_len, dtype=torch.long)
    return TaskData(torch.from_numpy(inputs), torch.from_numpy(targets), lengths, vocab_size,
                    1.0 / (vocab_size - half))


# ------------------------------------------------------------------------------------------------ formal languages
# One vocabulary for the formal languages: PAD, QUERY, the input symbols, then the answer classes.
QUERY_ID = 1


def parity(num_examples: int = 1000, min_length: int = 3, max_length: int = 40, seed: int = 0) -> TaskData:
    """Bits (ids 2, 3 for 0, 1) of a length in [min_length, max_length], then QUERY; answer 4 (even number of ones)
    or 5 (odd)."""
    _check("num_examples", num_examples, 1)
    rng = np.random.default_rng(seed)
    sequences, answers = [], []
    for length in _lengths(rng, num_examples, min_length, max_length):
        bits = rng.integers(0, 2, size=length)
        sequences.append([*(bits + 2).tolist(), QUERY_ID])
        answers.append([(int(length), 4 + int(bits.sum()) % 2)])
    return _pack(sequences, answers, vocab_size=6, chance=0.5)


MODULUS = 5
OPERATORS = "+-*"


def evaluate_expression(digits: list[int], operators: str, modulus: int = MODULUS) -> int:
    """digits[0] op[0] digits[1] ... with * before + and -, mod `modulus` (the reference of modular_arithmetic)."""
    total, term = 0, digits[0]
    for operator, digit in zip(operators, digits[1:]):
        if operator == "*":
            term = term * digit
        else:
            total, term = total + term, (digit if operator == "+" else -digit)
    return (total + term) % modulus


def modular_arithmetic(num_examples: int = 1000, min_length: int = 3, max_length: int = 40,
                       seed: int = 0) -> TaskData:
    """An expression of `length` tokens (rounded down to odd): digits 0-4 (ids 2-6) and + - * (ids 7-9), then QUERY;
    answer 10 + its value mod 5 (* binds tighter than + and -)."""
    _check("num_examples", num_examples, 1)
    rng = np.random.default_rng(seed)
    sequences, answers = [], []
    for length in _lengths(rng, num_examples, max(min_length, 1), max_length):
        count = (int(length) + 1) // 2  # number of digits: an expression of 2 * count - 1 tokens
        digits = rng.integers(0, MODULUS, size=count).tolist()
        operators = "".join(OPERATORS[i] for i in rng.integers(0, 3, size=count - 1))
        tokens = [digits[0] + 2]
        for operator, digit in zip(operators, digits[1:]):
            tokens += [7 + OPERATORS.index(operator), digit + 2]
        sequences.append([*tokens, QUERY_ID])
        answers.append([(len(tokens), 10 + evaluate_expression(digits, operators))])
    return _pack(sequences, answers, vocab_size=10 + MODULUS, chance=1.0 / MODULUS)


BRACKETS = "()[]"


def is_balanced(text: str) -> bool:
    """Whether a string of ( ) [ ] is balanced (the reference of bracket_matching)."""
    stack = []
    for char in text:
        if char in "([":
            stack.append(char)
        elif not stack or stack.pop() != "([" [")]".index(char)]:
            return False
    return not stack


def _random_balanced(rng: np.random.Generator, length: int) -> str:
    """A balanced string of `length` (even) brackets: open while there is room, close with probability 1/2."""
    out, stack = [], []
    for position in range(length):
        remaining = length - position
        if stack and (remaining == len(stack) or rng.random() < 0.5):
            out.append(")]"["([".index(stack.pop())])
        else:
            stack.append("(["[int(rng.integers(0, 2))])
            out.append(stack[-1])
    return "".join(out)


def bracket_matching(num_examples: int = 1000, min_length: int = 3, max_length: int = 40, seed: int = 0) -> TaskData:
    """Brackets ( ) [ ] (ids 2-5) of an even length in [min_length, max_length], then QUERY; answer 7 (balanced) or
    6 (not). Half the examples are balanced; the others are balanced strings with one bracket replaced by another,
    so both classes have the same lengths and nearly the same statistics."""
    _check("num_examples", num_examples, 1)
    _check("max_length", max_length, max(2, min_length + (min_length % 2)))
    rng = np.random.default_rng(seed)
    sequences, answers = [], []
    for length in _lengths(rng, num_examples, min_length, max_length):
        length = int(length) + int(length) % 2 if int(length) < max_length else int(length) - int(length) % 2
        text = _random_balanced(rng, length)
        if rng.random() < 0.5:
            position = int(rng.integers(0, length))
            others = [b for b in BRACKETS if b != text[position]]
            text = text[:position] + others[int(rng.integers(0, 3))] + text[position + 1 :]
        tokens = [2 + BRACKETS.index(char) for char in text]
        sequences.append([*tokens, QUERY_ID])
        answers.append([(length, 7 if is_balanced(text) else 6)])
    return _pack(sequences, answers, vocab_size=8, chance=0.5)


# ----------------------------------------------------------------------------------------------- selective copying
def selective_copying(num_examples: int = 1000, seq_len: int = 256, num_tokens: int = 16, num_symbols: int = 16,
                      seed: int = 0) -> TaskData:
    """Mamba's selective copying (Gu & Dao 2023): `num_tokens` data tokens (ids 3 .. 3 + num_symbols) at random
    positions of `seq_len` noise tokens (id 2), then SEPARATOR (id 1) and the data tokens again; the model reads
    the separator and each copied token (teacher forcing) and is scored on the next data token each time."""
    _check("num_examples", num_examples, 1)
    _check("num_symbols", num_symbols, 2)
    _check("num_tokens", num_tokens, 1)
    _check("seq_len", seq_len, num_tokens)
    rng = np.random.default_rng(seed)
    positions = np.sort(_sample_distinct(rng, num_examples, 0, seq_len, num_tokens), axis=1)
    data = rng.integers(3, 3 + num_symbols, size=(num_examples, num_tokens))
    inputs = np.full((num_examples, seq_len + num_tokens), 2, dtype=np.int64)
    np.put_along_axis(inputs, positions, data, axis=1)
    inputs[:, seq_len] = QUERY_ID
    inputs[:, seq_len + 1 :] = data[:, :-1]
    targets = np.full_like(inputs, IGNORE)
    targets[:, seq_len:] = data
    lengths = torch.full((num_examples,), seq_len + num_tokens, dtype=torch.long)
    return TaskData(torch.from_numpy(inputs), torch.from_numpy(targets), lengths, 3 + num_symbols, 1.0 / num_symbols)


GENERATORS: dict[str, Callable[..., TaskData]] = {
    "mqar": mqar,
    "parity": parity,
    "modular_arithmetic": modular_arithmetic,
    "bracket_matching": bracket_matching,
    "selective_copying": selective_copying,
}


def generate(task: str, **arguments) -> TaskData:
    """`GENERATORS[task](**arguments)`, naming the valid tasks and arguments on a mistake."""
    if task not in GENERATORS:
        raise ValueError(f"task: expected one of {list(GENERATORS)}, got {task!r}")
    function = GENERATORS[task]
    reject_unknown(arguments, list(function.__code__.co_varnames[: function.__code__.co_argcount]), task,
                   noun="argument")
    return function(**arguments)
