"""Vocabulary and token ids. No TensorFlow here: encoding is plain NumPy.

Ids 0-3 are fixed: <pad>=0 (so zero-padding is padding), <unk>, <start>, <end>. Words are ordered by
frequency, then alphabetically, so the same captions always give the same ids.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from captioning import files
from captioning.text import tokenize

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIALS = (PAD, UNK, START, END)
PAD_ID, UNK_ID, START_ID, END_ID = range(4)


class Vocabulary:
    def __init__(self, words: Iterable[str]):
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {word: i for i, word in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int) -> Vocabulary:
        """Keep words seen at least `min_count` times; rarer ones become <unk>."""
        counts = Counter(word for caption in captions for word in tokenize(caption))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept)

    def encode(self, caption: str, max_length: int) -> tuple[list[int], bool]:
        """<start> words <end>, at most `max_length` words; also says whether it was truncated."""
        words = tokenize(caption)
        ids = [self.stoi.get(w, UNK_ID) for w in words[:max_length]]
        return [START_ID, *ids, END_ID], len(words) > max_length

    def encode_all(self, captions: Iterable[str], max_length: int) -> tuple[np.ndarray, int]:
        """A (n, max_length + 2) int32 matrix, zero-padded, and the number of truncated captions."""
        captions = list(captions)
        out = np.zeros((len(captions), max_length + 2), dtype=np.int32)
        truncated = 0
        for i, caption in enumerate(captions):
            ids, cut = self.encode(caption, max_length)
            out[i, : len(ids)] = ids
            truncated += cut
        return out, truncated

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <end>, skipping other special tokens."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i >= len(SPECIALS):
                words.append(self.itos[i])
        return " ".join(words)

    def save(self, path: str | Path) -> None:
        files.write_json(path, {"words": self.itos})

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls(files.read_json(path)["words"])
