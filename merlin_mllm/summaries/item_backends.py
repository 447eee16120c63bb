"""The two backends that write an item's summary, with their prompts.

``"mllm"`` (:class:`MLLMBackend`)
    An image-text-to-text model describes the image, summarises the text, then combines the two
    (mode ``image_and_text``), or keeps the image description alone (``image_only``).
``"textualizer"`` (:class:`TextualizerBackend`)
    The embedded EfficientNet-Lite0 turns the image into words; a text LLM writes the paragraph.

:func:`get_backend` gives a backend whose models are loaded once per process. The rows they
summarise (:class:`ItemRow`) are built by :class:`~merlin_mllm.summaries.item.ItemSummarizer`,
which also keys, stores and batches them. Every item key records :data:`PROMPT_VERSION`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from merlin_mllm.generation import GenerationSettings, GenerationStats, generate_chat, generate_multimodal
from merlin_mllm.models.loading import LoadedModel, shared_model
from merlin_mllm.models.vision import MODEL_NAME, VisionEncoder, dominant_colours
from merlin_mllm.text import escape_untrusted

#: Bump whenever a prompt below changes wording: it is part of every summary's store key.
PROMPT_VERSION = "item-v1"
BACKENDS = ("textualizer", "mllm")
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
    return "\n".join(f"{label}: {text}" for label, text in (("Title", title), ("Description", description)) if text)


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
class ItemRow:
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


# ---------------------------------------------------------------------------------- backends
class ItemBackend:
    """What :class:`~merlin_mllm.summaries.item.ItemSummarizer` needs of a backend.

    ``model_id`` and :meth:`key_extras` enter every item key; :meth:`summarize` returns one text
    per row (``""`` when the model gave none) and the generation's cost.
    """

    name: str
    model_id: str
    tokenizer: Any  # the one whose special tokens are escaped in item text
    lm: Any

    def key_extras(self) -> dict:
        return {}

    def summarize(self, rows: List[ItemRow], mode: str, settings: GenerationSettings) -> Tuple[List[str], GenerationStats]:
        raise NotImplementedError


class TextualizerBackend(ItemBackend):
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

    def conversations(self, rows: List[ItemRow], mode: str, settings: GenerationSettings) -> List[List[dict]]:
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


class MLLMBackend(ItemBackend):
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


def get_backend(backend: str = "textualizer", model: Any = None, device: Optional[str] = None) -> ItemBackend:
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
