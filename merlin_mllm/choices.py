"""The named values of settings that several layers offer or check, each listed once.

The CLI shows them as option values, the configs (``TrainConfig``, ``RankerConfig``) and the
code that acts on a setting check against them. This module imports nothing, so the CLI reads
them without loading torch or pandas. A new value is added here and handled where the setting
is acted on (named beside each list).

Usage::

    from merlin_mllm.choices import LOSSES, PROTOCOLS
    if protocol not in PROTOCOLS: ...
"""
from __future__ import annotations

__all__ = ["PROTOCOLS", "TRAIN_TARGETS", "NEGATIVE_SAMPLING", "USER_CONTEXTS", "CANDIDATE_TEXTS", "LOSSES",
           "PROMPT_VERSIONS", "USER_SUMMARY_SOURCES", "UNKNOWN_USER_POLICIES", "SERVER_PROTOCOLS"]

#: How ``data prepare`` splits a dataset (:mod:`merlin_mllm.data.prepare`).
PROTOCOLS = ("paper", "leave-last-out", "timeline")
#: Which positions of a training user become training targets
#: (:func:`merlin_mllm.data.processing.prefix_targets`): the protocol's own target only; also
#: every summary-block boundary before it; also every position after the first block before it.
TRAIN_TARGETS = ("last", "blocks", "every")
#: How training negatives are drawn: uniformly, or weighted by training-time popularity.
NEGATIVE_SAMPLING = ("uniform", "popularity")
#: What the prompt's user part holds (:func:`merlin_mllm.summaries.rows.user_context_texts`):
#: the user summary (the paper's), the titles of the last N items of the history, or the summary
#: followed by those titles.
USER_CONTEXTS = ("summary", "titles", "both")
#: What the prompt's candidate part holds (:func:`merlin_mllm.summaries.candidates.candidate_texts`):
#: name -> what it is. The parts of a name are joined by ``+``, in that order.
CANDIDATE_TEXTS = {
    "title": "the item's title (the paper's)",
    "title+attributes": "the title, then the catalogue attributes (prepared items' attributes: genres and year, "
                        "category and brand)",
    "summary": "the item summary of the first stage alone",
    "title+summary": "the title, then the item summary",
    "title+attributes+summary": "the title, the catalogue attributes, then the item summary",
}
#: The ranker's training losses (:mod:`merlin_mllm.ranker.losses`): name -> what it is.
LOSSES = {
    "lm": "answer-token cross-entropy over the whole vocabulary",
    "binary": "cross-entropy over [No, Yes]",
    "listwise": "softmax over each group's yes-minus-no logits, the positive as target",
}
#: Every ranker prompt layout this code renders (:mod:`merlin_mllm.ranker.prompt`): version -> layout.
PROMPT_VERSIONS = {"1": "candidate, then question", "2": "question, then candidate"}
#: Where each served user's summary comes from (:func:`merlin_mllm.serving.export.user_summary_table`):
#: the user's last row (what evaluation scored) or the summary store's latest (live).
USER_SUMMARY_SOURCES = ("last_row", "store_latest")
#: What serving does with a user it has no summary for (:class:`merlin_mllm.serving.steps.FeatureStep`):
#: score the empty-history summary, or reject the request naming the id.
UNKNOWN_USER_POLICIES = ("empty_summary", "error")
#: How the client talks to Triton (:class:`merlin_mllm.serving.client.RerankClient`).
SERVER_PROTOCOLS = ("grpc", "http")
