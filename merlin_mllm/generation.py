"""Batched text generation with a chat template: the one home for calling ``generate()``.

Both summary stages (items and users) generate through here, so batching, left padding,
greedy-vs-sampling settings and the token counts in reports are the same everywhere.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. Greedy by default (deterministic); the paper's user stage sampled.

    Parameters
    ----------
    max_new_tokens : int
        The paper used at most 200 new tokens for item summaries.
    do_sample : bool
        ``False``: greedy, deterministic. ``True`` with ``temperature=0.6, top_p=0.9`` is the
        paper's user-summary setting; pair it with ``seed`` for repeatable runs.
    batch_size : int
        Prompts per ``generate()`` call at most.
    sort_by_length : bool
        Batch prompts of similar token length together (then restore the input order), so a
        short prompt is not padded to a long one. ``False`` batches in input order (for
        measuring what sorting saves).
    max_batch_tokens : int, optional
        Padded tokens per ``generate()`` call at most (rows x longest prompt); a batch of long
        prompts gets fewer rows. Default ``batch_size * TOKENS_PER_ROW``.
    """

    max_new_tokens: int = 96
    do_sample: bool = False
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 16
    repetition_penalty: float = 1.0
    sort_by_length: bool = True
    max_batch_tokens: Optional[int] = None

    def key(self) -> dict:
        """What changes the output (batching does not, under greedy decoding)."""
        d = asdict(self)
        for name in ("batch_size", "sort_by_length", "max_batch_tokens"):
            d.pop(name)
        if not self.do_sample:
            d.pop("temperature"), d.pop("top_p"), d.pop("seed")
        return d


#: Padded prompt tokens per row of a batch that ``max_batch_tokens=None`` allows (x batch_size).
TOKENS_PER_ROW = 512


def length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: Optional[int] = None,
                   sort: bool = True) -> List[List[int]]:
    """Indices of ``lengths`` in batches: at most ``batch_size`` rows and ``max_batch_tokens``
    padded tokens (rows x longest) each, shortest first when ``sort`` (else in input order).

    A single prompt longer than ``max_batch_tokens`` gets a batch of its own.

    Examples
    --------
    >>> length_batches([5, 900, 7, 6], batch_size=2)      # 2 x 900 > 2 x 512: 900 goes alone
    [[0, 3], [2], [1]]
    >>> length_batches([5, 900, 7, 6], batch_size=4, max_batch_tokens=1000)
    [[0, 3, 2], [1]]
    """
    batch_size = max(1, int(batch_size))
    cap = int(max_batch_tokens) if max_batch_tokens else batch_size * TOKENS_PER_ROW
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if sort else list(range(len(lengths)))
    batches: List[List[int]] = []
    longest = 0
    for i in order:
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * max(longest, lengths[i]) <= cap:
            batches[-1].append(i)
            longest = max(longest, lengths[i])
        else:
            batches.append([i])
            longest = lengths[i]
    return batches


@dataclass
class GenerationStats:
    calls: int = 0  # prompts sent to the model (one LLM step each)
    new_tokens: int = 0

    def add(self, other: "GenerationStats") -> None:
        self.calls += other.calls
        self.new_tokens += other.new_tokens


def generate_chat(
    lm,
    conversations: Sequence[List[dict]],
    settings: GenerationSettings = GenerationSettings(),
    *,
    assistant_prefix: Optional[Sequence[str]] = None,
    progress: bool = False,
    desc: str = "generating",
) -> tuple[List[str], GenerationStats]:
    """Generate one answer per chat conversation, in batches with left padding.

    Parameters
    ----------
    lm : merlin_mllm.models.LoadedModel
        A text LLM (``kind == "llm"``).
    conversations : list of message lists
        ``[{"role": "user", "content": "..."}]`` each; contents must already be escaped.
    assistant_prefix : list of str, optional
        A fixed lead-in the answer starts with (e.g. "The user appears to prefer"). It is put
        after the generation prompt and returned as part of the answer.

    Example
    -------
    >>> from merlin_mllm.models import load
    >>> texts, stats = generate_chat(load(), [[{"role": "user", "content": "Say hi"}]])
    """
    tok = lm.tokenizer
    prompts = [
        tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False) for conv in conversations
    ]
    if assistant_prefix is not None:
        prompts = [p + prefix for p, prefix in zip(prompts, assistant_prefix)]
    old_side = tok.padding_side
    tok.padding_side = "left"  # decoder-only models continue from the right edge
    stats = GenerationStats()
    gen_kwargs = _generate_kwargs(settings, tok)
    try:
        encoded = tok(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        results: dict = {}
        bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
        start = 0
        for idx in length_batches([len(ids) for ids in encoded], settings.batch_size,
                                  settings.max_batch_tokens, settings.sort_by_length):
            batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt")
            batch = {k: v.to(lm.device) for k, v in batch.items()}
            seed = settings.seed + start if settings.do_sample else None
            results.update(zip(idx, _generate_batch(lm, batch, gen_kwargs, seed, stats)))
            start += len(idx)
            bar.update(len(idx))
        bar.close()
        texts = [results[i] for i in range(len(prompts))]
    finally:
        tok.padding_side = old_side
    if assistant_prefix is not None:
        texts = [f"{prefix}{text if text[:1] in ',.;:' else ' ' + text}".strip() for prefix, text in zip(assistant_prefix, texts)]
    return texts, stats


def _generate_kwargs(settings: GenerationSettings, tok) -> dict:
    """``generate()`` keyword arguments for ``settings``."""
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                  pad_token_id=tok.pad_token_id, repetition_penalty=settings.repetition_penalty)
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    else:
        # Greedy: clear sampling fields a model's generation_config may carry, to avoid warnings.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def _generate_batch(lm, batch: dict, gen_kwargs: dict, seed: Optional[int], stats: GenerationStats) -> List[str]:
    """One ``generate()`` call on a left-padded batch: the decoded new text of each row.

    ``seed`` (sampling only) seeds torch first; the prompts and new tokens are added to ``stats``.
    """
    tok = lm.tokenizer
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = lm.model.generate(**batch, **gen_kwargs)
    texts = []
    for ids in out[:, batch["input_ids"].shape[1] :]:
        stats.new_tokens += int((ids != tok.pad_token_id).sum()) if tok.pad_token_id is not None else len(ids)
        texts.append(tok.decode(ids, skip_special_tokens=True).strip())
    stats.calls += len(texts)
    return texts


def _flat_images(conversation: List[dict]) -> list:
    """The images of a multimodal conversation, in the order their placeholders appear."""
    images = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            images.extend(item["image"] for item in content if item.get("type") == "image")
    return images


def _without_image_objects(conversation: List[dict]) -> List[dict]:
    """The conversation with image items reduced to ``{"type": "image"}`` placeholders.

    Chat templates only need to know where an image goes; the pixels go to the processor.
    """
    cleaned = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "image"} if item.get("type") == "image" else item for item in content]
        cleaned.append({**message, "content": content})
    return cleaned


def generate_multimodal(
    lm,
    conversations: Sequence[List[dict]],
    settings: GenerationSettings = GenerationSettings(),
    *,
    progress: bool = False,
    desc: str = "generating",
) -> tuple[List[str], GenerationStats]:
    """Generate one answer per image-text conversation with an MLLM, batched with left padding.

    Each conversation is rendered by the processor's own chat template, then the processor
    tokenizes the texts and prepares the images of the whole batch in one call. Prompts are
    ordered by (number of images, text length) before batching, so a batch never mixes
    prompts with and without images (some processors refuse that) and padding stays small.
    Answers come back in the input order.

    Parameters
    ----------
    lm : merlin_mllm.models.LoadedModel
        An image-text-to-text model (``kind == "mllm"``) with its processor.
    conversations : list of message lists
        Hugging Face multimodal chat format::

            [{"role": "user", "content": [{"type": "image", "image": pil_image},
                                          {"type": "text", "text": "Describe it."}]}]

        Text contents must already be escaped (``merlin_mllm.text.escape_untrusted``).
        A conversation may have no image (text-only prompt through the same model).
    settings : GenerationSettings
        Greedy by default; ``batch_size`` prompts per ``generate()`` call.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    (list of str, GenerationStats)

    Example
    -------
    >>> from PIL import Image
    >>> lm = load("path/to/llava-next")  # doctest: +SKIP
    >>> conv = [{"role": "user", "content": [{"type": "image", "image": Image.open("a.jpg")},
    ...                                      {"type": "text", "text": "Describe the image."}]}]
    >>> texts, stats = generate_multimodal(lm, [conv])  # doctest: +SKIP
    """
    processor = lm.processor
    tok = lm.tokenizer
    images = [_flat_images(conv) for conv in conversations]
    prompts = [
        processor.apply_chat_template(_without_image_objects(conv), add_generation_prompt=True, tokenize=False)
        for conv in conversations
    ]
    gen_kwargs = _generate_kwargs(settings, tok)
    old_side = tok.padding_side
    tok.padding_side = "left"  # decoder-only models continue from the right edge
    stats = GenerationStats()
    results: dict = {}
    try:
        # By image count always (a batch never mixes them); by length when settings ask for it.
        order = sorted(range(len(prompts)), key=lambda i: (len(images[i]), len(prompts[i]) if settings.sort_by_length else 0))
        batches: List[List[int]] = []
        for i in order:  # batch_size prompts per batch, and one image count per batch
            if batches and len(batches[-1]) < settings.batch_size and len(images[batches[-1][0]]) == len(images[i]):
                batches[-1].append(i)
            else:
                batches.append([i])
        bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
        for number, idx in enumerate(batches):
            batch_images = [image for i in idx for image in images[i]]
            kwargs = dict(text=[prompts[i] for i in idx], padding=True, return_tensors="pt")
            if batch_images:
                kwargs["images"] = batch_images
            batch = processor(**kwargs)
            batch = {k: v.to(lm.device) if hasattr(v, "to") else v for k, v in batch.items()}
            if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
                batch["pixel_values"] = batch["pixel_values"].to(lm.dtype)
            seed = settings.seed + number if settings.do_sample else None
            results.update(zip(idx, _generate_batch(lm, batch, gen_kwargs, seed, stats)))
            bar.update(len(idx))
        bar.close()
    finally:
        tok.padding_side = old_side
    return [results[i] for i in range(len(prompts))], stats
