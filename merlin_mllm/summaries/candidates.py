"""The candidate text: what the ranker's prompt shows of each candidate item.

The ranker's ``candidate_text`` setting (:data:`merlin_mllm.choices.CANDIDATE_TEXTS`) names the
parts, in order, joined by ``+``:

``title``
    The item's title, exactly as the items table holds it (the paper's prompt; the default).
``attributes``
    The catalogue attributes of the prepared items table (:mod:`merlin_mllm.data.attributes`):
    genres and year for MovieLens, category and brand for Amazon.
``summary``
    The item summary of the first stage (:mod:`merlin_mllm.summaries.item`), found through the
    summary store's item refs, the way the user stage finds them.

Parts are joined one per line; the summary is labelled (``Summary: ...``) when it follows
another part. Each part is cut to its own token budget before joining (the title to 64
tokens, as the title alone is; the attributes to 64; the summary to 128: :data:`PART_TOKENS`),
so the title is never cut to make room for the attributes, and a long summary never pushes the
attributes out. The prompt then escapes the whole text as untrusted data and cuts it, as a last
guard, to the ranker's ``max_title_tokens``, which :func:`candidate_token_budget` sets to the sum
of the parts' budgets (64 for the title alone: today's prompt, unchanged).

Missing values:

* an item whose attributes are empty shows its other parts (its title alone for
  ``title+attributes``); how many items did so is logged;
* an item without a stored summary is an error naming the first items and their count, when a
  ``summary`` part is asked for: run ``merlin-mllm summarize items`` over those items first.

Usage::

    from merlin_mllm.summaries.candidates import CandidateText
    texts = CandidateText("title+attributes").texts(items)          # Series aligned with items
    texts = CandidateText("title+summary", item_summaries="data/summaries").texts(items)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import pandas as pd

from merlin_mllm.choices import CANDIDATE_TEXTS
from merlin_mllm.data.attributes import item_attributes
from merlin_mllm.image_loading import is_missing
from merlin_mllm.summaries.rows import is_store
from merlin_mllm.summaries.store import ITEM_REF_NAMESPACE, SummaryStore, open_store
from merlin_mllm.text import fits_by_bytes, truncate_tokens

__all__ = ["DEFAULT_CANDIDATE_TEXT", "PART_TOKENS", "SUMMARY_LABEL", "ItemSummarySource", "CandidateText",
           "check_candidate_text", "candidate_parts", "candidate_token_budget", "candidate_summaries",
           "item_summary_texts"]

log = logging.getLogger(__name__)

#: The default: the title alone, the prompt every ranker saved before the setting existed saw.
DEFAULT_CANDIDATE_TEXT = "title"
#: Token budget of each part. The title's is the prompt's title budget (``RankerConfig``'s
#: default ``max_title_tokens``); ML-100k's attributes take about 15 tokens, Amazon's category
#: path and brand about 30; the first stage writes summaries of at most
#: ``GenerationSettings.max_new_tokens`` (96) tokens.
PART_TOKENS = {"title": 64, "attributes": 64, "summary": 128}
#: Opens the summary when it follows another part.
SUMMARY_LABEL = "Summary: "
#: Tokens each joined part may add beyond its budget (the line break, the summary's label).
_JOIN_TOKENS = 8
#: Where item summaries come from: a summary store (folder or open store), or item id -> text.
ItemSummarySource = Union[str, os.PathLike, SummaryStore, Mapping[int, str], pd.Series]


def check_candidate_text(name: Any) -> str:
    """``name`` when it is one of :data:`~merlin_mllm.choices.CANDIDATE_TEXTS`, else a ValueError listing them."""
    if name not in CANDIDATE_TEXTS:
        raise ValueError(f"candidate_text must be one of {tuple(CANDIDATE_TEXTS)}, not {name!r}")
    return str(name)


def candidate_parts(name: str) -> List[str]:
    """The parts a candidate text is made of, in order: ``"title+attributes"`` -> ``["title", "attributes"]``."""
    return check_candidate_text(name).split("+")


def candidate_token_budget(name: str) -> int:
    """The token budget of the whole candidate text (the ranker's ``max_title_tokens``): the sum
    of its parts' budgets, plus a few tokens per join; 64 for the title alone."""
    parts = candidate_parts(name)
    return sum(PART_TOKENS[part] for part in parts) + _JOIN_TOKENS * (len(parts) - 1)


def item_summary_texts(source: ItemSummarySource, item_ids: Iterable[int]) -> Dict[int, str]:
    """The item summary of each of ``item_ids`` that ``source`` has (the others are left out).

    Parameters
    ----------
    source : store folder, SummaryStore, mapping or Series
        A summary store (each item's current summary is its ``"item"`` ref, as the user stage
        reads them), or item id -> summary text.
    item_ids : iterable of int
    """
    wanted = [int(i) for i in item_ids]
    if isinstance(source, (pd.Series, Mapping)):
        texts = {int(k): v for k, v in source.items()}
        return {i: str(texts[i]) for i in wanted if i in texts and not is_missing(texts[i])}
    store = open_store(source)
    refs = store.get_refs(ITEM_REF_NAMESPACE, [str(i) for i in wanted])
    stored = store.get_many(refs.values())
    return {i: stored[refs[str(i)]] for i in wanted if refs.get(str(i)) in stored}


def candidate_summaries(summaries: Any, item_summaries: Optional[ItemSummarySource] = None
                        ) -> Optional[ItemSummarySource]:
    """Where the candidate texts' item summaries come from: ``item_summaries`` when given, else
    the user summaries' source when it is a summary store (the item and user stages share one),
    else None."""
    if item_summaries is not None:
        return item_summaries
    if isinstance(summaries, SummaryStore) or (isinstance(summaries, (str, os.PathLike)) and is_store(summaries)):
        return summaries
    return None


def _flat(value: Any) -> str:
    return "" if is_missing(value) else " ".join(str(value).split())


@dataclass(frozen=True)
class CandidateText:
    """How each candidate item's text is made, for one ranker.

    Parameters
    ----------
    name : str
        One of :data:`~merlin_mllm.choices.CANDIDATE_TEXTS`.
    item_summaries : store folder, SummaryStore, mapping or Series, optional
        Where item summaries come from (needed when ``name`` has a ``summary`` part).
    tokenizer : optional
        The ranker's tokenizer: each part is cut to its budget (:data:`PART_TOKENS`) in its
        tokens. Without it the parts are not cut here (the prompt's budget still bounds the whole).
    """

    name: str = DEFAULT_CANDIDATE_TEXT
    item_summaries: Optional[ItemSummarySource] = None
    tokenizer: Any = None

    def __post_init__(self):
        parts = candidate_parts(self.name)
        if "summary" in parts and self.item_summaries is None:
            raise ValueError(f"candidate_text {self.name!r} shows item summaries: pass item_summaries (the summary "
                             "store that `merlin-mllm summarize items` wrote)")

    @classmethod
    def for_ranker(cls, ranker, item_summaries: Optional[ItemSummarySource] = None) -> "CandidateText":
        """The candidate text of ``ranker`` (a ``RankerModel``): its ``config.candidate_text``,
        each part cut in its tokenizer's tokens. Training, evaluation and the export all make
        their candidate texts here, so the three see the same text."""
        return cls(ranker.config.candidate_text, item_summaries, ranker.prompt.tokenizer)

    @property
    def parts(self) -> List[str]:
        return candidate_parts(self.name)

    def _fit(self, text: str, budget: int) -> str:
        if self.tokenizer is None or fits_by_bytes(text, budget):
            return text
        return truncate_tokens(text, budget, self.tokenizer).text.strip()

    def texts(self, items: pd.DataFrame, where: str = "items") -> pd.Series:
        """Each item's candidate text, aligned with ``items`` (``item_id``, ``title``, and the
        columns the parts read).

        With ``name="title"`` this is the ``title`` column itself, unchanged.

        Raises
        ------
        ValueError
            A ``summary`` part and items without a stored summary (naming the first ones and
            the count); an ``attributes`` part and a table without attributes.
        """
        parts = self.parts
        if parts == ["title"]:
            return items["title"].copy()
        columns: Dict[str, List[str]] = {}
        if "title" in parts:
            columns["title"] = [self._fit(_flat(t), PART_TOKENS["title"]) for t in items["title"]]
        if "attributes" in parts:
            attributes = [_flat(a) for a in item_attributes(items, where)]
            empty = sum(not a for a in attributes)
            if empty:
                log.info("%s: %d of %d items have no catalogue attributes; their candidate text goes without",
                         where, empty, len(attributes))
            columns["attributes"] = [self._fit(a, PART_TOKENS["attributes"]) for a in attributes]
        if "summary" in parts:
            ids = [int(i) for i in items["item_id"]]
            found = item_summary_texts(self.item_summaries, ids)
            missing = [i for i in ids if not _flat(found.get(i))]
            if missing:
                raise ValueError(
                    f"{where}: {len(missing)} of {len(ids)} items have no item summary in {self.item_summaries} "
                    f"(e.g. item_id {missing[:5]}); candidate_text {self.name!r} shows one for every candidate: run "
                    "`merlin-mllm summarize items` over them first"
                )
            label = SUMMARY_LABEL if len(parts) > 1 else ""
            columns["summary"] = [label + self._fit(_flat(found[i]), PART_TOKENS["summary"]) for i in ids]
        texts = ["\n".join(p for p in row if p) for row in zip(*(columns[part] for part in parts))]
        return pd.Series(texts, index=items.index, dtype=object, name="candidate_text")
