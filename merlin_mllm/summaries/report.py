"""What a summary run did: generated, reused, failed, skipped, LLM calls, tokens and truncations.

Both stages return a :class:`SummaryReport`; the CLI prints it at the end of a run.

Usage::

    report = SummaryReport()
    report.generated += 3
    report.add_generation(stats)          # a GenerationStats from generate_chat
    total = SummaryReport().merge(report).merge(other)
    print(total)   # generated 3, reused 0, failed 0, skipped 0, LLM calls 3, tokens 72
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import List

#: Error messages kept in a report (the counts stay exact beyond it).
MAX_ERRORS = 20


@dataclass
class SummaryReport:
    """Counts of one summary run (or of several, merged).

    Parameters
    ----------
    generated : int
        Summaries the model wrote in this run (and stored).
    reused_from_store : int
        Summaries that were already in the store (nothing generated).
    failed : int
        Rows or items that got no summary because of an error (see ``errors``).
    skipped : int
        Rows or items left out on purpose (e.g. nothing to summarise), by setting.
    llm_calls : int
        Prompts sent to the model (one generation step each).
    new_tokens : int
        Tokens generated over all calls.
    items_without_summary : int
        History items shown to the user stage by title + description because the store held no
        item summary for them.
    missing_images, bad_images : int
        Items summarised from text alone because their image was absent or unreadable.
    rows : int
        Rows (or items, or users for an update) that received an output.
    empty_histories : int
        Rows with no history before their target: given the fixed generic user summary, no LLM call.
    truncated : int
        Texts cut to their token budget (:class:`merlin_mllm.text.TokenBudgets`). Item stage:
        titles and descriptions of the run's rows, generated or reused. User stage: history
        lines (once per item), and the previous summaries and history blocks of generated steps.
    errors : list of str
        The first ``MAX_ERRORS`` error messages.
    """

    generated: int = 0
    reused_from_store: int = 0
    failed: int = 0
    skipped: int = 0
    llm_calls: int = 0
    new_tokens: int = 0
    items_without_summary: int = 0
    missing_images: int = 0
    bad_images: int = 0
    rows: int = 0
    empty_histories: int = 0
    truncated: int = 0
    errors: List[str] = field(default_factory=list)

    def add_generation(self, stats) -> "SummaryReport":
        """Add a :class:`merlin_mllm.generation.GenerationStats` (calls and tokens)."""
        self.llm_calls += int(stats.calls)
        self.new_tokens += int(stats.new_tokens)
        return self

    def add_error(self, message: str) -> None:
        """Count one failure and keep its message (the first ``MAX_ERRORS`` only)."""
        self.failed += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(str(message))

    def merge(self, other: "SummaryReport") -> "SummaryReport":
        """Add ``other``'s counts into this report (in place) and return it."""
        for f in fields(self):
            if f.name == "errors":
                room = MAX_ERRORS - len(self.errors)
                self.errors.extend(other.errors[: max(room, 0)])
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SummaryReport":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def __str__(self) -> str:
        parts = [
            f"generated {self.generated}",
            f"reused {self.reused_from_store}",
            f"failed {self.failed}",
            f"skipped {self.skipped}",
            f"LLM calls {self.llm_calls}",
            f"tokens {self.new_tokens}",
        ]
        if self.items_without_summary:
            parts.append(f"items without summary {self.items_without_summary}")
        if self.truncated:
            parts.append(f"truncated {self.truncated}")
        if self.missing_images or self.bad_images:
            parts.append(f"missing images {self.missing_images}, bad images {self.bad_images}")
        return ", ".join(parts)
