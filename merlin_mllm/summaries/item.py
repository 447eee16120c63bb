"""Item summaries: stage 1 of MLLM-MSR, one paragraph per catalogue item from its image and text.

Two backends write the summaries (:mod:`merlin_mllm.summaries.item_backends`, with their prompts):

``"mllm"``
    Any Hugging Face image-text-to-text model (LLaVA-NeXT, Qwen2-VL, Idefics3/SmolVLM, ...),
    as in the paper. In the default ``mode="image_and_text"`` an item costs up to three prompts:
    the model describes the image (content, colours, objects, visible text, notable details),
    then summarises the title and description, then combines the two into one paragraph. Before
    combining, the longer part is cut to at most ``item_backends.BALANCE_RATIO`` times the length
    of the shorter one, so neither the picture nor the text dominates the result. ``mode="image_only"`` keeps
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
of ``kind="item"``, the model id, :data:`~merlin_mllm.summaries.item_backends.PROMPT_VERSION`,
the output-relevant generation settings and the inputs (cut and escaped title and description,
the budgets they were cut to, sha256 of the image bytes, backend and mode). A summary in the
store is never generated again; new ones are written as soon as their batch finishes, so a crash
loses at most the batch in flight. Each item's current summary is also published as a ref
(namespace ``"item"``, name ``str(item_id)``), which is how the user stage finds the summaries
of history items.

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
from typing import Any, Dict, List, Optional, Tuple, Union

import pandas as pd
from tqdm.auto import tqdm

from merlin_mllm.data.image_files import ImageRoot, dataset_image_root
from merlin_mllm.generation import GenerationSettings
from merlin_mllm.image_loading import ImageLoadError, image_sha256, is_missing, load_image
from merlin_mllm.summaries.item_backends import BACKENDS, PROMPT_VERSION, ItemBackend, ItemRow, get_backend
from merlin_mllm.summaries.report import SummaryReport
from merlin_mllm.summaries.store import ITEM_REF_NAMESPACE, SummaryStore, open_store
from merlin_mllm.text import TokenBudgets, escape_untrusted, truncate_tokens

__all__ = ["MODES", "ON_EMPTY", "ItemSummarizer", "summarize_items"]

logger = logging.getLogger(__name__)

MODES = ("image_and_text", "image_only")
#: The name a mode has in the summary store's keys, where it differs from the mode's own: stores
#: written before ``image_and_text`` had its name keyed it "fusion", and their summaries stay found.
STORE_KEY_MODES = {"image_and_text": "fusion"}
ON_EMPTY = ("skip", "error")


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
        self._backend: Optional[ItemBackend] = None
        self._image_root: Optional[ImageRoot] = (
            dataset_image_root(self.image_root) if self.image_root is not None else None
        )

    # -------------------------------------------------------------- pieces
    @property
    def engine(self) -> ItemBackend:
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

    def _rows(self, frame: pd.DataFrame, title: str, description: str, image: str, item_id: str) -> List[ItemRow]:
        tokenizer = self.engine.tokenizer
        n = len(frame)

        def column(name):
            return frame[name].tolist() if name and name in frame.columns else [None] * n

        def fitted(value, budget):
            # Cut to the budget first (bounded cost, whatever the length), then escape.
            cut = truncate_tokens(None if is_missing(value) else str(value).strip(), budget, tokenizer)
            return escape_untrusted(cut.text, tokenizer).strip(), cut

        rows = []
        outside_root: List[ItemRow] = []
        for position, (iid, raw_title, raw_desc, source) in enumerate(
            zip(column(item_id), column(title), column(description), column(image))
        ):
            title_text, title_cut = fitted(raw_title, self.budgets.title)
            desc_text, desc_cut = fitted(raw_desc, self.budgets.description)
            row = ItemRow(
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
                    row.image_token = image_sha256(row.image_source)
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

    def _key(self, row: ItemRow) -> str:
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

    def _empty(self, row: ItemRow, report: SummaryReport) -> None:
        what = f" (its image is unusable: {row.image_problem})" if row.image_problem else ""
        if self.on_empty == "error":
            raise ValueError(f"{row.label} has no title, no description and no image{what}: nothing to summarise")
        report.skipped += 1

    def _decode(self, row: ItemRow, report: SummaryReport) -> None:
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
        pending: Dict[str, List[ItemRow]] = {}  # one generation per key, even for repeated items
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

    def _run_batch(self, groups: List[List[ItemRow]], outputs: List[str], report: SummaryReport, store) -> None:
        batch: List[ItemRow] = []
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
