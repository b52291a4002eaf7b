"""Word lists shared by the synthetic recall tasks: fixed, readable pseudo-words."""

from __future__ import annotations

from functools import lru_cache
from itertools import product

_CONSONANTS = "bdfglmnprst"
_VOWELS = "aeiou"


@lru_cache(maxsize=None)
def filler_words(count: int = 192) -> list[str]:
    """`count` distinct four-letter pseudo-words (consonant-vowel-consonant-vowel), in a fixed order."""
    words = ["".join(w) for w in product(_CONSONANTS, _VOWELS, _CONSONANTS, _VOWELS)]
    # A fixed stride walks the list so neighbouring words differ in their first letter.
    stride = 7
    picked = [words[(i * stride) % len(words)] for i in range(count)]
    assert len(set(picked)) == count, "stride must be coprime with the word count"
    return picked


@lru_cache(maxsize=None)
def syllable_words(count: int, offset: int = 0) -> list[str]:
    """`count` distinct three-letter consonant-vowel-consonant words, starting `offset` words into a fixed order.

    Letters only: byte-level BPE pre-tokenizers split letters from digits, so "k17" could never be one token.
    """
    words = ["".join(w) for w in product(_CONSONANTS, _VOWELS, _CONSONANTS)]
    stride = 13
    picked = [words[((offset + i) * stride) % len(words)] for i in range(count)]
    assert len(set(picked)) == count, "stride must be coprime with the word count, and count within range"
    return picked
