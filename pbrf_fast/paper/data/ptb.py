"""Penn Treebank (Mikolov's language-modelling split) as fixed-length token sequences.

Reads ``<data_dir>/ptb/ptb.{train,valid,test}.txt`` (one sentence a line,
``<unk>`` already in place), appends ``<eos>`` to every line, builds the
vocabulary from the training split (most frequent first, ties by spelling:
deterministic), and cuts each split's token stream into non-overlapping
windows of ``seq_len + 1`` tokens: inputs are the first ``seq_len``, targets
the last ``seq_len`` (next-token prediction).
"""
from __future__ import annotations

from collections import Counter

import torch

from .uci import resolve_data_dir
from ...errors import DataNotFoundError

__all__ = ["load_ptb", "build_vocabulary"]


def _tokens(path) -> list[str]:
    words = []
    with open(path) as handle:
        for line in handle:
            words += line.split() + ["<eos>"]
    return words


def build_vocabulary(tokens: list[str]) -> dict[str, int]:
    counts = Counter(tokens)
    ordered = sorted(counts, key=lambda w: (-counts[w], w))
    return {w: i for i, w in enumerate(ordered)}


def _windows(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    count = (len(ids) - 1) // seq_len
    x = ids[: count * seq_len].reshape(count, seq_len)
    y = ids[1 : count * seq_len + 1].reshape(count, seq_len)
    return x, y


def load_ptb(data_dir=None, seq_len: int = 35):
    """(x_train, y_train, x_test, y_test, vocabulary); sequences of token ids, shape (n, seq_len)."""
    folder = resolve_data_dir(data_dir) / "ptb"
    splits = {}
    for split in ("train", "test"):
        path = folder / f"ptb.{split}.txt"
        if not path.is_file():
            raise DataNotFoundError(f"ptb: expected {path} (plain text, one sentence a line); it is missing")
        splits[split] = _tokens(path)
    vocabulary = build_vocabulary(splits["train"])
    unknown = vocabulary.get("<unk>", 0)
    out = []
    for split in ("train", "test"):
        ids = torch.tensor([vocabulary.get(w, unknown) for w in splits[split]], dtype=torch.long)
        out += list(_windows(ids, seq_len))
    return (*out, vocabulary)
