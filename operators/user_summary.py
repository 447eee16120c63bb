"""The ``UserPreferenceSummary`` NVTabular operator: a recurrent user summary per row."""
from __future__ import annotations

import os
from typing import Optional, Union

import pandas as pd

import merlin.dtypes as md
from merlin.core.dispatch import DataFrameType, annotate, to_arrow
from merlin.dag import DataFormats
from merlin.schema import Schema, Tags
from nvtabular.ops.operator import ColumnSelector, Operator

from merlin_mllm.generation import GenerationSettings
from merlin_mllm.models.loading import LoadedModel, model_id_of, shared_model
from merlin_mllm.summaries.report import SummaryReport
from merlin_mllm.summaries.store import open_store
from merlin_mllm.summaries.user_history import read_items
from merlin_mllm.summaries.user_store import stored_summary_texts
from merlin_mllm.summaries.user_summarizer import DEFAULT_BLOCK_SIZE, UserSummarizer, UserSummaryConfig
from merlin_mllm.text import TokenBudgets

__all__ = ["UserPreferenceSummary", "process_report"]

#: Counts of every UserPreferenceSummary transform run in this process (one per Dask worker);
#: collect them with ``client.run(lambda: process_report().to_dict())``.
_PROCESS_REPORT = SummaryReport()


def process_report() -> SummaryReport:
    """The summed report of this process's ``UserPreferenceSummary`` transforms."""
    return _PROCESS_REPORT


class UserPreferenceSummary(Operator):
    """Writes a text column ``user_summary``: the user's preferences, summarised by an LLM from
    the items of the row's history (MLLM-MSR stage 2).

    The history is cut into blocks of ``block_size`` items; each block updates the summary of
    the blocks before it ("recurrent" mode), or the whole history goes into one prompt
    ("direct"). Every step is cached in a :class:`~merlin_mllm.summaries.store.SummaryStore`,
    keyed by its content, so rows sharing a history prefix share steps, a row whose history grew
    by a block costs one step, and a second transform generates nothing. A row with an empty
    history gets a fixed generic summary without an LLM call.

    This requires a list column of item ids in time order, holding only the items strictly
    before the row's target (``history_item_ids``; ``merlin_mllm.summaries.user_history.add_history_item_ids``
    builds it from the ``events`` table), plus an items table with ``item_id``, ``title`` and
    ``description``. Item summaries published in the store by the item stage are used when
    present, else title + description. Works on pandas and cudf partitions, in one process or on
    a Dask cluster: each worker process loads the model once and writes its own store segment.
    The model is never pickled with the operator (it is looked up by id in each process).

    The output column (``output_column``) has the Merlin ``string`` dtype and the ``TEXT`` tag,
    and nothing inherited from the inputs.

    Example usage (after ``merlin-mllm data prepare --dataset ml-100k --out data/ml100k``)::

        import nvtabular as nvt
        from merlin_mllm.operators import UserPreferenceSummary

        user_summaries = ["user_id", "history_item_ids"] >> UserPreferenceSummary(
            items="data/ml100k/items", summaries="data/summaries", block_size=3)
        workflow = nvt.Workflow(user_summaries + ["item_id", "label"])
        workflow.fit_transform(nvt.Dataset("data/ml100k/test")).to_parquet("out")

    Parameters
    ----------
    items : str, path or DataFrame
        The items table (a parquet file or folder, read once per process).
    summaries : str or path
        The summary store folder, shared with the item stage and across runs.
    model : str or LoadedModel, optional
        An LLM id or local folder; default the embedded SmolLM2-135M-Instruct. A LoadedModel is
        used as is in this process and reloaded by its ``model_id`` in other processes.
    block_size : int, default 3
        Items per recurrent step (the paper's k).
    mode : {"recurrent", "direct"}, default "recurrent"
        ``direct`` puts the whole history into one prompt (the MLLM-MSR_R ablation).
    settings : GenerationSettings, optional
        Greedy decoding by default (deterministic summaries).
    budgets : TokenBudgets, optional
        Token budgets of the prompt's texts (history lines, previous summary, history block),
        recorded in every step's key; cuts are counted in the report's ``truncated``.
    history_column : str, default "history_item_ids"
        The list column among the selected columns; the others (e.g. ``user_id``) only name
        rows in error messages.
    on_unknown_item : {"error", "skip"}, default "error"
        A history item in neither the items table nor the store: raise, or drop it (counted).
    output_column : str, default "user_summary"
        The name of the summary column (Merlin ``string``, tagged ``TEXT``).
    progress : bool, default False
        A tqdm bar per partition.
    """

    def __init__(
        self,
        items: Union[str, os.PathLike, pd.DataFrame],
        summaries: Union[str, os.PathLike],
        *,
        model=None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        mode: str = "recurrent",
        settings: Optional[GenerationSettings] = None,
        budgets: Optional[TokenBudgets] = None,
        history_column: str = "history_item_ids",
        on_unknown_item: str = "error",
        output_column: str = "user_summary",
        progress: bool = False,
    ):
        super().__init__()
        self.items = items if isinstance(items, pd.DataFrame) else os.path.abspath(os.fspath(items))
        self.summaries = os.path.abspath(os.fspath(summaries))
        self.config = UserSummaryConfig(model_id_of(model), int(block_size), mode, settings or GenerationSettings(),
                                        budgets or TokenBudgets())
        if isinstance(model, LoadedModel):
            shared_model(model)  # register it in this process's cache; other processes load by id
        self.history_column = history_column
        self.on_unknown_item = on_unknown_item
        self.output_column = output_column
        self.progress = progress
        self.report = SummaryReport()

    def __getstate__(self):
        # Only ids and paths travel to workers and into saved workflows; each process loads the
        # model itself (shared_model caches it per process). The report stays with its process.
        state = dict(self.__dict__)
        state["report"] = SummaryReport()
        return state

    def __setstate__(self, state):
        # Workflows saved before output_col/history_col/store were renamed load too.
        renamed = {"output_col": "output_column", "history_col": "history_column", "store": "summaries"}
        self.__dict__.update({renamed.get(key, key): value for key, value in state.items()})

    @annotate("UserPreferenceSummary_op", color="darkgreen", domain="nvt_python")
    def transform(self, col_selector: ColumnSelector, df: DataFrameType) -> DataFrameType:
        if self.history_column not in col_selector.names:
            raise ValueError(
                f"UserPreferenceSummary needs the list column {self.history_column!r}; selected: {col_selector.names}"
            )
        # Arrow is the common host format of pandas and cudf columns, list columns included.
        table = to_arrow(df[col_selector.names])
        histories = [h or [] for h in table.column(self.history_column).to_pylist()]
        others = [c for c in col_selector.names if c != self.history_column]
        names = table.column(others[0]).to_pylist() if others else list(range(len(histories)))
        label = others[0] if others else "row"
        labels = [f"{label} {n}" for n in names]

        store = open_store(self.summaries)
        summarizer = UserSummarizer(store, read_items(self.items), self.config,
                                    progress=self.progress, on_unknown_item=self.on_unknown_item)
        report = SummaryReport(rows=len(histories), empty_histories=sum(1 for h in histories if not h))
        keys = summarizer.summarize(histories, report, labels)
        texts = stored_summary_texts(store, keys)
        self.report.merge(report)
        _PROCESS_REPORT.merge(report)
        return type(df)({self.output_column: texts}, index=df.index)

    transform.__doc__ = Operator.transform.__doc__

    # -- output schema: NVTabular's column_mapping + output_dtype / output_tags
    def column_mapping(self, col_selector):
        return {self.output_column: list(col_selector.names)}

    output_dtype = md.string
    output_tags = [Tags.TEXT]

    def compute_column_schema(self, col_name, input_schema):
        # From the declarations above only (an empty input schema): the history's list shape,
        # the user id's domain and tags would all be wrong here. One string per row.
        return super().compute_column_schema(col_name, Schema()).with_shape((None,))

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.PANDAS_DATAFRAME | DataFormats.CUDF_DATAFRAME
