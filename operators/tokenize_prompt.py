"""``TokenizePrompt``: the ranker's Yes/No prompt as token-id columns a Merlin dataloader can carry.

``merlin.dataloader`` cannot move string columns (DLPack has no strings: ``BufferError``), so the
text of the MLLM-MSR ranker prompt is tokenized inside the NVTabular workflow, and only integers
reach the model. Images do not travel through the loader either: the prompt holds the image
placeholder tokens, and the model looks the candidate's image features up by ``item_id`` in its
item-keyed feature table (:class:`merlin_mllm.ranker.model.ItemImageFeatures`).

Data contract
-------------
Input columns (names configurable):

=================  ===========  =====================================================
column             dtype        meaning
=================  ===========  =====================================================
``user_summary``   string       the user's preference summary (untrusted; escaped)
``title``          string       the candidate item's title (untrusted; escaped)
``has_image``      bool         whether the candidate's image is shown (optional)
=================  ===========  =====================================================

Output columns:

=========================  ======================  =====================  ========================================
column                     dtype                   tags                   meaning
=========================  ======================  =====================  ========================================
``prompt_ids``             int64 list, ragged      TEXT_TOKENIZED, LIST   the chat-templated prompt, up to (not
                                                                          including) the answer token
``prompt_prefix_length``   int64                   CONTINUOUS             tokens of the user part shared by every
                                                                          candidate of the user (the KV-cache split)
=========================  ======================  =====================  ========================================

The answer (``Yes``/``No``) is predicted at the last token of ``prompt_ids``; in a Merlin batch
that is ``prompt_ids__offsets[1:] - 1`` into ``prompt_ids__values``. The rows also keep (passed
through by the workflow, not by this operator) ``item_id`` (int64, ITEM_ID: key of the image
features) and ``label`` (int64 0/1, TARGET + BINARY_CLASSIFICATION).

Prompts longer than ``max_length`` tokens are fitted by cutting the user summary (never the
candidate, the question or the answer position); a prompt that does not fit even with an
empty summary raises a ``ValueError`` naming the row.

Usage::

    import nvtabular as nvt
    from merlin_mllm.operators.tokenize_prompt import TokenizePrompt

    prompt = ["user_summary", "title", "has_image"] >> TokenizePrompt(max_length=512)
    workflow = nvt.Workflow(prompt + ["item_id", "label"])
    tokenized = workflow.fit_transform(nvt.Dataset(frame))   # strings in, int lists out
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pandas as pd

import merlin.dtypes as md
from merlin.core.dispatch import DataFrameType, annotate, is_cpu_object
from merlin.schema import ColumnSchema, Schema, Tags
from nvtabular.ops.operator import ColumnSelector, Operator
from transformers import AutoTokenizer

from merlin_mllm.ranker.prompt import (
    DEFAULT_MAX_PROMPT_TOKENS,
    PROMPT_VERSION,
    RankerPrompt,
    add_image_token,
    check_prompt_version,
    embedded_tokenizer,
)

from merlin_mllm.text import ITEM_TOKEN_BASE

__all__ = ["TokenizePrompt"]


class TokenizePrompt(Operator):
    """Tokenize the MLLM-MSR ranker prompt (user summary, candidate title, image slot) into ids.

    Each row becomes the chat-templated Yes/No question of
    :class:`merlin_mllm.ranker.prompt.RankerPrompt`: the user part first (shared by every
    candidate of that user), then the candidate's title and, when ``has_image`` is true, the
    image placeholder tokens whose embeddings the model replaces by the item's image features.
    The output is a ragged ``int64`` list column of token ids plus the length of the shared user
    prefix, which is all a Merlin dataloader needs to carry text to the model.

    The tokenizer is built lazily in each process (so the operator pickles small and works on
    Dask workers) from ``tokenizer``: ``"embedded"`` (SmolLM2 with the ``<image>`` token), a
    Hugging Face folder, or a tokenizer object.

    Example usage::

        # frame columns: user_summary (str), title (str), has_image (bool), item_id, label
        prompt = ["user_summary", "title", "has_image"] >> TokenizePrompt(max_length=512)
        workflow = nvt.Workflow(prompt + ["item_id", "label"])
        dataset = workflow.fit_transform(nvt.Dataset(frame))
        loader = merlin.dataloader.torch.Loader(dataset, batch_size=8)
        # batch: prompt_ids__values, prompt_ids__offsets, prompt_prefix_length, item_id; label

    Parameters
    ----------
    tokenizer : str or tokenizer, default "embedded"
        ``"embedded"``, a path to a Hugging Face model/tokenizer folder, or a tokenizer object.
        In ``"placeholder"`` mode the ``<image>`` token is added when missing.
    image_mode : {"placeholder", "none"}, default "placeholder"
        ``"placeholder"`` inserts ``num_image_tokens`` image tokens for rows with an image;
        ``"none"`` builds text-only prompts (the MLLM-MSR_I ablation). (Processor-expanded image
        tokens of HF MLLMs depend on the pixels, so they are not made here.)
    num_image_tokens : int, default 49
        Placeholder tokens per image (EfficientNet-Lite0's 7x7 grid).
    max_length : int, default DEFAULT_MAX_PROMPT_TOKENS (512)
        The longest prompt, in tokens; longer ones get a shorter summary.
    max_summary_tokens, max_title_tokens : int
        Budgets of :class:`~merlin_mllm.ranker.prompt.RankerPrompt` (384 and 64).
    summary_column, title_column, image_column : str
        Input column names; ``image_column`` may be absent from the selection (no images).
    output_column : str, default "prompt_ids"
        Name of the token-id column; the prefix length is ``"<output_column minus _ids>_prefix_length"``.
    image_token : str, default "<image>"
        The placeholder token (``"placeholder"`` mode).
    system : str or None
        The system message; ``"default"`` keeps RankerPrompt's, ``None`` leaves it out.
    prompt_version : str, default "1"
        The ranker prompt's layout (``merlin_mllm.choices.PROMPT_VERSIONS``).
    collab_tokens : bool, default False
        Collaborative tokens (:mod:`merlin_mllm.ranker.collab_tokens`): the summary's item slots
        and one after the candidate's title become collaborative token ids; the candidate's item
        id is read from ``item_column``, which must then be in the selection.
    item_column : str, default "item_id"
        The candidate's item id (read with ``collab_tokens`` only).
    """

    def __init__(
        self,
        tokenizer: Any = "embedded",
        *,
        image_mode: str = "placeholder",
        num_image_tokens: int = 49,
        max_length: int = DEFAULT_MAX_PROMPT_TOKENS,
        max_summary_tokens: int = 384,
        max_title_tokens: int = 64,
        summary_column: str = "user_summary",
        title_column: str = "title",
        image_column: str = "has_image",
        output_column: str = "prompt_ids",
        image_token: str = "<image>",
        system: Any = "default",
        prompt_version: str = PROMPT_VERSION,
        collab_tokens: bool = False,
        item_column: str = "item_id",
    ):
        super().__init__()
        if image_mode not in ("placeholder", "none"):
            raise ValueError(
                f"image_mode must be 'placeholder' or 'none', not {image_mode!r} (processor-expanded "
                "image tokens depend on the pixels and cannot be made in a text workflow)"
            )
        if int(max_length) < 16:
            raise ValueError(f"max_length must be at least 16 tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.image_mode = image_mode
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = int(max_length)
        self.max_summary_tokens = int(max_summary_tokens)
        self.max_title_tokens = int(max_title_tokens)
        self.summary_column = summary_column
        self.title_column = title_column
        self.image_column = image_column
        self.output_column = output_column
        self.image_token = image_token
        self.system = system
        self.prompt_version = check_prompt_version(prompt_version)
        self.collab_tokens = bool(collab_tokens)
        self.item_column = item_column
        base = output_column[: -len("_ids")] if output_column.endswith("_ids") else output_column
        self.prefix_column = f"{base}_prefix_length"
        self._prompts: Dict[int, Any] = {}
        self._loaded_tokenizer = None

    @classmethod
    def for_ranker(cls, ranker, *, max_length: int = DEFAULT_MAX_PROMPT_TOKENS, **columns) -> "TokenizePrompt":
        """The operator that makes exactly the prompts ``ranker`` (a RankerModel) scores.

        Copies the ranker's tokenizer, image mode, image tokens, system message and token
        budgets. ``columns`` may rename the input/output columns.
        """
        prompt = ranker.prompt
        if prompt.image_mode == "processor":
            raise ValueError(
                "this ranker expands image tokens with its processor (from the pixels); build it with "
                "use_images=False to train it on token ids"
            )
        embedded = getattr(ranker.config, "backend", None) == "embedded"
        op = cls(
            "embedded" if embedded else ranker.tokenizer,
            image_mode=prompt.image_mode,
            num_image_tokens=prompt.num_image_tokens,
            image_token=prompt.image_token,
            system=prompt.system,
            max_length=max_length,
            max_summary_tokens=prompt.max_summary_tokens,
            max_title_tokens=prompt.max_title_tokens,
            prompt_version=prompt.version,
            collab_tokens=prompt.collab_tokens,
            **columns,
        )
        probe = ("A user who likes films.", "A film", prompt.image_mode == "placeholder")
        if op.encode_row(*probe).input_ids != prompt.encode(*probe).input_ids:
            raise RuntimeError("TokenizePrompt does not reproduce the ranker's prompt tokens")
        return op

    # -- pickling: the tokenizer is rebuilt in each process, unless it was given as an object
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_prompts"] = {}
        state["_loaded_tokenizer"] = None
        return state

    def __setstate__(self, state):
        # Workflows saved before output_name/prefix_name were renamed load too.
        renamed = {"output_name": "output_column", "prefix_name": "prefix_column"}
        self.__dict__.update({renamed.get(key, key): value for key, value in state.items()})
        self.__dict__.setdefault("prompt_version", PROMPT_VERSION)  # pickled before prompt versions
        self.__dict__.setdefault("collab_tokens", False)  # pickled before collaborative tokens
        self.__dict__.setdefault("item_column", "item_id")

    def _prompt(self, summary_budget: int):
        prompt = self._prompts.get(summary_budget)
        if prompt is None:
            extra = {} if isinstance(self.system, str) and self.system == "default" else {"system": self.system}
            prompt = RankerPrompt(
                self._tokenizer(),
                image_mode=self.image_mode,
                num_image_tokens=self.num_image_tokens,
                image_token=self.image_token,
                max_summary_tokens=summary_budget,
                max_title_tokens=self.max_title_tokens,
                version=self.prompt_version,
                **({"collab_tokens": True} if self.collab_tokens else {}),
                **extra,
            )
            self._prompts[summary_budget] = prompt
        return prompt

    def _tokenizer(self):
        if isinstance(self.tokenizer, str) and self.tokenizer == "embedded":
            return embedded_tokenizer()
        if not isinstance(self.tokenizer, str):
            return self.tokenizer
        if self._loaded_tokenizer is None:  # once per process
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer)
            if self.image_mode == "placeholder":
                add_image_token(tokenizer)
            self._loaded_tokenizer = tokenizer
        return self._loaded_tokenizer

    # -- encoding
    def encode_row(self, summary, title, has_image: bool, row: Any = None, item_id: Any = None):
        """The :class:`~merlin_mllm.ranker.prompt.EncodedPrompt` of one row, within ``max_length``
        (``item_id``: the candidate's, for its collaborative token)."""
        prompt = self._prompt(self.max_summary_tokens)
        item_id = None if item_id is None or not self.collab_tokens else int(item_id)
        encoded = prompt.encode(summary, title, has_image=has_image, item_id=item_id)
        excess = len(encoded.input_ids) - self.max_length
        if excess > 0:
            summary_tokens = len(prompt.tokenizer.encode(prompt.clean_summary(summary), add_special_tokens=False))
            budget = summary_tokens - excess - 2  # re-tokenizing the cut text may merge a token or two
            if budget >= 0:
                encoded = self._prompt(budget).encode(summary, title, has_image=has_image, item_id=item_id)
            if budget < 0 or len(encoded.input_ids) > self.max_length:
                raise ValueError(
                    f"row {row}: the prompt needs {len(encoded.input_ids)} tokens even with the summary cut "
                    f"to {max(budget, 0)} tokens, more than max_length={self.max_length}; raise max_length "
                    f"or lower max_title_tokens ({self.max_title_tokens})"
                )
        return encoded

    @annotate("TokenizePrompt_op", color="darkgreen", domain="nvt_python")
    def transform(self, col_selector: ColumnSelector, df: DataFrameType) -> DataFrameType:
        on_cpu = is_cpu_object(df)
        frame = df if on_cpu else df.to_pandas()
        self._check_columns(col_selector.names)
        summaries = frame[self.summary_column].tolist()
        titles = frame[self.title_column].tolist()
        if self.image_column in col_selector.names:
            images = frame[self.image_column].fillna(False).astype(bool).tolist()
        else:
            images = [False] * len(frame)
        items = frame[self.item_column].tolist() if self.collab_tokens else [None] * len(frame)
        ids: List[np.ndarray] = []
        prefix = np.empty(len(frame), dtype=np.int64)
        # Rows of one user repeat its summary; several rows share a candidate: cache per triple.
        cache: Dict[tuple, Any] = {}
        for position, (summary, title, shown, item) in enumerate(zip(summaries, titles, images, items)):
            key = (summary, title, shown, item)
            encoded = cache.get(key)
            if encoded is None:
                encoded = self.encode_row(summary, title, shown, row=frame.index[position], item_id=item)
                cache[key] = encoded
            ids.append(np.asarray(encoded.input_ids, dtype=np.int64))
            prefix[position] = encoded.prefix_len
        out = pd.DataFrame({self.output_column: ids, self.prefix_column: prefix}, index=frame.index)
        if on_cpu:
            return out
        out[self.output_column] = [ids_row.tolist() for ids_row in ids]  # cudf builds list columns from lists
        return type(df).from_pandas(out)  # cudf, on GPU workers

    transform.__doc__ = Operator.transform.__doc__

    def _check_columns(self, names):
        needed = (self.summary_column, self.title_column) + ((self.item_column,) if self.collab_tokens else ())
        missing = [name for name in needed if name not in names]
        if missing:
            raise ValueError(
                f"TokenizePrompt needs the columns {missing} in its selection (got {list(names)}); "
                "set summary_column/title_column to your column names"
            )

    # -- output schema: NVTabular's column_mapping + output_dtype / output_tags / output_properties,
    # which describe the token-id column; the prefix length is a plain CONTINUOUS int64.
    def column_mapping(self, col_selector):
        self._check_columns(col_selector.names)
        inputs = list(col_selector.names)
        return {self.output_column: inputs, self.prefix_column: inputs}

    output_dtype = md.int64
    output_tags = [Tags.TEXT_TOKENIZED, Tags.LIST]

    @property
    def output_properties(self):
        vocab_max = len(self._tokenizer()) - 1
        if self.collab_tokens:  # collaborative token ids lie above ITEM_TOKEN_BASE (merlin_mllm.text)
            vocab_max = 2 * ITEM_TOKEN_BASE - 1
        return {
            "domain": {"min": 0, "max": vocab_max, "name": "tokens"},
            "value_count": {"min": 1, "max": self.max_length},  # ragged, at most max_length tokens
        }

    def compute_column_schema(self, col_name, input_schema):
        # From the declarations above only (an empty input schema): no tags, domains or shapes
        # of the text columns.
        if col_name == self.prefix_column:
            return ColumnSchema(col_name, dtype=md.int64, tags=[Tags.CONTINUOUS])
        return super().compute_column_schema(col_name, Schema())
