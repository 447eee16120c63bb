"""Token budgets: one function cuts every LLM-bound text; the summary stages record their budgets
in the keys, count the cuts, and batch by prompt length (real SmolLM2 and tokenizer)."""
from __future__ import annotations

import time

import pandas as pd
import pytest

from merlin_mllm.generation import GenerationSettings, length_batches
from merlin_mllm.summaries.item import ItemSummarizer
from merlin_mllm.summaries.report import SummaryReport
from merlin_mllm.summaries.store import ITEM_REF_NAMESPACE, SummaryStore
from merlin_mllm.summaries.user_history import read_items
from merlin_mllm.summaries.user_prompts import build_prompt
from merlin_mllm.summaries.user_summarizer import UserSummarizer, UserSummaryConfig
from merlin_mllm.text import TokenBudgets, fits_by_bytes, truncate_tokens

from tests.test_item_summary import GenerateSpy
from tests.test_user_summary import MODEL_ID, write_dataset

TINY = GenerationSettings(max_new_tokens=4, batch_size=4)
#: A few megabytes of description with no natural break (and some multi-byte characters).
HUGE = ("Ceramic mug, dishwasher safe, 350 ml. Handgefertigt in Köln. " * 60_000)


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2.tokenizer


def n_tokens(tok, text):
    return len(tok.encode(text, add_special_tokens=False))


# ------------------------------------------------------------------------- the function
def test_text_within_budget_is_returned_unchanged(tok):
    cut = truncate_tokens("Toy Story (1995)", 64, tok)
    assert cut == ("Toy Story (1995)", False, n_tokens(tok, "Toy Story (1995)"))
    assert truncate_tokens(None, 5, tok) == ("", False, 0)
    assert truncate_tokens(float("nan"), 5, tok) == ("", False, 0)


@pytest.mark.parametrize("keep", ["start", "end"])
def test_long_text_keeps_its_start_or_end_within_the_budget(tok, keep):
    text = " ".join(f"word{i}" for i in range(2000))
    cut = truncate_tokens(text, 50, tok, keep=keep)
    assert cut.truncated and cut.tokens == n_tokens(tok, cut.text) <= 50
    assert cut.tokens >= 48
    if keep == "start":
        assert text.startswith(cut.text) and "word0 " in cut.text
    else:
        assert text.endswith(cut.text) and cut.text.endswith("word1999")


def test_a_cut_inside_a_multibyte_character_leaves_no_replacement_character(tok):
    text = "日本語のテキスト" * 500
    for keep in ("start", "end"):
        cut = truncate_tokens(text, 31, tok, keep=keep)
        assert cut.truncated and "\ufffd" not in cut.text and n_tokens(tok, cut.text) <= 31


def test_megabytes_cost_what_the_budget_costs(tok):
    # Tokenizing 3.6 MB whole takes seconds (a single 3 MB "word" far longer); the cut must not.
    for text in (HUGE, "x" * 3_000_000):
        start = time.perf_counter()
        cut = truncate_tokens(text, 256, tok)
        assert time.perf_counter() - start < 0.5
        assert cut.truncated and n_tokens(tok, cut.text) <= 256


def test_fits_by_bytes_never_lets_a_longer_text_through(tok):
    for text in ["abc", "日本語", "😀😀", "a b c d e", " .,;:!?"]:
        assert fits_by_bytes(text, 64) and n_tokens(tok, text) <= 64
    assert not fits_by_bytes("日" * 30, 64)  # 90 bytes


def test_budgets_are_validated():
    assert TokenBudgets().to_dict() == {"title": 64, "description": 256, "history_item": 256,
                                        "previous_summary": 256, "history": 2048}
    assert TokenBudgets.from_dict(None) == TokenBudgets()
    assert TokenBudgets.from_dict({"title": 8}).title == 8
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="TokenBudgets.description"):
            TokenBudgets(description=bad)
    with pytest.raises(TypeError, match="budgets must be a TokenBudgets"):
        ItemSummarizer(budgets={"title": 8})
    with pytest.raises(TypeError, match="budgets must be a TokenBudgets"):
        UserSummaryConfig(MODEL_ID, budgets={"title": 8})
    with pytest.raises(ValueError, match="max_tokens"):
        truncate_tokens("x", 0, None)


def test_length_batches_sort_cap_tokens_and_keep_input_order_when_asked():
    lengths = [30, 900, 10, 20, 880, 15]
    assert length_batches(lengths, batch_size=2) == [[2, 5], [3, 0], [4], [1]]
    assert length_batches(lengths, batch_size=3, sort=False) == [[0], [1], [2, 3], [4], [5]]
    assert length_batches(lengths, batch_size=8, max_batch_tokens=2000) == [[2, 5, 3, 0], [4, 1]]
    assert sorted(i for b in length_batches(lengths, 4) for i in b) == list(range(6))


# ------------------------------------------------------------------------- item stage
def test_a_megabyte_description_is_cut_counted_and_keeps_the_prompt_within_budget(smollm2, tok, tmp_path):
    budgets = TokenBudgets()
    frame = pd.DataFrame({
        "item_id": [1, 2, 3],
        "title": ["Mug", "Toy Story (1995)", "Huge title " * 300_000],
        "description": [HUGE, "Genres: Animation, Children's, Comedy. Released 1995.", HUGE],
        "image_path": [None, None, None],
    })
    spy = GenerateSpy(smollm2.model)
    try:
        texts, report = ItemSummarizer(model=smollm2, settings=TINY, store=tmp_path / "store",
                                       budgets=budgets).summarize(frame)
    finally:
        spy.close()
    assert all(texts) and report.generated == 3 and report.failed == 0
    assert report.truncated == 3  # two descriptions and one title
    assert "truncated 3" in str(report)
    # The prompt of a short item, minus its text, is the template: budgets bound the rest.
    lengths = sorted(len(p) for p in spy.prompts)
    template = lengths[0] - n_tokens(tok, "Toy Story (1995)") - n_tokens(tok, "Genres: Animation, Children's, Comedy. Released 1995.")
    assert lengths[-1] <= template + budgets.title + budgets.description + 4  # + the "Title:/Description:" joins
    assert lengths[-1] > template + budgets.description  # the budget was used, not an early character cut


def test_a_changed_budget_never_reuses_a_summary_of_differently_cut_text(smollm2, tmp_path):
    frame = pd.DataFrame({"item_id": [1], "title": ["Mug"], "description": [HUGE], "image_path": [None]})
    store = tmp_path / "store"
    _, first = ItemSummarizer(model=smollm2, settings=TINY, store=store).summarize(frame)
    _, again = ItemSummarizer(model=smollm2, settings=TINY, store=store).summarize(frame)
    _, smaller = ItemSummarizer(model=smollm2, settings=TINY, store=store,
                                budgets=TokenBudgets(description=32)).summarize(frame)
    assert (first.generated, again.reused_from_store, smaller.generated) == (1, 1, 1)
    assert (first.truncated, again.truncated, smaller.truncated) == (1, 1, 1)
    keys = [r.key for r in SummaryStore(store)]
    assert len(keys) == 2
    # A budget that changes no text still enters the key (a budget change never reuses).
    short = frame.assign(description="Short.")
    a = ItemSummarizer(model=smollm2, settings=TINY)
    b = ItemSummarizer(model=smollm2, settings=TINY, budgets=TokenBudgets(description=32))
    assert a._key(a._rows(short, "title", "description", "image_path", "item_id")[0]) != \
        b._key(b._rows(short, "title", "description", "image_path", "item_id")[0])


def test_items_are_batched_by_length_not_padded_to_a_long_one(smollm2):
    sizes = [80, 1, 1, 1, 80, 1, 1, 1]
    frame = pd.DataFrame({"item_id": range(8), "title": [f"Item {i}" for i in range(8)],
                          "description": [" ".join(["cotton"] * n) for n in sizes], "image_path": [None] * 8})
    padding, outputs = {}, {}
    for sort in (True, False):
        spy = GenerateSpy(smollm2.model)
        batches, inner = [], spy.inner

        def record(*args, **kwargs):
            batches.append(kwargs["attention_mask"].sum(1).tolist())
            return inner(*args, **kwargs)

        spy.inner = record
        try:
            settings = GenerationSettings(max_new_tokens=2, batch_size=2, sort_by_length=sort)
            outputs[sort], _ = ItemSummarizer(model=smollm2, settings=settings).summarize(frame)
        finally:
            spy.close()
        padding[sort] = sum(max(b) * len(b) - sum(b) for b in batches)
        if sort:  # the two long items share the last batch: no short item is padded to them
            assert [max(b) - min(b) for b in batches] == [0, 0, 0, 0] and min(batches[-1]) > max(batches[0]) + 70
    assert padding[True] == 0 < padding[False]
    assert len(outputs[True]) == len(outputs[False]) == 8 and all(outputs[True]) and all(outputs[False])


# ------------------------------------------------------------------------- user stage
def test_user_lines_previous_summary_and_history_block_are_cut_and_counted(tmp_path, tok):
    data = write_dataset(tmp_path / "data", lengths=(7,))
    store = SummaryStore(tmp_path / "store")
    items = read_items(data / "items")
    long_summary = "The item is a long film about many things. " * 200
    store.put("k1", long_summary)
    store.put_refs(ITEM_REF_NAMESPACE, {"1": "k1"})
    budgets = TokenBudgets(history_item=40, previous_summary=30, history=60)
    summarizer = UserSummarizer(store, items, UserSummaryConfig(MODEL_ID, 3, "recurrent", budgets=budgets), progress=False)
    line = summarizer.texts[1]
    assert n_tokens(tok, line) <= 40 and line.startswith("Toy Story (1995): The item is")
    assert summarizer.texts.truncated == 1

    report = SummaryReport()
    lines = [summarizer.texts[i] for i in (1, 2, 3)] + [line]
    messages = build_prompt(lines, long_summary, tok, budgets=budgets, report=report)
    assert report.truncated == 2  # the previous summary and the block
    content = messages[0]["content"]
    unbounded = build_prompt(lines, long_summary, tok)[0]["content"]
    assert n_tokens(tok, content) < n_tokens(tok, unbounded) - 300
    assert content.count("The item is a long film") < unbounded.count("The item is a long film")
    # The block keeps its end (the most recent item); nothing is cut under the default budgets.
    assert "4. Toy Story (1995): The item is" in content
    report = SummaryReport()
    assert build_prompt(lines[:3], "Likes films.", tok, budgets=TokenBudgets(), report=report) == \
        build_prompt(lines[:3], "Likes films.", tok)
    assert report.truncated == 0


def test_user_step_keys_and_scope_record_the_budgets(tmp_path):
    data = write_dataset(tmp_path / "data", lengths=(7,))
    store = SummaryStore(tmp_path / "store")
    items = read_items(data / "items")
    default = UserSummarizer(store, items, UserSummaryConfig(MODEL_ID, 3), progress=False)
    other = UserSummarizer(store, items, UserSummaryConfig(MODEL_ID, 3, budgets=TokenBudgets(history=999)), progress=False)
    history = (1, 2, 3, 4)
    assert default.plan(history)[-1].key != other.plan(history)[-1].key
    assert default.config.scope != other.config.scope
    # The item stage's description budget is not the user stage's business.
    same = UserSummarizer(store, items, UserSummaryConfig(MODEL_ID, 3, budgets=TokenBudgets(description=9)), progress=False)
    assert same.plan(history)[-1].key == default.plan(history)[-1].key
    assert UserSummaryConfig.from_dict(other.config.to_dict()) == other.config
