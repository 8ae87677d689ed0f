"""Words: BERT's basic split of a text into words, and which words Algorithm 1 may replace."""

from __future__ import annotations

import re
import unicodedata

# Common English function words (articles, pronouns, auxiliaries, prepositions, conjunctions,
# determiners, quantifiers and the pieces that contractions split into).  Written for this module.
STOP_WORDS = frozenset("""
a an the this that these those there here
i me my mine myself we us our ours ourselves you your yours yourself yourselves
he him his himself she her hers herself it its itself they them their theirs themselves
one ones oneself
who whom whose which what whatever whoever whichever when where why how
am is are was were be been being have has had having do does did doing done
will would shall should can could may might must ought
not no nor never none neither either
and or but if then else than so as because since while whereas although though unless until
till whether yet also too very just only even still already again ever
of at by for with without within about against between among through throughout during before
after above below to from up down in into onto on off out over under upon around across along
toward towards near beyond behind beside besides via per
all any both each few more most other others some such same own several many much
again further once
s t d ll m re ve y o n
don doesn didn isn aren wasn weren hasn haven hadn won wouldn shan shouldn can cannot couldn
mustn mightn needn
let lets
ok yes
""".split())

_ASCII_WORDS = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def split_words(text: str) -> list[str]:
    """BERT's basic tokenisation without lower-casing: whitespace, then each punctuation and CJK
    character as a word of its own; control characters are dropped.

    >>> split_words("Don't stop-believing, café!")
    ['Don', "'", 't', 'stop', '-', 'believing', ',', 'café', '!']
    """
    if text.isascii():
        return _ASCII_WORDS.findall(text)
    words: list[str] = []
    for chunk in text.split():
        buf: list[str] = []
        for ch in chunk:
            if _is_punctuation(ch) or _is_cjk(ch):
                if buf:
                    words.append("".join(buf))
                    buf = []
                words.append(ch)
            elif ch == "\ufffd" or unicodedata.category(ch) in ("Cc", "Cf"):
                continue
            else:
                buf.append(ch)
        if buf:
            words.append("".join(buf))
    return words


def is_candidate(word: str) -> bool:
    """A word Algorithm 1 may replace: lower-case alphabetic and not a stop word."""
    return word.isalpha() and word.islower() and word not in STOP_WORDS
