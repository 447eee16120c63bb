"""Item summaries: stage 1 of MLLM-MSR, one paragraph per catalogue item from its image and text.

Two backends write the summaries:

``"mllm"``
    Any Hugging Face image-text-to-text model (LLaVA-NeXT, Qwen2-VL, Idefics3/SmolVLM, ...),
    as in the paper. In the default ``mode="image_and_text"`` an item costs up to three prompts:
    the model describes the image (content, colours, objects, visible text, notable details),
    then summarises the title and description, then combines the two into one paragraph. Before
    combining, the longer part is cut to at most ``BALANCE_RATIO`` times the length of the shorter
    one, so neither the picture nor the text dominates the result. ``mode="image_only"`` keeps
    the image description alone (what the authors' code does).
``"textualizer"`` (the offline default, and a cheap mode for large catalogues)
    The embedded EfficientNet-Lite0 turns the image into words (its top ImageNet labels and the
    dominant colour names); a text LLM (the embedded SmolLM2 by default) then writes one
    paragraph from those words and the title/description. One prompt per item.

Inputs per item: a title, a description, and an image given as a file path, the encoded bytes,
or nothing. Titles and descriptions are untrusted: they are cut to their token budgets
(:class:`merlin_mllm.text.TokenBudgets`: ``title``, ``description``; the cuts are counted in
``SummaryReport.truncated``), then escaped (:func:`merlin_mllm.text.escape_untrusted`) so
chat-template tokens in them stay plain text. Items are batched by prompt length (shortest
first; ``GenerationSettings.sort_by_length``), so a short item is never padded to a long one,
and outputs come back in the input order.

What happens to awkward rows (the job never fails over one bad image):

- no image, or an image that cannot be read or decoded: the item is summarised from its text
  alone and counted in ``SummaryReport.missing_images`` / ``bad_images``;
- an image path that leaves the image root (``image_root``: a ``..`` escape, or an absolute
  path outside it): not read at all, counted in ``bad_images`` like an unreadable image, and
  logged with the count and the first item it concerns;
- an image file over the size limit (:func:`merlin_mllm.image_loading.image_limits`): refused from its
  size, before a byte of it is read or hashed, and counted in ``bad_images``;
- neither a usable image nor any text: ``on_empty="skip"`` counts it in ``skipped`` and
  outputs ``""``; ``on_empty="error"`` raises ``ValueError`` naming the item;
- the model returns an empty answer: counted in ``failed`` (with a message), output ``""``,
  nothing stored (a later run tries again).

Every summary is stored in a :class:`~merlin_mllm.summaries.store.SummaryStore` under a key made
of ``kind="item"``, the model id, :data:`PROMPT_VERSION`, the output-relevant generation
settings and the inputs (cut and escaped title and description, the budgets they were cut to,
sha256 of the image bytes, backend and mode). A summary in the store is never generated again; new ones are written as soon as their
batch finishes, so a crash loses at most the batch in flight. Each item's current summary is
also published as a ref (namespace ``"item"``, name ``str(item_id)``), which is how the user
stage finds the summaries of history items.

Image counts (``missing_images`` / ``bad_images``) cover every item of the run, generated or
reused (a reused summary remembers, in the store, whether its image was usable).

Usage::

    from merlin_mllm.summaries.item import summarize_items
    report = summarize_items("data/ml-100k", "data/summaries")        # textualizer + SmolLM2
    print(report)   # generated 1682, reused 0, failed 0, skipped 0, LLM calls 1682, ...

    # or on a DataFrame, with an MLLM:
    from merlin_mllm.summaries.item import ItemSummarizer
    summarizer = ItemSummarizer("mllm", model="llava-hf/llava-v1.6-mistral-7b-hf",
                                store="data/summaries")
    texts, report = summarizer.summarize(items_df)  # columns item_id, title, description, image_path
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import pandas as pd
from tqdm.auto import tqdm

from merlin_mllm.generation import GenerationSettings, GenerationStats, generate_chat, generate_multimodal
from merlin_mllm.data.image_files import ImageRoot, dataset_image_root
from merlin_mllm.image_loading import ImageLoadError, image_sha256, is_missing, load_image
from merlin_mllm.models.loading import LoadedModel, shared_model
from merlin_mllm.models.vision import MODEL_NAME, VisionEncoder, dominant_colours
from merlin_mllm.summaries.report import SummaryReport
from merlin_mllm.summaries.store import ITEM_REF_NAMESPACE, SummaryStore, open_store
from merlin_mllm.text import TokenBudgets, escape_untrusted, truncate_tokens

__all__ = [
    "PROMPT_VERSION",
    "BACKENDS",
    "MODES",
    "ItemSummarizer",
    "summarize_items",
    "get_backend",
]

logger = logging.getLogger(__name__)

#: Bump whenever a prompt below changes wording: it is part of every summary's store key.
PROMPT_VERSION = "item-v1"
BACKENDS = ("textualizer", "mllm")
MODES = ("image_and_text", "image_only")
#: The name a mode has in the summary store's keys, where it differs from the mode's own: stores
#: written before ``image_and_text`` had its name keyed it "fusion", and their summaries stay found.
STORE_KEY_MODES = {"image_and_text": "fusion"}
ON_EMPTY = ("skip", "error")
#: Before combining, the longer of (image description, text summary) is cut to at most this many
#: times the word count of the shorter one (never below ``MIN_BALANCED_WORDS``).
BALANCE_RATIO = 1.5
MIN_BALANCED_WORDS = 25
#: Textualizer: ImageNet labels per image, and the probability a label after the first needs.
TEXTUALIZER_LABELS = 3
TEXTUALIZER_MIN_PROB = 0.05
TEXTUALIZER_COLOURS = 3

# ---------------------------------------------------------------------------------- prompts
# The wording is this project's own; the steps follow the paper's stage 1.

_IMAGE_DESCRIPTION = (
    "Describe this product image in one continuous paragraph of about {words} words. Cover what "
    "it shows, its colours, the objects in it, any text that is visible, and anything else that "
    "stands out. Do not use lists or headings."
)
_TEXT_SUMMARY = (
    "Here is the text of a catalogue item.\n\n{text}\n\n"
    "Summarise what this item is in one paragraph of about {words} words. Do not use lists."
)
_IMAGE_AND_TEXT = (
    "Two descriptions of the same catalogue item follow: one of its picture and one of its "
    "text.\n\nPicture: {image}\n\nText: {text}\n\n"
    "Combine them into one paragraph of about {words} words that gives the picture and the text "
    "equal weight and does not repeat itself."
)
_TEXTUALIZED_IMAGE_AND_TEXT = (
    "Write one paragraph of about {words} words that describes this product for a shop "
    "catalogue, using both what its photo shows and its text.\n\n"
    "Photo (as seen by an image classifier): {labels}; main colours: {colours}.\n{text}"
)
_TEXTUALIZED_IMAGE_ONLY = (
    "Write one paragraph of about {words} words that describes the photo of a product.\n\n"
    "An image classifier saw: {labels}; main colours: {colours}."
)
_TEXTUALIZED_TEXT_ONLY = (
    "Write one paragraph of about {words} words that describes this product for a shop "
    "catalogue.\n\n{text}"
)


def _target_words(settings: GenerationSettings) -> int:
    # About 0.6 English words per token leaves room to finish the paragraph within the budget.
    return max(15, int(settings.max_new_tokens * 0.6))


def _item_text(title: str, description: str) -> str:
    lines = []
    if title:
        lines.append(f"Title: {title}")
    if description:
        lines.append(f"Description: {description}")
    return "\n".join(lines)


def _words(text: str) -> List[str]:
    return text.split()


def balance_lengths(image_part: str, text_part: str, ratio: float = BALANCE_RATIO) -> Tuple[str, str]:
    """Cut the longer of two texts to at most ``ratio`` times the shorter one's word count.

    The paper balances the image description and the text summary before fusing them, so the
    fused summary is not dominated by whichever the model happened to write at length.

    Examples
    --------
    >>> balance_lengths("a b c d e f g h i j " * 10, "short text")[0].count(" ") < 100
    True
    """
    a, b = _words(image_part), _words(text_part)
    limit = max(MIN_BALANCED_WORDS, int(ratio * min(len(a), len(b))))
    if len(a) > limit:
        image_part = " ".join(a[:limit])
    if len(b) > limit:
        text_part = " ".join(b[:limit])
    return image_part, text_part


# ---------------------------------------------------------------------------------- rows
@dataclass
class _Row:
    """One item as the summarizer sees it (texts already escaped)."""

    position: int
    item_id: Any
    title: str
    description: str
    image_source: Any = None  # path or bytes as given; None when missing
    image_token: Optional[str] = None  # "sha256:<hex>", "unreadable" or None (missing)
    image_problem: Optional[str] = None  # why the image could not be used
    key: Optional[str] = None
    image: Any = None  # the decoded PIL image, only while the row's batch runs
    text_tokens: int = 0  # tokens of the (cut) title + description: the batching order
    truncated: int = 0  # how many of title and description were cut to their budget

    @property
    def has_text(self) -> bool:
        return bool(self.title or self.description)

    @property
    def label(self) -> str:
        return f"item {self.item_id}" if self.item_id is not None else f"row {self.position}"


def _sha256_of_image(source: Any) -> str:
    """sha256 of an image's encoded bytes, as ``"sha256:<hex>"``.

    The size is checked against the loader's byte limit (:func:`merlin_mllm.image_loading.image_limits`)
    before anything is read; a file is then hashed in blocks, never held whole.

    Raises
    ------
    merlin_mllm.image_loading.ImageLoadError
        The file is missing, unreadable, not a regular file or over the byte limit.
    TypeError
        ``source`` is neither a path nor bytes.
    """
    return image_sha256(source)


# ---------------------------------------------------------------------------------- backends
class _Backend:
    name: str
    model_id: str
    tokenizer: Any  # the one whose special tokens are escaped in item text
    lm: Any

    def key_extras(self) -> dict:
        return {}

    def summarize(self, rows: List[_Row], mode: str, settings: GenerationSettings) -> Tuple[List[str], GenerationStats]:
        raise NotImplementedError


class TextualizerBackend(_Backend):
    """Image -> words with the vision encoder, then words + text -> paragraph with a text LLM.

    Parameters
    ----------
    lm : merlin_mllm.models.LoadedModel
        A text LLM (``kind="llm"``).
    vision : merlin_mllm.models.vision.VisionEncoder
    """

    name = "textualizer"

    def __init__(self, lm, vision):
        if lm.kind != "llm":
            raise ValueError(f"the textualizer backend needs a text LLM; {lm.model_id} is an {lm.kind}")
        self.lm, self.vision, self.tokenizer = lm, vision, lm.tokenizer
        self.model_id = f"{lm.model_id}+vision:{MODEL_NAME}"

    def key_extras(self) -> dict:
        return {"labels": TEXTUALIZER_LABELS, "min_prob": TEXTUALIZER_MIN_PROB, "colours": TEXTUALIZER_COLOURS}

    def image_words(self, images: Sequence[Any]) -> List[Tuple[str, str]]:
        """(labels, colours) phrases per image, e.g. ("Egyptian cat, tabby", "brown, grey")."""
        if not images:
            return []
        top = self.vision.top_labels(list(images), k=TEXTUALIZER_LABELS)
        words = []
        for image, labels in zip(images, top):
            names = [name for rank, (name, p) in enumerate(labels) if rank == 0 or p >= TEXTUALIZER_MIN_PROB]
            colours = dominant_colours(image, k=TEXTUALIZER_COLOURS) or ["mixed"]
            words.append((", ".join(names), ", ".join(colours)))
        return words

    def conversations(self, rows: List[_Row], mode: str, settings: GenerationSettings) -> List[List[dict]]:
        words = iter(self.image_words([row.image for row in rows if row.image is not None]))
        n_words = _target_words(settings)
        conversations = []
        for row in rows:
            text = _item_text(row.title, row.description)
            if row.image is None:
                prompt = _TEXTUALIZED_TEXT_ONLY.format(words=n_words, text=text)
            else:
                labels, colours = next(words)
                if mode == "image_only" or not text:
                    prompt = _TEXTUALIZED_IMAGE_ONLY.format(words=n_words, labels=labels, colours=colours)
                else:
                    prompt = _TEXTUALIZED_IMAGE_AND_TEXT.format(words=n_words, labels=labels, colours=colours, text=text)
            conversations.append([{"role": "user", "content": prompt}])
        return conversations

    def summarize(self, rows, mode, settings):
        conversations = self.conversations(rows, mode, settings)
        return generate_chat(self.lm, conversations, settings)


class MLLMBackend(_Backend):
    """The paper's stage 1 with an image-text-to-text model: describe, summarise, fuse.

    Parameters
    ----------
    lm : merlin_mllm.models.LoadedModel
        An MLLM (``kind="mllm"``) with its processor.
    """

    name = "mllm"

    def __init__(self, lm):
        if lm.kind != "mllm":
            raise ValueError(
                f"the mllm backend needs an image-text-to-text model; {lm.model_id} loaded as a text "
                "LLM (use backend='textualizer' for text LLMs)"
            )
        self.lm, self.tokenizer, self.model_id = lm, lm.processor, lm.model_id

    def summarize(self, rows, mode, settings):
        n_words = _target_words(settings)
        stats = GenerationStats()

        def run(conversations):
            if not conversations:
                return []
            texts, step = generate_multimodal(self.lm, conversations, settings)
            stats.add(step)
            return texts

        def text_message(prompt):
            return [{"role": "user", "content": [{"type": "text", "text": prompt}]}]

        with_image = [i for i, row in enumerate(rows) if row.image is not None]
        describe = [
            [{"role": "user", "content": [{"type": "image", "image": rows[i].image},
                                          {"type": "text", "text": _IMAGE_DESCRIPTION.format(words=n_words)}]}]
            for i in with_image
        ]
        image_part = dict(zip(with_image, run(describe)))
        # The text is summarised when it is the only input, or when it is combined with the image's.
        needs_text = [
            i for i, row in enumerate(rows)
            if row.has_text and (row.image is None or mode == "image_and_text")
        ]
        text_part = dict(zip(needs_text, run([
            text_message(_TEXT_SUMMARY.format(text=_item_text(rows[i].title, rows[i].description), words=n_words))
            for i in needs_text
        ])))
        fuse = [i for i in with_image if i in text_part and image_part[i] and text_part[i]]
        combine_prompts = []
        for i in fuse:
            # Model output goes back into a prompt: it is escaped like any untrusted text.
            image_text, text_text = balance_lengths(
                escape_untrusted(image_part[i], self.tokenizer), escape_untrusted(text_part[i], self.tokenizer)
            )
            prompt = _IMAGE_AND_TEXT.format(words=n_words, image=image_text, text=text_text)
            combine_prompts.append(text_message(prompt))
        fused = dict(zip(fuse, run(combine_prompts)))
        summaries = []
        for i in range(len(rows)):
            if i in fused:
                summaries.append(fused[i])
            elif i in image_part and (mode == "image_only" or not text_part.get(i)):
                summaries.append(image_part[i])
            else:
                summaries.append(text_part.get(i, "") or image_part.get(i, ""))
        return summaries, stats


def get_backend(backend: str = "textualizer", model: Any = None, device: Optional[str] = None) -> _Backend:
    """The backend for ``(backend, model, device)``, its models loaded once per process.

    The LLM or MLLM comes from the process-wide cache
    (:func:`merlin_mllm.models.loading.shared_model`), the vision encoder from
    :meth:`VisionEncoder.load` (one per device): a Dask worker or an NVTabular transform loads
    them once, however many partitions it handles.

    Parameters
    ----------
    backend : {"textualizer", "mllm"}
    model : str, path or LoadedModel, optional
        ``textualizer``: a text LLM (default: the embedded SmolLM2). ``mllm``: an
        image-text-to-text model (required). A ``LoadedModel`` is used as is (not cached).
    device : str, optional
        Default: CUDA when available, else CPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "mllm" and model is None:
        raise ValueError("the mllm backend needs model=<hub id or local folder of an image-text-to-text model>")

    if isinstance(model, LoadedModel):
        lm = model
    else:
        lm = shared_model(model, device=device, kind="mllm" if backend == "mllm" else "llm")
    if backend == "mllm":
        return MLLMBackend(lm)
    return TextualizerBackend(lm, VisionEncoder.load(device=device or lm.device))


# ---------------------------------------------------------------------------------- summarizer
@dataclass
class ItemSummarizer:
    """Summarise items (title, description, image) into one paragraph each, with a store.

    Parameters
    ----------
    backend : {"textualizer", "mllm"}
        See the module docstring. ``textualizer`` works offline with the embedded models.
    model : str, path or LoadedModel, optional
        The LLM (textualizer; default: embedded SmolLM2) or MLLM (mllm; required).
    mode : {"image_and_text", "image_only"}
        ``image_and_text`` (the paper): image description + text summary combined into one paragraph.
        ``image_only`` (the authors' code): the image description alone; items without a usable
        image still get a summary of their text.
    settings : GenerationSettings
        Greedy by default (deterministic); ``batch_size`` items per batch (and per store write).
    on_empty : {"skip", "error"}
        A row with neither a usable image nor any text: ``skip`` outputs ``""`` and counts it;
        ``error`` raises ``ValueError`` naming the item.
    store : str, path or SummaryStore, optional
        Where summaries are kept and looked up. ``None``: nothing is stored, all is generated.
    device : str, optional
    image_root : str or path, optional
        The image root that path values are confined to: a prepared dataset folder (its
        ``report.json`` names the root; see :func:`merlin_mllm.data.image_files.dataset_image_root`)
        or a plain folder. Relative paths are taken relative to the root and may not leave it
        (``..``); absolute paths outside it are refused unless ``allow_absolute``, except in a
        folder with no recorded root (hand-made, or prepared before roots were recorded), whose
        absolute paths are read as they are, as before. A refused path is not read: the item
        is summarised from its text, counted in ``bad_images`` and named in a warning.
        ``None``: paths are used as given.
    budgets : TokenBudgets
        Titles and descriptions are cut to ``budgets.title`` / ``budgets.description`` tokens
        (keeping their start) before they are escaped; both budgets are part of every key.
    progress : bool
        Show a tqdm bar over the items to generate.
    allow_absolute : bool, optional
        With an ``image_root``, read absolute paths outside it (``True``) or refuse them
        (``False``). ``None``: the root's own rule (``MERLIN_MLLM_ALLOW_ABSOLUTE_IMAGE_PATHS``,
        else refused; read for a folder with no recorded root).

    Examples
    --------
    >>> summarizer = ItemSummarizer(store="/tmp/summaries",
    ...                             settings=GenerationSettings(max_new_tokens=60))  # doctest: +SKIP
    >>> frame = pd.DataFrame({"item_id": [1], "title": ["Espresso cup"],
    ...                       "description": [""], "image_path": ["cup.jpg"]})
    >>> texts, report = summarizer.summarize(frame)  # doctest: +SKIP
    """

    backend: str = "textualizer"
    model: Any = None
    mode: str = "image_and_text"
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    on_empty: str = "skip"
    store: Any = None
    device: Optional[str] = None
    image_root: Optional[Union[str, os.PathLike]] = None
    budgets: TokenBudgets = field(default_factory=TokenBudgets)
    progress: bool = False
    allow_absolute: Optional[bool] = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.on_empty not in ON_EMPTY:
            raise ValueError(f"on_empty must be one of {ON_EMPTY}, not {self.on_empty!r}")
        if self.settings.batch_size < 1:
            raise ValueError(f"settings.batch_size must be at least 1, not {self.settings.batch_size}")
        if not isinstance(self.budgets, TokenBudgets):
            raise TypeError(f"budgets must be a TokenBudgets, not {type(self.budgets).__name__}")
        self._backend: Optional[_Backend] = None
        self._image_root: Optional[ImageRoot] = (
            dataset_image_root(self.image_root) if self.image_root is not None else None
        )

    # -------------------------------------------------------------- pieces
    @property
    def engine(self) -> _Backend:
        """The loaded backend (models load on first use, once per process)."""
        if self._backend is None:
            self._backend = get_backend(self.backend, self.model, self.device)
        return self._backend

    def _store(self) -> Optional[SummaryStore]:
        return open_store(self.store) if self.store is not None else None

    def _resolve_image(self, source: Any) -> Any:
        """The file a path value names, inside the image root (bytes pass through).

        Raises
        ------
        merlin_mllm.image_loading.ImageLoadError
            The path leaves the image root.
        """
        if isinstance(source, (str, os.PathLike)) and self._image_root is not None:
            return self._image_root.resolve(source, allow_absolute=self.allow_absolute)
        return source

    def _rows(self, frame: pd.DataFrame, title: str, description: str, image: str, item_id: str) -> List[_Row]:
        tokenizer = self.engine.tokenizer
        n = len(frame)

        def column(name):
            return frame[name].tolist() if name and name in frame.columns else [None] * n

        def fitted(value, budget):
            # Cut to the budget first (bounded cost, whatever the length), then escape.
            cut = truncate_tokens(None if is_missing(value) else str(value).strip(), budget, tokenizer)
            return escape_untrusted(cut.text, tokenizer).strip(), cut

        rows = []
        outside_root: List[_Row] = []
        for position, (iid, raw_title, raw_desc, source) in enumerate(
            zip(column(item_id), column(title), column(description), column(image))
        ):
            title_text, title_cut = fitted(raw_title, self.budgets.title)
            desc_text, desc_cut = fitted(raw_desc, self.budgets.description)
            row = _Row(
                position=position,
                item_id=None if is_missing(iid) else (iid.item() if hasattr(iid, "item") else iid),
                title=title_text,
                description=desc_text,
                text_tokens=title_cut.tokens + desc_cut.tokens,
                truncated=int(title_cut.truncated) + int(desc_cut.truncated),
            )
            if not is_missing(source):
                try:
                    row.image_source = self._resolve_image(source)
                except ImageLoadError as exc:
                    # Outside the image root: never opened, not even to hash it.
                    row.image_source = source
                    row.image_token, row.image_problem = "unreadable", str(exc)
                    outside_root.append(row)
                    rows.append(row)
                    continue
                try:
                    row.image_token = _sha256_of_image(row.image_source)
                except TypeError:
                    row.image_token, row.image_problem = "unreadable", f"unsupported image value {type(source).__name__}"
                except ImageLoadError as exc:
                    row.image_token, row.image_problem = "unreadable", str(exc)
                except OSError as exc:
                    row.image_token, row.image_problem = "unreadable", f"cannot read {row.image_source}: {exc.strerror or exc}"
            rows.append(row)
        if outside_root:
            first = outside_root[0]
            logger.warning(
                "%d item image paths leave the image root %s and are not read; those items have no image "
                "(first: %s: %s)", len(outside_root), self._image_root.path, first.label,
                first.image_problem,
            )
        return rows

    def _key(self, row: _Row) -> str:
        engine = self.engine
        inputs = {
            "backend": engine.name,
            "mode": STORE_KEY_MODES.get(self.mode, self.mode),
            "title": row.title,
            "description": row.description,
            "image": row.image_token,
            "budgets": {"title": self.budgets.title, "description": self.budgets.description},
            **({"backend_options": engine.key_extras()} if engine.key_extras() else {}),
        }
        return SummaryStore.key("item", engine.model_id, PROMPT_VERSION, self.settings.key(), inputs)

    def _empty(self, row: _Row, report: SummaryReport) -> None:
        what = f" (its image is unusable: {row.image_problem})" if row.image_problem else ""
        if self.on_empty == "error":
            raise ValueError(f"{row.label} has no title, no description and no image{what}: nothing to summarise")
        report.skipped += 1

    def _decode(self, row: _Row, report: SummaryReport) -> None:
        """Decode the row's image (or note why it cannot be used); count image problems."""
        row.image = None
        if row.image_token is None:
            report.missing_images += 1
            return
        if row.image_problem is None:
            try:
                row.image = load_image(row.image_source)
            except (ImageLoadError, TypeError) as exc:
                row.image_problem = str(exc)
        if row.image is None:
            report.bad_images += 1
            logger.warning("%s: image not used, summarising from text alone (%s)", row.label, row.image_problem)

    # -------------------------------------------------------------- main entry
    def summarize(
        self,
        frame: pd.DataFrame,
        *,
        title: str = "title",
        description: str = "description",
        image: str = "image_path",
        item_id: str = "item_id",
    ) -> Tuple[List[str], SummaryReport]:
        """Summaries for the rows of ``frame`` (in order) and a report of what it cost.

        Parameters
        ----------
        frame : pandas.DataFrame
            One row per item. Columns named by the arguments below; an absent column counts as
            empty for every row (e.g. no description column).
        title, description : str
            Text columns (any string; None/NaN are empty).
        image : str
            A column of image file paths or encoded image bytes (None/"" for no image).
        item_id : str
            Optional id column: names items in errors and publishes each item's summary as a
            store ref (``"item"``, ``str(item_id)``), which the user stage reads.

        Returns
        -------
        (list of str, SummaryReport)
            ``""`` for skipped and failed rows.
        """
        report = SummaryReport()
        rows = self._rows(frame, title, description, image, item_id)
        report.truncated += sum(row.truncated for row in rows)
        store = self._store()
        outputs = [""] * len(rows)
        usable = []
        for row in rows:
            if not row.has_text and row.image_token in (None, "unreadable"):
                if row.image_token is not None:
                    report.bad_images += 1
                else:
                    report.missing_images += 1
                self._empty(row, report)
                continue
            row.key = self._key(row)
            usable.append(row)

        cached = store.get_many(row.key for row in usable) if store is not None else {}
        pending: Dict[str, List[_Row]] = {}  # one generation per key, even for repeated items
        refs: Dict[str, str] = {}
        for row in usable:
            if row.key in cached:
                outputs[row.position] = cached[row.key]
                report.reused_from_store += 1
                image_state = store.get_record(row.key).meta.get("image")
                if image_state == "missing":
                    report.missing_images += 1
                elif image_state == "bad":
                    report.bad_images += 1
                if row.item_id is not None:
                    refs[str(row.item_id)] = row.key
            else:
                pending.setdefault(row.key, []).append(row)
        if store is not None and refs:
            store.put_refs(ITEM_REF_NAMESPACE, refs)

        # By prompt length (items with images first: a batch of the mllm backend never mixes
        # them): batches of similar prompts pad less. Outputs keep the input order.
        order = list(pending.values())
        if self.settings.sort_by_length:
            order.sort(key=lambda group: (group[0].image_token is None, group[0].text_tokens))
        batch_size = self.settings.batch_size
        bar = tqdm(total=len(order), desc=f"item summaries ({self.backend})", unit="item", disable=not self.progress)
        for start in range(0, len(order), batch_size):
            groups = order[start : start + batch_size]
            self._run_batch(groups, outputs, report, store)
            bar.update(len(groups))
        bar.close()
        report.rows = sum(1 for text in outputs if text)
        return outputs, report

    def _run_batch(self, groups: List[List[_Row]], outputs: List[str], report: SummaryReport, store) -> None:
        batch: List[_Row] = []
        for group in groups:
            head = group[0]
            self._decode(head, report)
            report.missing_images += (len(group) - 1) * (head.image_token is None)
            report.bad_images += (len(group) - 1) * (head.image_token is not None and head.image is None)
            if head.image is None and not head.has_text:
                for row in group:
                    self._empty(row, report)
                continue
            batch.append(head)
        if not batch:
            return
        texts, stats = self.engine.summarize(batch, self.mode, self.settings)
        report.add_generation(stats)
        records, refs = [], {}
        for head, text in zip(batch, texts):
            group = next(g for g in groups if g[0] is head)
            text = text.strip()
            if not text:
                for row in group:
                    report.add_error(f"{row.label}: the model returned an empty summary")
                continue
            image_state = "ok" if head.image is not None else ("missing" if head.image_token is None else "bad")
            meta = {"kind": "item", "item_id": head.item_id, "backend": self.engine.name,
                    "model_id": self.engine.model_id, "mode": self.mode, "image": image_state}
            records.append((head.key, text, meta))
            report.generated += 1
            report.reused_from_store += len(group) - 1  # repeated rows of one item share its summary
            for row in group:
                outputs[row.position] = text
                if row.item_id is not None:
                    refs[str(row.item_id)] = row.key
            head.image = None  # free the pixels as soon as the batch is done
        if store is not None:
            if records:
                store.put_many(records)
            if refs:
                store.put_refs(ITEM_REF_NAMESPACE, refs)


def summarize_items(
    data_dir: Union[str, os.PathLike],
    summaries: Union[str, os.PathLike],
    *,
    backend: str = "textualizer",
    model: Any = None,
    mode: str = "image_and_text",
    settings: GenerationSettings = GenerationSettings(),
    on_empty: str = "skip",
    progress: bool = True,
    output: Optional[Union[str, os.PathLike]] = None,
    device: Optional[str] = None,
    budgets: TokenBudgets = TokenBudgets(),
) -> SummaryReport:
    """Summarise every item of a prepared dataset into the summary store.

    The store is the source of truth: each summary sits under its content key, and each item id
    points at its current summary (store ref ``"item"``). The user stage and the
    ``ItemSummary`` operator read from there, so nothing is written into ``data_dir``. Pass
    ``output`` to also write a Merlin parquet table (``item_id``, ``item_summary`` tagged TEXT)
    for people who want the summaries as a file.

    Parameters
    ----------
    data_dir : str or path
        The output of ``merlin-mllm data prepare``: ``items/`` holds ``item_id``, ``title``,
        ``description`` and ``image_path`` (see README "Data contract"). Image paths are read
        inside the image root ``report.json`` records (relative to it; folders prepared before
        roots were recorded: relative to ``data_dir``, absolute paths as they are); a path that
        leaves the root is not read (the item counts in ``bad_images``).
    summaries : str or path
        The summary store folder (created when missing).
    backend, model, mode, settings, on_empty, device, budgets :
        See :class:`ItemSummarizer`.
    progress : bool
        tqdm bars.
    output : str or path, optional
        Also write ``item_id`` + ``item_summary`` as a Merlin parquet dataset here.

    Returns
    -------
    SummaryReport

    Examples
    --------
    >>> report = summarize_items("data/ml-100k", "data/summaries",
    ...                          settings=GenerationSettings(max_new_tokens=80))  # doctest: +SKIP
    """
    # Lazy: merlin.io (under data.tables) is heavy, and the summary engine does not need it.
    from merlin_mllm.data.tables import Tags, read_table, write_table

    data_dir = Path(data_dir)
    items_dir = data_dir / "items"
    if not items_dir.is_dir():
        raise FileNotFoundError(f"{items_dir} not found: run `merlin-mllm data prepare` first")
    items = read_table(items_dir)
    if "item_id" not in items.columns:
        raise ValueError(f"{items_dir} has no item_id column (columns: {list(items.columns)})")
    summarizer = ItemSummarizer(
        backend=backend, model=model, mode=mode, settings=settings, on_empty=on_empty,
        store=summaries, device=device, image_root=data_dir, budgets=budgets, progress=progress,
    )
    texts, report = summarizer.summarize(items)
    if output is not None:
        table = pd.DataFrame({"item_id": items["item_id"].to_numpy(), "item_summary": texts})
        write_table(table, output, {"item_id": [Tags.ITEM_ID, Tags.CATEGORICAL], "item_summary": [Tags.TEXT]})
    return report
