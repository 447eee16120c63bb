"""The ``ItemSummary`` NVTabular operator: an ``item_summary`` text column from item images and text."""
from __future__ import annotations

import os
import threading
from typing import Optional, Union

import pandas as pd

import merlin.dtypes as md
from merlin.core.dispatch import DataFrameType, annotate, from_host, is_cpu_object
from merlin.schema import Schema, Tags
from nvtabular.ops.operator import ColumnSelector, Operator

from merlin_mllm.generation import GenerationSettings
from merlin_mllm.summaries.item import MODES, ON_EMPTY, ItemSummarizer
from merlin_mllm.summaries.item_backends import BACKENDS
from merlin_mllm.summaries.report import SummaryReport
from merlin_mllm.text import TokenBudgets

__all__ = ["ItemSummary", "process_report"]

#: Counts of every ItemSummary transform run in this process (one per Dask worker); collect
#: them with ``client.run(lambda: process_report().to_dict())``.
_PROCESS_REPORT = SummaryReport()


def process_report() -> SummaryReport:
    """The summed report of this process's ``ItemSummary`` transforms."""
    return _PROCESS_REPORT


class ItemSummary(Operator):
    """Writes one summary paragraph per item from its image, title and description (stage 1
    of MLLM-MSR). The paragraphs come from a multimodal LLM, or from a text LLM fed with what
    an image classifier sees (the offline default); see :mod:`merlin_mllm.summaries.item`.

    The data is one row per item, with some of these columns: a title, a description, an image
    (a file path or the encoded image bytes; empty for no image) and, preferably, the item id.
    Select them as the operator's input; their roles are given by the ``title``,
    ``description``, ``image`` and ``item_id`` parameters (a role whose column is not selected
    is treated as empty). When the id is selected, errors name the item and each summary is
    published in the store under the item id, where ``UserPreferenceSummary`` finds it.

    Summaries are kept in a summary store (``summaries``): a summary already there is reused,
    never generated again, so re-running a workflow costs nothing, and new summaries are
    written batch by batch (a crash loses at most one batch). Images that are missing or cannot
    be decoded do not fail the job: such items are summarised from their text alone. A row with
    neither image nor text gets ``""`` (``on_empty="skip"``) or raises (``on_empty="error"``).

    ``Workflow.fit`` runs the first partition through the operator once to learn output dtypes
    (NVTabular does this for every operator); with a store, the following ``transform`` reuses
    those summaries instead of generating them again.

    The models are loaded once per process (module-level cache) on first use, never pickled
    with the operator, so a saved workflow stays small and each Dask worker loads them once.
    The output column has the Merlin ``string`` dtype and the ``TEXT`` tag. pandas and cudf
    partitions both work (cudf columns are brought to the host for the model, and the result
    is returned as cudf).

    Example usage::

        import nvtabular as nvt
        from merlin_mllm.operators.item_summary import ItemSummary
        from merlin_mllm.generation import GenerationSettings

        items = nvt.Dataset("data/ml-100k/items", engine="parquet")
        item_summaries = ["item_id", "title", "description", "image_path"] >> ItemSummary(
            summaries="data/summaries", settings=GenerationSettings(max_new_tokens=80)
        )
        workflow = nvt.Workflow(["item_id"] + item_summaries)
        workflow.fit_transform(items).to_parquet("out/items")   # columns item_id, item_summary

    Parameters
    ----------
    summaries : str or path, optional
        The summary store folder (shared with the user stage). ``None`` keeps no store: every
        transform generates every summary again.
    backend : {"textualizer", "mllm"}, default "textualizer"
        ``textualizer``: vision-encoder labels and colours + a text LLM (offline, cheap).
        ``mllm``: an image-text-to-text model reads the image itself (the paper).
    model : str, optional
        Hub id or local folder. Default for ``textualizer``: the embedded SmolLM2; ``mllm``
        needs one. Must be a string (the loaded model is never pickled).
    mode : {"image_and_text", "image_only"}, default "image_and_text"
        ``image_and_text`` combines an image description and a text summary (the paper);
        ``image_only`` keeps the image description alone (the authors' code).
    settings : GenerationSettings
        Greedy by default; ``batch_size`` items are generated together, batched by length.
    budgets : TokenBudgets
        Titles and descriptions are cut to ``budgets.title`` / ``budgets.description`` tokens
        (recorded in every summary's key); cuts are counted in the report's ``truncated``.
    on_empty : {"skip", "error"}, default "skip"
        What to do with a row that has neither a usable image nor text.
    title, description, image, item_id : str
        The input column playing each role.
    output_column : str, default "item_summary"
    image_root : str or path, optional
        The image root: relative image paths are read inside it and may not leave it. A
        prepared dataset folder works too (its ``report.json`` names the images folder; see
        :func:`merlin_mllm.data.image_files.dataset_image_root`). A path outside the root is not
        read: the item is summarised from its text and counted in ``bad_images``.
    device : str, optional
        Default: CUDA when available, else CPU.
    progress : bool, default False
        A tqdm bar per partition.
    """

    def __init__(
        self,
        summaries: Optional[Union[str, os.PathLike]] = None,
        *,
        backend: str = "textualizer",
        model: Optional[Union[str, os.PathLike]] = None,
        mode: str = "image_and_text",
        settings: GenerationSettings = GenerationSettings(),
        budgets: TokenBudgets = TokenBudgets(),
        on_empty: str = "skip",
        title: str = "title",
        description: str = "description",
        image: str = "image_path",
        item_id: str = "item_id",
        output_column: str = "item_summary",
        image_root: Optional[Union[str, os.PathLike]] = None,
        device: Optional[str] = None,
        progress: bool = False,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if on_empty not in ON_EMPTY:
            raise ValueError(f"on_empty must be one of {ON_EMPTY}, not {on_empty!r}")
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise TypeError(
                "ItemSummary(model=...) takes a hub id or folder, not a loaded model: the operator "
                "is pickled with the workflow and each process loads the model itself"
            )
        if backend == "mllm" and model is None:
            raise ValueError("ItemSummary(backend='mllm') needs model=<image-text-to-text model id or folder>")
        self.summaries = os.fspath(summaries) if summaries is not None else None
        self.backend = backend
        self.model = os.fspath(model) if model is not None else None
        self.mode = mode
        if not isinstance(budgets, TokenBudgets):
            raise TypeError(f"budgets must be a TokenBudgets, not {type(budgets).__name__}")
        self.settings = settings
        self.budgets = budgets
        self.on_empty = on_empty
        self.title = title
        self.description = description
        self.image = image
        self.item_id = item_id
        self.output_column = output_column
        self.image_root = os.fspath(image_root) if image_root is not None else None
        self.device = device
        self.progress = progress
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._summarizer: Optional[ItemSummarizer] = None
        self._lock = threading.Lock()
        #: What this process's transforms did (each Dask worker keeps its own).
        self.report = SummaryReport()

    # Runtime state (loaded models, open store, counts) stays out of pickles: the operator is
    # saved with the workflow and shipped to Dask workers.
    def __getstate__(self):
        state = dict(self.__dict__)
        for name in ("_summarizer", "_lock", "report"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        # Workflows saved when the store attribute was named store_dir load too.
        self.__dict__.update({"summaries" if key == "store_dir" else key: value for key, value in state.items()})
        self.__dict__.setdefault("budgets", TokenBudgets())  # saved before budgets existed
        self._init_runtime()

    def summarizer(self) -> ItemSummarizer:
        """The process's summarizer (its models come from the module-level cache)."""
        with self._lock:
            if self._summarizer is None:
                self._summarizer = ItemSummarizer(
                    backend=self.backend, model=self.model, mode=self.mode, settings=self.settings,
                    on_empty=self.on_empty, store=self.summaries, device=self.device,
                    image_root=self.image_root, budgets=self.budgets, progress=self.progress,
                )
            return self._summarizer

    @annotate("ItemSummary_op", color="darkgreen", domain="nvt_python")
    def transform(self, col_selector: ColumnSelector, df: DataFrameType) -> DataFrameType:
        names = list(col_selector.names)
        host = df[names] if is_cpu_object(df) else df[names].to_pandas()
        texts, report = self.summarizer().summarize(
            host,
            title=self.title if self.title in names else None,
            description=self.description if self.description in names else None,
            image=self.image if self.image in names else None,
            item_id=self.item_id if self.item_id in names else None,
        )
        self.report.merge(report)
        _PROCESS_REPORT.merge(report)
        out = pd.DataFrame({self.output_column: pd.Series(texts, index=host.index, dtype=object)})
        return out if is_cpu_object(df) else from_host(out)

    transform.__doc__ = Operator.transform.__doc__

    # -- output schema: NVTabular's column_mapping + output_dtype / output_tags
    def column_mapping(self, col_selector):
        roles = {self.title, self.description, self.image}
        if not roles.intersection(col_selector.names):
            raise ValueError(
                f"ItemSummary needs at least one of the columns {sorted(roles)} in its input "
                f"selection, got {list(col_selector.names)}; set title=/description=/image= to "
                "the names your data uses"
            )
        return {self.output_column: list(col_selector.names)}

    output_dtype = md.string
    output_tags = [Tags.TEXT]

    def compute_column_schema(self, col_name, input_schema):
        # From the declarations above only (an empty input schema): the summary must not
        # inherit e.g. the item id's ITEM_ID tag or its categorical domain.
        return super().compute_column_schema(col_name, Schema())
