"""Untrusted text (titles, descriptions, reviews) as data, never as prompt syntax.

A title such as ``"Great <|im_start|>system ..."`` must reach the model as plain text. Every
special or added token of the tokenizer, and the usual chat-template markers of other model
families, are broken up by a space after their first character. The text stays readable and no
longer matches the tokenizer's special-token table, so it is tokenized as ordinary text.

Usage::

    from merlin_mllm.text import escape_untrusted
    safe = escape_untrusted("Toy <|im_start|>system", tokenizer)
    # -> "Toy < |im_start|>system"  (a space after the first character)
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Optional

# Chat-template and multimodal markers of the common model families, escaped whatever the
# tokenizer: a prompt may be rendered for one model and later shown to another.
_GENERIC_MARKERS = re.compile(
    r"<\|[^|<>\s]{1,40}\|>"          # <|im_start|>, <|eot_id|>, <|image_pad|>, <|vision_start|>
    r"|</?s>"                        # Llama/Mistral BOS/EOS
    r"|\[/?INST\]|\[/?SYS\]|<<SYS>>|<</SYS>>"
    r"|<image>|<video>|<audio>|<fake_token_around_image>|<global-img>|<row_\d+_col_\d+>"
    r"|<end_of_utterance>|<start_of_turn>|<end_of_turn>|<pad>|<unk>|<bos>|<eos>",
    re.IGNORECASE,
)


def _break(token: str) -> str:
    return token[0] + " " + token[1:] if len(token) > 1 else token


@lru_cache(maxsize=32)
def _tokenizer_pattern(special_tokens: tuple) -> Optional[re.Pattern]:
    tokens = sorted((t for t in special_tokens if len(t) > 1), key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None


def special_tokens_of(tokenizer) -> tuple:
    """Every special or added token string of a tokenizer (or processor's tokenizer)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        tokens.add(str(added))
    return tuple(sorted(tokens))


def escape_untrusted(text, tokenizer=None, extra_tokens: Iterable[str] = ()) -> str:
    """Return ``text`` with every special-token look-alike broken up, so it is plain text.

    Parameters
    ----------
    text : str
        Untrusted text. ``None``/NaN give an empty string.
    tokenizer : optional
        A tokenizer or processor whose special and added tokens are escaped too.
    extra_tokens : iterable of str
        More strings to neutralise.
    """
    if text is None or (isinstance(text, float) and text != text):
        return ""
    text = str(text)
    patterns = [_GENERIC_MARKERS]
    specials = tuple(sorted(set(special_tokens_of(tokenizer) if tokenizer is not None else ()) | set(extra_tokens)))
    tokenizer_pattern = _tokenizer_pattern(specials)
    if tokenizer_pattern is not None:
        patterns.append(tokenizer_pattern)
    # Repeat until stable: escaping one marker must not leave another behind ("<<image>image>").
    for _ in range(10):
        before = text
        for pattern in patterns:
            text = pattern.sub(lambda m: _break(m.group(0)), text)
        if text == before:
            break
    return text
