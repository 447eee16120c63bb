"""The recommender prompt (stage 3 of MLLM-MSR): user summary, candidate title and image, Yes/No.

Every candidate of a user is asked about in the same words, and the user's part comes first::

    <system>  You are a recommender system ...
    <user>    What we know about the user: {summary}
              Candidate item: {title}
              Image of the candidate: <image tokens>          (only when the item has an image)
              Will the user interact with this item next? Answer only Yes or No.
    <assistant>                                              <- the answer token goes here

so all candidates of one user share the system message and the summary as a *token* prefix.
The scorer computes that prefix once and reuses its KV cache for every candidate.

Prompt versions (``RankerConfig.prompt_version``; a trained adapter is tied to the one it saw):

``"1"`` (:data:`PROMPT_VERSION`, the default)
    The layout above: the question follows the candidate, so every candidate repeats it.
``"2"`` (question first, for packed groups)
    The question moves into the shared part, before the candidate::

        <user>    What we know about the user: {summary}
                  Will the user interact with the candidate item below next? Answer only Yes or No.
                  Candidate item: {title}
                  Image of the candidate: <image tokens>
        <assistant>

    so a candidate's own part is little more than its title (and image tokens) and the chat
    template's closing, about 12 tokens instead of about 38 for a text-only SmolLM2 prompt.
    That is what makes packing one user's candidates into one sequence cheap
    (:mod:`merlin_mllm.ranker.packing`).

The prompt is rendered with the model's own chat template. Summaries and titles are untrusted
(titles come from catalogues; summaries are generated from them), so they are escaped with
:func:`merlin_mllm.text.escape_untrusted`: a title cannot close the user turn or smuggle in image
tokens. Long summaries and titles are cut to a token budget before escaping.

Where the prefix ends
---------------------
Tokenizers can merge characters across the boundary between the user part and the candidate
part, so the split is not taken from the text: the full prompt is tokenized once, the user part
on its own once, and the prefix is their longest common *token* prefix. Hence
``prefix_ids + candidate_ids == tokenize(full prompt)`` always holds, and the candidate part
ends exactly where the answer token goes.

Image modes
-----------
``"placeholder"``
    The embedded model (SmolLM2 + EfficientNet-Lite0): each image is ``num_image_tokens`` (49)
    copies of the ``<image>`` special token, whose embeddings the model replaces by projected
    image features. Token ids can be made from text alone (no pixels needed), which is what a
    Merlin/NVTabular tokenization step needs.
``"processor"``
    Hugging Face MLLMs: the chat template's image item is expanded by the model's processor,
    which also returns the pixel tensors.
``"none"``
    Text only (the MLLM-MSR_I ablation): no image, whatever the item has.

Usage::

    from merlin_mllm.ranker.prompt import RankerPrompt, embedded_tokenizer

    prompt = RankerPrompt(embedded_tokenizer(), image_mode="placeholder")
    encoded = prompt.encode("The user likes sci-fi films.", "Alien (1979)", has_image=True)
    encoded.prefix_ids, encoded.candidate_ids      # shared user part / this candidate's part
    no_id, yes_id = prompt.answer_token_ids()      # (5230, 10539) for SmolLM2
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

from merlin_mllm.choices import PROMPT_VERSIONS
from merlin_mllm.image_loading import is_missing, load_image
from merlin_mllm.models import embedded
from merlin_mllm.text import escape_untrusted, item_slot, item_token_id, split_item_slots, strip_item_slots, truncate_tokens

__all__ = [
    "PROMPT_VERSION",
    "DEFAULT_MAX_PROMPT_TOKENS",
    "IMAGE_TOKEN",
    "Candidate",
    "EncodedPrompt",
    "PromptBatch",
    "RankerPrompt",
    "embedded_tokenizer",
    "check_prompt_version",
    "common_prefix_length",
    "shared_prefix_length",
]

#: The default prompt version. Bump when the wording or layout changes: a trained adapter is
#: tied to the prompt it saw.
PROMPT_VERSION = "1"
#: The longest prompt in tokens when none is given: training's ``TrainConfig.max_length`` default,
#: ``TokenizePrompt``'s, and what serving cuts to when the training run recorded none (a longer
#: prompt gets a shorter user summary).
DEFAULT_MAX_PROMPT_TOKENS = 512
#: The image placeholder token of the embedded model.
IMAGE_TOKEN = "<image>"
IMAGE_MODES = ("placeholder", "processor", "none")

DEFAULT_SYSTEM = (
    "You are a recommender system. You are told what is known about a user's preferences and "
    "are shown one candidate item; you answer whether the user will interact with it next."
)
USER_HEADER = "What we know about the user: "
CANDIDATE_HEADER = "\n\nCandidate item: "
IMAGE_HEADER = "\nImage of the candidate: "
QUESTION = "\n\nWill the user interact with this item next? Answer only Yes or No."
#: Version 2 asks first, in the shared part; the candidate header then ends the shared part.
QUESTION_FIRST = "\n\nWill the user interact with the candidate item below next? Answer only Yes or No."
ANSWERS = ("No", "Yes")  # index 1 is the positive class, as in softmax([no, yes])[1]


@dataclass(frozen=True)
class Candidate:
    """One candidate item to score.

    Parameters
    ----------
    title : str
        The item's title (untrusted; escaped when rendered).
    image : path, bytes, PIL image or array, optional
        The item's picture. HF MLLMs read it through their processor; the embedded model encodes
        it with EfficientNet-Lite0 when ``item_id`` is not in its item feature table.
    item_id : int, optional
        Key into the embedded model's :class:`~merlin_mllm.ranker.model.ItemImageFeatures`.
    """

    title: str
    image: Any = None
    item_id: Optional[int] = None

    @classmethod
    def coerce(cls, value: Any, index: int = 0) -> "Candidate":
        """A Candidate from a Candidate, a title string, or a dict with ``title``/``image``/``item_id``."""
        if isinstance(value, Candidate):
            return value
        if isinstance(value, str):
            return cls(title=value)
        if isinstance(value, dict):
            unknown = set(value) - {"title", "image", "item_id"}
            if unknown or "title" not in value:
                raise ValueError(
                    f"candidate {index}: a dict needs 'title' and may have 'image', 'item_id' "
                    f"(got keys {sorted(value)})"
                )
            item_id = value.get("item_id")
            return cls(title=value["title"], image=value.get("image"),
                       item_id=None if item_id is None else int(item_id))
        raise TypeError(f"candidate {index}: expected a Candidate, str or dict, not {type(value).__name__}")


@dataclass
class EncodedPrompt:
    """A tokenized prompt (without its answer), split where the user part ends.

    ``input_ids[:prefix_len]`` is shared by every candidate of the user;
    ``input_ids[prefix_len:]`` is this candidate's part, ending where the answer token goes.
    """

    input_ids: List[int]
    prefix_len: int
    has_image: bool

    @property
    def prefix_ids(self) -> List[int]:
        return self.input_ids[: self.prefix_len]

    @property
    def candidate_ids(self) -> List[int]:
        return self.input_ids[self.prefix_len:]


@dataclass
class PromptBatch:
    """Several encoded prompts, plus the processor's image tensors for them (processor mode)."""

    prompts: List[EncodedPrompt]
    image_inputs: Dict[str, Any] = field(default_factory=dict)


def check_prompt_version(version: Any) -> str:
    """``version`` as a string, when this code renders it; else a ValueError naming the known ones."""
    version = str(version)
    if version not in PROMPT_VERSIONS:
        known = ", ".join(f"{v!r} ({layout})" for v, layout in PROMPT_VERSIONS.items())
        raise ValueError(f"unknown prompt version {version!r}; this merlin-mllm renders {known}")
    return version


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token-id sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def shared_prefix_length(prompts: Sequence[EncodedPrompt], image_token_id: Optional[int]) -> int:
    """Tokens shared by all prompts, leaving each at least its last token to compute."""
    first = prompts[0].input_ids
    length = len(first) - 1
    for prompt in prompts:
        length = min(length, common_prefix_length(first, prompt.input_ids), len(prompt.input_ids) - 1)
    if image_token_id is not None:
        # Image tokens must be computed with their features, never read from a shared prefix.
        for index, token in enumerate(first[:length]):
            if token == image_token_id:
                return index
    return max(length, 0)


@lru_cache(maxsize=1)
def _embedded_tokenizer_cached():
    # Lazy, as below: this module is imported by light processes (tokenizing operators) that
    # must not pay for transformers or torch until they tokenize.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded.smollm2_path()))
    add_image_token(tokenizer)
    return tokenizer


def embedded_tokenizer():
    """SmolLM2's tokenizer with the ``<image>`` placeholder added: the embedded model's tokenizer.

    Cached per process; do not modify the returned object.
    """
    return _embedded_tokenizer_cached()


def _ensure_pad(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def add_image_token(tokenizer) -> int:
    """Add ``<image>`` as a special token (no-op when present); returns its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    _ensure_pad(tokenizer)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


class RankerPrompt:
    """Renders and tokenizes the Yes/No recommender prompt for one model.

    Parameters
    ----------
    processor : tokenizer or processor
        A tokenizer with a chat template (``"placeholder"``/``"none"`` modes), or an MLLM
        processor (``"processor"`` mode; its tokenizer is used for text).
    image_mode : {"placeholder", "processor", "none"}
        See the module docstring.
    num_image_tokens : int
        Placeholder tokens per image in ``"placeholder"`` mode (49 = EfficientNet's 7x7 grid).
    image_token : str
        The placeholder token (``"placeholder"`` mode); it must be in the tokenizer.
    system : str or None
        The system message; ``None`` leaves it out (for templates that reject a system turn).
    max_summary_tokens, max_title_tokens : int
        Token budgets: longer summaries/titles are cut (keeping their start) before escaping.
    version : str
        The prompt version (a key of :data:`merlin_mllm.choices.PROMPT_VERSIONS`; default
        :data:`PROMPT_VERSION`).
    collab_tokens : bool
        Collaborative tokens (:mod:`merlin_mllm.ranker.collab_tokens`): the summary's item slots
        (:func:`merlin_mllm.text.item_slot`, written after each history title) become one token id
        each, and one follows the candidate's title (its ``item_id``; cold without one). Off: a
        prompt is exactly what it was before the setting.

    Examples
    --------
    >>> prompt = RankerPrompt(embedded_tokenizer(), image_mode="none")
    >>> enc = prompt.encode("Likes jazz.", "Kind of Blue")
    >>> enc.input_ids == enc.prefix_ids + enc.candidate_ids
    True
    """

    def __init__(
        self,
        processor,
        *,
        image_mode: str = "placeholder",
        num_image_tokens: int = 49,
        image_token: str = IMAGE_TOKEN,
        system: Optional[str] = DEFAULT_SYSTEM,
        max_summary_tokens: int = 384,
        max_title_tokens: int = 64,
        version: str = PROMPT_VERSION,
        collab_tokens: bool = False,
    ):
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, not {image_mode!r}")
        self.version = check_prompt_version(version)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_mode = image_mode
        # MLLM processors' templates take content lists ({"type": "text"} / {"type": "image"});
        # plain tokenizers' templates take strings.
        self._list_content = hasattr(processor, "image_processor")
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.system = system
        self.max_summary_tokens = int(max_summary_tokens)
        self.max_title_tokens = int(max_title_tokens)
        self.collab_tokens = bool(collab_tokens)
        if getattr(self.tokenizer, "chat_template", None) is None and getattr(processor, "chat_template", None) is None:
            raise ValueError("the tokenizer/processor has no chat template; the ranker prompt needs one")
        if image_mode == "placeholder":
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
            if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
                raise ValueError(
                    f"the tokenizer has no {image_token!r} token; add it with add_image_token(tokenizer)"
                )
        elif image_mode == "processor":
            if not hasattr(processor, "image_processor"):
                raise ValueError("image_mode='processor' needs an MLLM processor, not a bare tokenizer")
            self.image_token_id = getattr(processor, "image_token_id", None)
        else:
            self.image_token_id = None
        # Marks where the user part ends inside one rendering of the template. Random per
        # instance, so untrusted text cannot contain it by accident or design.
        self._split_marker = f"\x00split-{uuid.uuid4().hex}\x00"

    @classmethod
    def create(cls, processor, *, image_mode: str = "placeholder", **kwargs) -> "RankerPrompt":
        """Like the constructor, but drops the system message when the chat template rejects it
        (some MLLM templates have no system role), and checks that the template renders."""
        prompt = cls(processor, image_mode=image_mode, **kwargs)
        try:
            prompt.render("", "", False)
        except Exception as exc:  # jinja2 TemplateError or the template's own raise_exception
            if "system" not in str(exc).lower() or kwargs.get("system", DEFAULT_SYSTEM) is None:
                raise
            kwargs["system"] = None
            prompt = cls(processor, image_mode=image_mode, **kwargs)
            prompt.render("", "", False)
        return prompt

    @classmethod
    def for_model(
        cls,
        base_model: Optional[str] = "embedded",
        *,
        use_images: bool = True,
        max_summary_tokens: int = 384,
        max_title_tokens: int = 64,
        num_image_tokens: int = 49,
        version: str = PROMPT_VERSION,
        collab_tokens: bool = False,
    ) -> "RankerPrompt":
        """The prompt of a ranker built on ``base_model``, without loading any weights.

        This is what a tokenization step (e.g. an NVTabular operator) uses to make the exact
        token ids the ranker expects. The settings must match the ranker's
        (:class:`~merlin_mllm.ranker.model.RankerConfig` holds them).

        Parameters
        ----------
        base_model : str
            ``"embedded"``, or an HF hub id / local folder.
        use_images : bool
            False: text-only prompts.
        version : str
            The prompt version (``RankerConfig.prompt_version``).
        """
        # Lazy: models.loading imports torch.
        from merlin_mllm.models.loading import EMBEDDED_LLM_ALIASES, load_processor, model_kind

        options = dict(max_summary_tokens=max_summary_tokens, max_title_tokens=max_title_tokens,
                       num_image_tokens=num_image_tokens, version=version)
        if collab_tokens:
            options["collab_tokens"] = True
        if base_model in EMBEDDED_LLM_ALIASES:
            return cls.create(embedded_tokenizer(), image_mode="placeholder" if use_images else "none", **options)
        from transformers import AutoConfig, AutoTokenizer

        if model_kind(AutoConfig.from_pretrained(str(base_model))) == "mllm":
            processor = load_processor(str(base_model))
            _ensure_pad(getattr(processor, "tokenizer", processor))
            return cls.create(processor, image_mode="processor" if use_images else "none", **options)
        if use_images:
            raise ValueError(f"{base_model} is a text-only LLM: use use_images=False")
        tokenizer = AutoTokenizer.from_pretrained(str(base_model))
        _ensure_pad(tokenizer)
        return cls.create(tokenizer, image_mode="none", **options)

    # ------------------------------------------------------------------ text
    def _truncate(self, text: str, max_tokens: int) -> str:
        # The budget function every LLM-bound text goes through (summary stages too).
        return truncate_tokens(text, max_tokens, self.tokenizer).text

    def clean_summary(self, summary: Any) -> str:
        """The summary as it enters the prompt: cut to ``max_summary_tokens``, then escaped."""
        text = "" if is_missing(summary) else str(summary).strip()
        if self.collab_tokens:
            # The item slots survive (cut to the budget with the text; a slot cut in half is
            # dropped); the text between them is escaped as any other.
            segments, items = split_item_slots(self._truncate(text, self.max_summary_tokens))
            escaped = [escape_untrusted(segment, self.tokenizer) for segment in segments]
            return escaped[0] + "".join(item_slot(i) + e for i, e in zip(items, escaped[1:]))
        return escape_untrusted(self._truncate(text, self.max_summary_tokens), self.tokenizer)

    def clean_title(self, title: Any) -> str:
        """The title as it enters the prompt: cut to ``max_title_tokens``, then escaped."""
        text = "" if is_missing(title) else str(title).strip()
        if self.collab_tokens:
            text = strip_item_slots(text)  # a title never places a collaborative token
        return escape_untrusted(self._truncate(text, self.max_title_tokens), self.tokenizer)

    def _messages(self, summary: str, title: str, with_image: bool) -> List[dict]:
        if self.version == "1":
            user_part = USER_HEADER + summary + self._split_marker
            candidate_part, question = CANDIDATE_HEADER + title, QUESTION
        else:  # "2": the question and the candidate header are shared; the title comes last
            user_part = USER_HEADER + summary + QUESTION_FIRST + CANDIDATE_HEADER + self._split_marker
            candidate_part, question = title, ""
        messages = []
        if self._list_content:
            if self.system is not None:
                messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
            content = [{"type": "text", "text": user_part + candidate_part}]
            if with_image:
                content[0]["text"] += IMAGE_HEADER
                content.append({"type": "image"})
            if question:
                content.append({"type": "text", "text": question})
            messages.append({"role": "user", "content": content})
        else:
            if self.system is not None:
                messages.append({"role": "system", "content": self.system})
            if with_image:
                candidate_part += IMAGE_HEADER + self.image_token * self.num_image_tokens
            messages.append({"role": "user", "content": user_part + candidate_part + question})
        return messages

    def render(self, summary: Any, title: Any, has_image: bool = False, item_id: Optional[int] = None
               ) -> Tuple[str, str]:
        """The full prompt text (up to where the answer goes) and its user-part prefix text.

        Parameters
        ----------
        summary, title : str
            Raw (untrusted) user summary and candidate title.
        has_image : bool
            Whether the candidate's image is shown (ignored in ``"none"`` mode).
        item_id : int, optional
            With ``collab_tokens``: the candidate's item, whose slot follows its title.

        Returns
        -------
        (full_text, user_text) : tuple of str
            ``full_text.startswith(user_text)``.
        """
        with_image = bool(has_image) and self.image_mode != "none"
        title = self.clean_title(title) + (item_slot(item_id) if self.collab_tokens else "")
        messages = self._messages(self.clean_summary(summary), title, with_image)
        template_owner = self.processor if self._list_content else self.tokenizer
        text = template_owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        at = text.find(self._split_marker)
        if at < 0 or text.count(self._split_marker) != 1:
            raise RuntimeError("the chat template dropped or repeated the user text; cannot split the prompt")
        return text.replace(self._split_marker, "", 1), text[:at]

    # ------------------------------------------------------------------ tokens
    def _text_ids(self, text: str) -> List[int]:
        # The chat template already wrote BOS/role markers: add nothing.
        if not self.collab_tokens:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        segments, items = split_item_slots(text)
        ids = list(self.tokenizer(segments[0], add_special_tokens=False)["input_ids"]) if segments[0] else []
        for item, segment in zip(items, segments[1:]):
            ids.append(item_token_id(item))
            if segment:
                ids.extend(self.tokenizer(segment, add_special_tokens=False)["input_ids"])
        return ids

    def encode(self, summary: Any, title: Any, has_image: bool = False, item_id: Optional[int] = None
               ) -> EncodedPrompt:
        """Token ids of one prompt, split where the user part ends.

        In ``"processor"`` mode this works for text-only prompts; prompts with images need the
        pixels, so use :meth:`encode_batch`.

        Parameters
        ----------
        summary, title : str
        has_image : bool
            In ``"placeholder"`` mode, whether to insert the image placeholder tokens.
        item_id : int, optional
            With ``collab_tokens``: the candidate's item (its collaborative token follows the title).
        """
        with_image = bool(has_image) and self.image_mode != "none"
        if with_image and self.image_mode == "processor":
            raise ValueError("prompts with images in processor mode need the image: use encode_batch")
        full_text, user_text = self.render(summary, title, with_image, item_id)
        full_ids = self._text_ids(full_text)
        prefix_len = common_prefix_length(self._text_ids(user_text), full_ids)
        self._check_image_tokens(full_ids, prefix_len, with_image, 0)
        return EncodedPrompt(full_ids, prefix_len, with_image)

    def encode_batch(
        self,
        summaries: Sequence[Any],
        candidates: Sequence[Any],
        has_image: Optional[Sequence[bool]] = None,
    ) -> PromptBatch:
        """Token ids (and, in processor mode, image tensors) for several (summary, candidate) pairs.

        Parameters
        ----------
        summaries : list of str
            One user summary per prompt (repeat a user's summary for each of its candidates).
        candidates : list of Candidate, str or dict
            The matching candidates.
        has_image : list of bool, optional
            ``"placeholder"`` mode: whether each prompt shows an image (the model decides from
            its item feature table). Default: when the candidate's ``image`` is set. Ignored in
            ``"processor"`` mode, where a prompt shows the candidate's ``image`` when it is set.

        Returns
        -------
        PromptBatch
            ``prompts`` in input order; in processor mode ``image_inputs`` holds the
            processor's image tensors (e.g. ``pixel_values``, ``image_sizes``,
            ``image_grid_thw``) for the prompts with images, in order, and per-token lists
            such as ``mm_token_type_ids`` (one list per prompt).
        """
        if len(summaries) != len(candidates):
            raise ValueError(f"{len(summaries)} summaries but {len(candidates)} candidates")
        candidates = [Candidate.coerce(c, i) for i, c in enumerate(candidates)]
        if self.image_mode == "processor":
            return self._encode_with_processor(summaries, candidates)
        if has_image is None:
            has_image = [not is_missing(c.image) for c in candidates]
        if len(has_image) != len(candidates):
            raise ValueError(f"{len(has_image)} has_image flags for {len(candidates)} candidates")
        return PromptBatch([
            self.encode(s, c.title, has_image=bool(shown), item_id=c.item_id if self.collab_tokens else None)
            for s, c, shown in zip(summaries, candidates, has_image)
        ])

    def _encode_with_processor(self, summaries, candidates) -> PromptBatch:
        texts, user_texts, images, with_image = [], [], [], []
        for summary, candidate in zip(summaries, candidates):
            image = None if is_missing(candidate.image) else candidate.image
            if image is not None:
                image = load_image(image)
            full_text, user_text = self.render(summary, candidate.title, image is not None)
            texts.append(full_text)
            user_texts.append(user_text)
            with_image.append(image is not None)
            if image is not None:
                images.append(image)
        # Each prompt is processed on its own (no padding), so ids are exactly the prompt's.
        outputs = [
            self.processor(text=[text], images=[image] if shown else None, return_tensors="pt",
                           add_special_tokens=False)
            for text, shown, image in zip(texts, with_image, _iter_images(images, with_image))
        ]
        prompts, per_token = [], {}
        for index, (output, user_text, shown) in enumerate(zip(outputs, user_texts, with_image)):
            full_ids = output["input_ids"][0].tolist()
            prefix_len = common_prefix_length(self._text_ids(user_text), full_ids)
            self._check_image_tokens(full_ids, prefix_len, shown, index)
            prompts.append(EncodedPrompt(full_ids, prefix_len, shown))
            for key, value in output.items():
                if key in ("input_ids", "attention_mask") or not hasattr(value, "shape"):
                    continue
                if value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == len(full_ids) and key.endswith("type_ids"):
                    per_token.setdefault(key, []).append(value[0].tolist())
        image_inputs: Dict[str, Any] = dict(per_token)
        if images:
            import torch  # lazy: only processor prompts with pictures need it

            shown_outputs = [o for o, shown in zip(outputs, with_image) if shown]
            for key in shown_outputs[0].keys():
                if key in ("input_ids", "attention_mask") or key in per_token:
                    continue
                image_inputs[key] = _concat_image_tensors([o[key] for o in shown_outputs], key, torch)
        return PromptBatch(prompts, image_inputs)

    def _check_image_tokens(self, ids: List[int], prefix_len: int, with_image: bool, index: int) -> None:
        if self.image_token_id is None:
            return
        in_prefix = sum(1 for t in ids[:prefix_len] if t == self.image_token_id)
        total = sum(1 for t in ids if t == self.image_token_id)
        if in_prefix:
            raise RuntimeError(f"prompt {index}: image tokens fell into the shared user prefix")
        if self.image_mode == "placeholder" and total != (self.num_image_tokens if with_image else 0):
            raise RuntimeError(
                f"prompt {index}: {total} image tokens, expected "
                f"{self.num_image_tokens if with_image else 0} (escaping failed?)"
            )
        if not with_image and total:
            raise RuntimeError(f"prompt {index}: image tokens in a prompt without an image")

    # ------------------------------------------------------------------ answers
    def answer_token_ids(self) -> Tuple[int, int]:
        """Ids of the answer tokens ``(No, Yes)`` as they follow this prompt.

        Checked on a rendered prompt: appending ``"No"``/``"Yes"`` to the prompt text must add
        exactly one token and leave the prompt's tokens unchanged.
        """
        full_text, _ = self.render("The user likes films.", "A film", False)
        base = self._text_ids(full_text)
        ids = []
        for answer in ANSWERS:
            extended = self._text_ids(full_text + answer)
            if len(extended) != len(base) + 1 or extended[: len(base)] != base:
                raise ValueError(
                    f"the answer {answer!r} is not one token after this chat template's "
                    f"assistant turn ({extended[len(base) - 1:]}); choose a model whose tokenizer "
                    "has single-token Yes/No answers"
                )
            ids.append(extended[-1])
        return ids[0], ids[1]


def _iter_images(images, with_image):
    it = iter(images)
    for shown in with_image:
        yield next(it) if shown else None


def _concat_image_tensors(values, key, torch):
    """Concatenate one processor output key over single-prompt outputs (image rows first)."""
    first = values[0]
    if not hasattr(first, "shape"):
        return values
    if first.dim() >= 2 and key == "pixel_values" and any(v.shape[1:] != first.shape[1:] for v in values):
        # Variable tiles per image (LLaVA-NeXT anyres, Idefics3 splitting): pad the tile axis
        # with zeros, as the processors themselves do for batches.
        tiles = max(v.shape[1] for v in values)
        padded = []
        for v in values:
            pad = torch.zeros((v.shape[0], tiles - v.shape[1], *v.shape[2:]), dtype=v.dtype)
            padded.append(torch.cat([v, pad], dim=1))
        return torch.cat(padded)
    if key == "pixel_attention_mask" and any(v.shape[1:] != first.shape[1:] for v in values):
        tiles = max(v.shape[1] for v in values)
        return torch.cat([
            torch.cat([v, torch.zeros((v.shape[0], tiles - v.shape[1], *v.shape[2:]), dtype=v.dtype)], dim=1)
            for v in values
        ])
    return torch.cat(values)
