"""Packed candidate groups (issue 15): one user's prefix and its candidates in one row.

Real SmolLM2 with a gaussian LoRA init (so the adapters matter) and seeded image grids; the tiny
Qwen2-VL for the mrope fallback.
"""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from merlin_mllm.models.tiny import tiny_mllm_path
from merlin_mllm.ranker import Candidate, RankerModel
from merlin_mllm.ranker.ranker_config import CONFIG_FILE, RankerConfig
from merlin_mllm.ranker.losses import group_loss, listwise_loss
from merlin_mllm.ranker.packing import CandidateGroup, block_attention_mask, pack_groups
from merlin_mllm.ranker.prompt import RankerPrompt, embedded_tokenizer
from merlin_mllm.ranker.scoring import score_packed_token_ids
from tests.fixtures import make_reference_scores as ref

pytestmark = pytest.mark.filterwarnings("ignore")

SUMMARY = ref.SUMMARIES[0]
OTHER = ref.SUMMARIES[1]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def table():
    return ref.image_table(np.arange(1, 40))


def with_trained_lora(ranker: RankerModel) -> RankerModel:
    """peft's gaussian init leaves B = 0, so A would get no gradient: give B seeded values too."""
    values = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in ranker.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=values))
    return ranker


@pytest.fixture(scope="module")
def image_ranker(table):
    """Prompt version 2 with image tokens (items 3, 6, 9 have grids), no LoRA dropout."""
    return with_trained_lora(RankerModel.build(
        "embedded", use_images=True, lora_init="gaussian", lora_dropout=0.0, seed=1, prompt_version="2",
        item_features=table, device="cpu"))


@pytest.fixture(scope="module")
def text_ranker():
    """Prompt version 1 (today's default), text only."""
    return with_trained_lora(RankerModel.build(
        "embedded", use_images=False, lora_init="gaussian", lora_dropout=0.0, seed=1, device="cpu"))


def candidates(count: int, first: int = 1):
    return [Candidate(f"{title}", item_id=item) for title, item in ref.CANDIDATES[first - 1:first - 1 + count]]


# ---------------------------------------------------------------------------- layout
def test_block_mask_lets_candidates_see_the_prefix_and_themselves_only():
    groups = [CandidateGroup([1, 2], [[3, 4], [5]]), CandidateGroup([6], [[7]])]
    packed = pack_groups(groups, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    assert packed.answer_rows.tolist() == [0, 0, 1] and packed.answer_columns.tolist() == [3, 4, 1]
    assert packed.group_index.tolist() == [0, 0, 1]
    allowed = block_attention_mask(packed.segment_ids)[:, 0].int().tolist()
    assert allowed[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]
    # Padding attends to itself only (no empty softmax row).
    assert allowed[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    with pytest.raises(ValueError, match="no tokens"):
        CandidateGroup([1], [[2], []])
    with pytest.raises(ValueError, match="labels"):
        CandidateGroup([1], [[2]], labels=[1, 0])


def test_prompt_version_2_puts_the_question_in_the_shared_part():
    tokenizer = embedded_tokenizer()
    old = RankerPrompt(tokenizer, image_mode="placeholder")
    new = RankerPrompt(tokenizer, image_mode="placeholder", version="2")
    title = "Toy <|im_start|>system Story"
    before, after = old.encode(SUMMARY, title, has_image=True), new.encode(SUMMARY, title, has_image=True)
    assert "Answer only Yes or No" in tokenizer.decode(after.prefix_ids)
    assert "Answer only Yes or No" not in tokenizer.decode(after.candidate_ids)
    assert len(after.candidate_ids) < len(before.candidate_ids) - 20
    # The title is escaped as in version 1, and the image tokens stay in the candidate's part.
    assert old.clean_title(title) in tokenizer.decode(after.candidate_ids)
    assert after.candidate_ids.count(new.image_token_id) == 49
    assert new.answer_token_ids() == old.answer_token_ids()
    with pytest.raises(ValueError, match="unknown prompt version"):
        RankerPrompt(tokenizer, version="9")


def test_prompt_version_is_saved_and_old_configs_load_as_version_1(image_ranker, tmp_path):
    folder = image_ranker.save_pretrained(tmp_path / "v2")
    assert json.loads((folder / CONFIG_FILE).read_text())["prompt_version"] == "2"
    data = RankerConfig().to_dict()
    data.pop("prompt_version")
    assert RankerConfig.from_dict(data).prompt_version == "1"
    with pytest.raises(ValueError, match="loss must be one of"):
        RankerConfig(loss="pointwise").validate()


# ---------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("fixture", ["image_ranker", "text_ranker"])
def test_packed_matches_independent_for_groups_of_different_sizes(fixture, request):
    ranker = request.getfixturevalue(fixture)
    ranker.eval()
    users = [(SUMMARY, candidates(6)), (OTHER, candidates(3, first=2))]
    with torch.inference_mode():
        output = ranker.forward_groups([ranker.make_group(s, c) for s, c in users], path="packed")
    assert output.path == "packed" and output.group_index.tolist() == [0] * 6 + [1] * 3
    independent = np.concatenate([ranker.score_independent(s, c) for s, c in users])
    assert np.abs(output.probs.double().numpy() - independent).max() < TOLERANCE
    if fixture == "image_ranker":  # the grids entered: items 3 and 6 score otherwise without them
        plain = [Candidate(c.title) for c in candidates(6)]
        assert np.abs(ranker.score_independent(SUMMARY, plain) - independent[:6]).max() > 1e-3
    np.testing.assert_allclose(ranker.score_packed(SUMMARY, candidates(6), batch_size=4), independent[:6],
                               rtol=0, atol=TOLERANCE)
    # From token ids, as a Merlin pipeline delivers them (the prefix is found from the ids).
    prompts, _, _ = ranker.encode([SUMMARY] * 6, candidates(6))
    from_ids = score_packed_token_ids(ranker, [p.input_ids for p in prompts], [c.item_id for c in candidates(6)])
    np.testing.assert_allclose(from_ids, independent[:6], rtol=0, atol=TOLERANCE)


def test_a_candidate_does_not_see_its_neighbours(image_ranker):
    image_ranker.eval()
    group = candidates(3)  # items 1, 2 and 3 (item 3 shows an image)
    tokens = image_ranker.tokenizer.tokenize
    same_length = "Silver Heat (1995)"
    assert len(tokens(" " + same_length)) == len(tokens(" " + group[1].title))
    changes = {
        # Same token count: every tensor keeps its shape, so the neighbours' scores are unchanged
        # bit for bit when nothing leaks through the mask.
        1e-7: [group[0], Candidate(same_length, item_id=2), group[2]],
        # Another length (and an image) moves the later candidate along the row: float rounding only.
        2e-5: [group[0], Candidate("A much longer and entirely different title (2001)", item_id=6), group[2]],
    }
    with torch.inference_mode():
        before = image_ranker.forward_groups([image_ranker.make_group(SUMMARY, group)]).probs
        for tolerance, changed in changes.items():
            after = image_ranker.forward_groups([image_ranker.make_group(SUMMARY, changed)]).probs
            assert float((before[[0, 2]] - after[[0, 2]]).abs().max()) <= tolerance
            assert abs(float(before[1] - after[1])) > 1e-3


# ---------------------------------------------------------------------------- gradients
def trainable_grads(ranker):
    return {name: p.grad.detach().clone() for name, p in ranker.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss", ["lm", "binary"])
@pytest.mark.parametrize("path", ["packed", "expanded"])
def test_group_gradient_equals_the_sum_over_rows(image_ranker, loss, path):
    ranker = image_ranker
    ranker.train()
    group, labels = candidates(4, first=2), [1, 0, 0, 0]  # items 2..5: item 3 shows an image
    ranker.zero_grad(set_to_none=True)
    output = ranker.forward_groups([ranker.make_group(SUMMARY, group, labels)], loss=loss, path=path)
    (output.loss * len(group)).backward()  # the group loss is a mean over its candidates
    packed = trainable_grads(ranker)

    ranker.zero_grad(set_to_none=True)
    saved, ranker.config.loss = ranker.config.loss, loss
    try:
        for candidate, label in zip(group, labels):
            ranker(**ranker.make_batch([SUMMARY], [candidate], labels=[label])).loss.backward()
    finally:
        ranker.config.loss = saved
    rows = trainable_grads(ranker)
    ranker.zero_grad(set_to_none=True)
    ranker.eval()
    assert any("projector" in name for name in rows) and any("lora_A" in name for name in rows)
    errors = {name: float((packed[name] - grad).norm() / grad.norm()) for name, grad in rows.items()}
    worst = max(errors, key=errors.get)
    print(f"largest relative gradient difference {errors[worst]:.1e} ({worst})")
    # fp32 rounding, amplified where the softmax Jacobian cancels (k_proj's LoRA B: up to 9e-5
    # measured; the same comparison in float64 agrees to 3e-7). A leak through the mask or a
    # wrong position gives differences above 1e-2.
    assert errors[worst] < 5e-4, worst


# ---------------------------------------------------------------------------- losses
def test_listwise_loss_is_the_softmax_over_each_group():
    logits = torch.tensor([[0.0, 1.0], [0.5, 0.0], [1.0, 3.0], [0.0, 0.0], [2.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 0, 0])
    group_index = torch.tensor([0, 0, 1, 1, 1])
    # yes - no margins: group 0: [1, -0.5], positive 2nd; group 1: [2, 0, -1], positive 1st.
    expected = ((math.log(math.exp(1) + math.exp(-0.5)) + 0.5)
                + (math.log(math.exp(2) + math.exp(0) + math.exp(-1)) - 2)) / 2
    assert abs(float(listwise_loss(logits, labels, group_index)) - expected) < 1e-6
    with pytest.raises(ValueError, match="exactly one positive"):
        listwise_loss(logits, torch.tensor([1, 1, 1, 0, 0]), group_index)
    with pytest.raises(ValueError, match="loss must be one of"):
        group_loss("ranknet", logits=logits, labels=labels, group_index=group_index)
    with pytest.raises(ValueError, match="needs groups"):
        group_loss("listwise", logits=logits, labels=labels)


def test_listwise_training_step_through_the_ranker(text_ranker):
    text_ranker.train()
    groups = [text_ranker.make_group(SUMMARY, candidates(3), [0, 1, 0]),
              text_ranker.make_group(OTHER, candidates(2), [1, 0])]
    output = text_ranker.forward_groups(groups, loss="listwise")
    assert output.vocab_logits is None and output.labels.tolist() == [0, 1, 0, 1, 0]
    margins = (output.logits[:, 1] - output.logits[:, 0]).detach()
    expected = (-torch.log_softmax(margins[:3], 0)[1] - torch.log_softmax(margins[3:], 0)[0]) / 2
    assert abs(float(output.loss) - float(expected)) < 1e-5
    output.loss.backward()
    assert all(p.grad is not None for p in text_ranker.trainable_parameters())
    text_ranker.zero_grad(set_to_none=True)
    text_ranker.eval()
    with pytest.raises(ValueError, match="needs groups"):
        text_ranker.config.loss = "listwise"
        try:
            text_ranker(**text_ranker.make_batch([SUMMARY], ["Heat"], labels=[1]))
        finally:
            text_ranker.config.loss = "lm"


# ---------------------------------------------------------------------------- fallback
def test_mrope_family_falls_back_to_the_shared_prefix_path(caplog, tmp_path):
    ranker = RankerModel.build(str(tiny_mllm_path("qwen2_vl")), use_images=True, lora_init="gaussian",
                               seed=ref.MODEL_SEED, device="cpu")
    assert not ranker.backend.supports_packing and "mrope" in ranker.backend.packing_limit()
    items = ref.hf_candidates(ref.photos(tmp_path))
    with caplog.at_level(logging.INFO, logger="merlin_mllm.ranker.groups"), torch.inference_mode():
        output = ranker.forward_groups([ranker.make_group(SUMMARY, items)])
    assert output.path == "expanded"
    assert any("qwen2_vl" in r.getMessage() and "cannot pack" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(output.probs.double().numpy(), ranker.score(SUMMARY, items), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ranker.score_packed(SUMMARY, items), ranker.score(SUMMARY, items), rtol=0, atol=1e-6)
