"""Untrusted text (titles, descriptions, reviews) as data, never as prompt syntax, and within a
token budget.

Escaping
--------
A title such as ``"Great <|im_start|>system ..."`` must reach the model as plain text. Every
special or added token of the tokenizer, and the usual chat-template markers of other model
families, are broken up by a space after their first character. The text stays readable and no
longer matches the tokenizer's special-token table, so it is tokenized as ordinary text.

Usage::

    from merlin_mllm.text import escape_untrusted
    safe = escape_untrusted("Toy <|im_start|>system", tokenizer)
    # -> "Toy < |im_start|>system"  (a space after the first character)

Token budgets
-------------
Every text that reaches an LLM is first cut to a budget of tokens by :func:`truncate_tokens`
(item titles and descriptions in the item stage; history lines, the previous summary and the
history block in the user stage; the ranker's user summary and candidate title), then escaped.
So one catalogue row with megabytes of text costs what a row at the budget costs. The summary
stages take their budgets from :class:`TokenBudgets`, which they record in each summary's store
key: a changed budget never reuses a summary made from differently cut text.

Usage::

    from merlin_mllm.text import TokenBudgets, truncate_tokens
    cut = truncate_tokens(description, 256, tokenizer)
    cut.text, cut.truncated, cut.tokens    # the kept start, whether anything was cut, its tokens
    TokenBudgets(description=512)          # per-field budgets of the summary stages
"""
from __future__ import annotations

import numbers
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Iterable, NamedTuple, Optional

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


# ------------------------------------------------------------------------------- token budgets
#: No token of a real tokenizer spans more characters than this (SmolLM2's longest: 81, a run
#: of spaces). Text beyond ``max_tokens * CHARS_PER_TOKEN_BOUND`` characters is dropped before
#: tokenizing, so a megabyte string is never tokenized whole (that takes seconds, and a single
#: megabyte "word" far longer).
CHARS_PER_TOKEN_BOUND = 32
KEEP = ("start", "end")


class Cut(NamedTuple):
    """What :func:`truncate_tokens` returns."""

    text: str
    truncated: bool  # True when text was dropped
    tokens: int  # tokens of ``text`` (counted before any early character cut)


def truncate_tokens(text, max_tokens: int, tokenizer, *, keep: str = "start") -> Cut:
    """``text`` cut to at most ``max_tokens`` tokens of ``tokenizer``, keeping its start (or end).

    The one budget function for every text that reaches an LLM. Text within the budget comes
    back unchanged; longer text is the decoded first (``keep="end"``: last) ``max_tokens``
    tokens, without the replacement character a cut inside a multi-byte character decodes to,
    and cut further while it re-encodes to more than ``max_tokens``. Only the first (last)
    ``max_tokens * CHARS_PER_TOKEN_BOUND`` characters are ever tokenized, so the cost is bounded
    by the budget, not by the text.

    Parameters
    ----------
    text : str
        ``None``/NaN give ``""``. Not stripped or escaped: escape the result.
    max_tokens : int
        At least 1.
    tokenizer : tokenizer or processor
        Counts tokens (``add_special_tokens=False``): the model's own.
    keep : {"start", "end"}
        Which end survives: ``"end"`` keeps the most recent items of a history block.

    Examples
    --------
    >>> truncate_tokens("one two three four", 2, tokenizer)  # doctest: +SKIP
    Cut(text='one two', truncated=True, tokens=2)
    """
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, not {keep!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer of at least 1, not {max_tokens!r}")
    if text is None or (isinstance(text, float) and text != text):
        return Cut("", False, 0)
    text = str(text)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    limit = int(max_tokens) * CHARS_PER_TOKEN_BOUND
    early_cut = len(text) > limit
    if early_cut:
        text = text[:limit] if keep == "start" else text[-limit:]
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens and not early_cut:
        return Cut(text, False, len(ids))
    n = min(int(max_tokens), len(ids))
    while n > 0:
        kept = tokenizer.decode(ids[:n] if keep == "start" else ids[len(ids) - n:])
        # A cut inside a multi-byte character decodes to U+FFFD at the cut: drop it.
        kept = kept.rstrip("\ufffd") if keep == "start" else kept.lstrip("\ufffd")
        count = len(tokenizer.encode(kept, add_special_tokens=False))
        if count <= max_tokens:
            return Cut(kept, True, count)
        n -= count - int(max_tokens)
    return Cut("", True, 0)


def fits_by_bytes(text: str, max_tokens: int) -> bool:
    """True when ``text`` has fewer UTF-8 bytes than ``max_tokens``: then no tokenizer makes more
    than ``max_tokens`` tokens of it (a token covers at least one byte; SentencePiece may add
    one for its leading space), and :func:`truncate_tokens` would return it unchanged. Lets a
    caller skip loading a tokenizer for short text."""
    return len(text) < max_tokens and len(text.encode("utf-8")) < max_tokens


@dataclass(frozen=True)
class TokenBudgets:
    """Token budgets of the texts the summary stages put into prompts, per field.

    The defaults leave MovieLens-100k's texts uncut (titles of at most about 30 tokens,
    descriptions of about 15, item summaries of at most ``max_new_tokens``) and bound everything
    else: an item prompt of the textualizer stays under about 450 tokens whatever the catalogue
    holds, a recurrent user step under about 1,100, a direct one under about 2,400. Both stages
    record their budgets in every summary's store key.

    Parameters
    ----------
    title : int
        An item's title (item stage; the user stage cuts a history item's title to it too).
    description : int
        An item's description (item stage).
    history_item : int
        One line of a user prompt's history: title + item summary, or title + description.
    previous_summary : int
        The summary a recurrent step continues ("what we already know of this user").
    history : int
        The whole numbered block of history lines of one prompt; a longer block keeps its most
        recent lines (matters in ``direct`` mode, which shows the whole history at once).
    """

    title: int = 64
    description: int = 256
    history_item: int = 256
    previous_summary: int = 256
    history: int = 2048

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"TokenBudgets.{name} must be an integer of at least 1, not {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "TokenBudgets":
        """Budgets from :meth:`to_dict` output; ``None`` or missing fields take the defaults."""
        return cls(**(data or {}))


# ------------------------------------------------------------------------------- item slots
# Collaborative tokens (LLaRA-style; ``RankerConfig.collab_tokens``): one soft token after a
# title, whose embedding is the projected item embedding of that title's item. In text the slot
# is ITEM_SLOT_OPEN + the item id's digits + ITEM_SLOT_CLOSE (two private-use characters that no
# catalogue or tokenizer uses); the ranker's prompt turns each slot into one token id,
# ITEM_TOKEN_BASE + 1 + item id (ITEM_TOKEN_BASE itself for an empty slot: no item id), far
# above any vocabulary, whose embedding the ranker replaces (``merlin_mllm.ranker.collab_tokens``).
# So a prompt's token ids say which item each soft token stands for, and everything that
# carries token ids (the NVTabular tokenizer, the dataloader, prefix caches, packed groups,
# serving) carries the collaborative tokens unchanged. Untrusted text never holds a slot:
# :func:`strip_item_slots` removes the two characters from titles and summaries.
ITEM_SLOT_OPEN = "\ue000"
ITEM_SLOT_CLOSE = "\ue001"
#: Token ids at or above this are collaborative tokens (2**30: int64 and int32 safe, no vocabulary near).
ITEM_TOKEN_BASE = 1 << 30
_ITEM_SLOT = re.compile(re.escape(ITEM_SLOT_OPEN) + r"(\d*)" + re.escape(ITEM_SLOT_CLOSE))
_SLOT_CHARS = re.compile("[" + ITEM_SLOT_OPEN + ITEM_SLOT_CLOSE + "]")


def item_slot(item_id: Optional[int]) -> str:
    """The text slot of ``item_id``'s collaborative token (an empty slot for None: a cold token)."""
    if item_id is None:
        return ITEM_SLOT_OPEN + ITEM_SLOT_CLOSE
    return ITEM_SLOT_OPEN + str(_slot_item(item_id)) + ITEM_SLOT_CLOSE


def _slot_item(item_id) -> int:
    if isinstance(item_id, bool) or not isinstance(item_id, numbers.Integral) or not 0 <= int(item_id) < ITEM_TOKEN_BASE - 1:
        raise ValueError(f"item id {item_id!r} cannot have a collaborative token: ids must be integers in "
                         f"[0, {ITEM_TOKEN_BASE - 2}]")
    return int(item_id)


def strip_item_slots(text: str) -> str:
    """``text`` without any slot character: untrusted text cannot place a collaborative token."""
    return _SLOT_CHARS.sub("", text)


def split_item_slots(text: str):
    """``(segments, item_ids)``: the text between slots (one more segment than slots) and each
    slot's item id (None for an empty slot). Stray slot characters (a slot cut in half by a token
    budget) are dropped from the segments."""
    segments, items, start = [], [], 0
    for match in _ITEM_SLOT.finditer(text):
        segments.append(strip_item_slots(text[start:match.start()]))
        items.append(int(match.group(1)) if match.group(1) else None)
        start = match.end()
    segments.append(strip_item_slots(text[start:]))
    return segments, items


def item_token_id(item_id: Optional[int]) -> int:
    """The token id of ``item_id``'s collaborative token (:data:`ITEM_TOKEN_BASE` for None)."""
    return ITEM_TOKEN_BASE if item_id is None else ITEM_TOKEN_BASE + 1 + _slot_item(item_id)
