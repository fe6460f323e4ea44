"""The one text cleaning used for training, decoding and scoring.

Rule (documented in the README): lower-case; every character that is not a letter, a digit or an
apostrophe becomes a space; runs of spaces collapse; leading/trailing space is removed. So
"A dog's ball, in Washington D.C." -> "a dog's ball in washington d c". Captions are compared
as these cleaned, space-separated tokens everywhere, so a metric never sees a different text
than the model was trained on.
"""
from __future__ import annotations

import re

_NOT_WORD = re.compile(r"[^a-z0-9']+")


def clean_caption(text: str) -> str:
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def tokenize(text: str) -> list[str]:
    return clean_caption(text).split()
