"""The one text cleaning used for training, decoding and scoring.

Rule (documented in the README): Unicode NFKC normalisation (a composed and a decomposed "é", or the
ligature "ﬁ" and "fi", become one spelling); typographic apostrophes become "'"; lower-case; every
character that is not a letter, digit or combining mark (of any script) or an apostrophe becomes a
space; runs of spaces collapse; leading/trailing space is removed. So "A dog's ball, in Washington D.C."
-> "a dog's ball in washington d c", and "Un café près de l’église" -> "un café près de l'église".
Captions are compared as these cleaned, space-separated tokens everywhere, so a metric never sees a
different text than the model was trained on.
"""
from __future__ import annotations

import re
import unicodedata

# What word processors and phone keyboards type for "don't": the same word as with the ASCII apostrophe.
_APOSTROPHES = str.maketrans(dict.fromkeys("\u2018\u2019\u02bc\uff07", "'"))
_NOT_ASCII_WORD = re.compile(r"[^a-z0-9']+")


def _word_or_space(char: str) -> str:
    """Letters, digits and combining marks of any script (a Hindi vowel sign is part of its word)."""
    return char if char == "'" or unicodedata.category(char)[0] in "LMN" else " "


def clean_caption(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
    # The regex is the fast path for the usual English caption; both give the same result on ASCII.
    text = _NOT_ASCII_WORD.sub(" ", text) if text.isascii() else "".join(map(_word_or_space, text))
    return " ".join(text.split())


def tokenize(text: str) -> list[str]:
    return clean_caption(text).split()
