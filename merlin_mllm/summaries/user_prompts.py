"""The user stage's prompts: the chat messages of one summarisation step, and their fixed texts.

Every user-summary key records :data:`PROMPT_VERSION` (:data:`RATINGS_PROMPT_VERSION` for the
ratings-aware prompt, whose history lines carry each item's rating): bump it whenever a prompt
here changes.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from merlin_mllm.summaries.report import SummaryReport
from merlin_mllm.text import TokenBudgets, escape_untrusted, truncate_tokens

#: Part of every user-summary key: bump it whenever a prompt below changes.
PROMPT_VERSION = "user-v1"
#: The ratings-aware prompt's version (``UserSummaryConfig.ratings``): its own, so a store's
#: summaries written without ratings are never read as ratings-aware ones, nor the reverse.
RATINGS_PROMPT_VERSION = "user-v2-ratings"
#: What the ratings-aware prompt says of the ratings on its history lines.
RATINGS_NOTE = ("Each item shows the user's rating, from 1 (disliked) to 5 (loved). Say what the user disliked "
                "too, from the low ratings.")
#: The answer starts with this (given to the model as the start of its reply).
ANSWER_LEAD_IN = "The user appears to have a preference for"
#: The summary of a row with no history before its target. No LLM call: there is nothing to
#: summarise, and a fixed text keeps such rows identical and free.
EMPTY_HISTORY_SUMMARY = "The user has no earlier interactions, so no preference is known yet."


def _numbered(lines: Sequence[str], tokenizer) -> str:
    return "\n".join(f"{i}. {escape_untrusted(line, tokenizer)}" for i, line in enumerate(lines, 1))


def build_prompt(item_lines: Sequence[str], previous_summary: Optional[str], tokenizer, *, whole_history: bool = False,
                 budgets: Optional[TokenBudgets] = None, report: Optional[SummaryReport] = None,
                 ratings: bool = False) -> List[dict]:
    """The chat messages of one summarisation step (every inserted text cut to its budget, then escaped).

    ``ratings``: the lines carry the user's ratings (:func:`~merlin_mllm.summaries.user_history.rated_line`),
    and the request says what they mean (:data:`RATINGS_NOTE`); the prompt of
    :data:`RATINGS_PROMPT_VERSION`.

    With ``budgets``, the previous summary is cut to ``budgets.previous_summary`` tokens and the
    numbered history block to ``budgets.history`` (keeping its end: the most recent items);
    each cut adds one to ``report.truncated``. Lines are expected cut already (``ItemTexts``).
    """
    items = _numbered(item_lines, tokenizer)
    if budgets is not None:
        block = truncate_tokens("\n".join(f"{i}. {line}" for i, line in enumerate(item_lines, 1)),
                                budgets.history, tokenizer, keep="end")
        if block.truncated:
            items = escape_untrusted(block.text.strip(), tokenizer)
        if previous_summary is not None:
            cut = truncate_tokens(previous_summary, budgets.previous_summary, tokenizer)
            previous_summary = cut.text.strip() if cut.truncated else previous_summary
            block_cuts = int(block.truncated) + int(cut.truncated)
        else:
            block_cuts = int(block.truncated)
        if report is not None:
            report.truncated += block_cuts
    ask = ("Write one short paragraph about the user's tastes: the kinds of items, genres, styles "
           "or qualities they seem to like. Describe preferences only; do not list or retell the items.")
    if ratings:
        ask = f"{RATINGS_NOTE} {ask}"
    if previous_summary is None:
        scope = "all the items" if whole_history else "the items"
        content = (f"Below are {scope} a user interacted with, oldest first.\n\n{items}\n\n{ask}")
    else:
        content = (
            "What we already know of this user:\n"
            f"{escape_untrusted(previous_summary, tokenizer)}\n\n"
            f"Afterwards the user interacted with these items, oldest first:\n\n{items}\n\n"
            "Update what we know: merge the earlier preferences with what these new items show. "
            + ask
        )
    return [{"role": "user", "content": content}]
