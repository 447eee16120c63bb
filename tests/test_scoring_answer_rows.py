"""Scoring computes only what it needs: the language model without its lm_head, then the No and
Yes rows of lm_head at each candidate's answer position (issue 22).

Full-vocabulary logits over every position would cost a 576 x 49k matmul per token; the scorers
never make them. Each scoring path is run with hooks on the causal-LM wrapper (whose forward
computes logits) and on lm_head: neither may run. The scores must still be exactly the two-token
softmax of the full logits at the answer position, computed here from the same hidden states
through the whole lm_head in float64 (to fp32 rounding, :data:`ROUNDING`).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from merlin_mllm.ranker import RankerModel
from merlin_mllm.ranker.prompt import EncodedPrompt, shared_prefix_length

SUMMARY = "Likes gritty 1970s crime dramas and slow science fiction."
CANDIDATES = ["Heat (1995)", "The Lion King (1994)", "Alien (1979)"]
#: fp32 rounding of the two 576-term dot products: measured 1.3e-6 against the float64 reference
#: (and 3e-6 against the full fp32 lm_head, which sums in another order); 5e-6 bounds both, far
#: below what reading the wrong row or another token moves (> 1e-3, checked below).
ROUNDING = 5e-6


@pytest.fixture(scope="module")
def ranker():
    ranker = RankerModel.build("embedded", use_images=False, seed=3)
    with torch.no_grad():  # a non-zero adapter, so the merged-LoRA path is what is checked
        generator = torch.Generator().manual_seed(1)
        for name, parameter in ranker.backbone.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return ranker


class _Calls:
    """Counts lm_head and causal-LM forwards, and keeps the language model's hidden states."""

    def __init__(self, ranker):
        self.head = self.causal_lm = 0
        self.hidden = []
        self.handles = [
            ranker.hf_model.get_output_embeddings().register_forward_hook(self._on_head),
            ranker.hf_model.register_forward_pre_hook(self._on_causal_lm),
            ranker.backend.inner.register_forward_hook(self._on_inner),
        ]

    def _on_head(self, *_):
        self.head += 1

    def _on_causal_lm(self, *_):
        self.causal_lm += 1

    def _on_inner(self, module, args, output):
        self.hidden.append(output.last_hidden_state.detach())

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for handle in self.handles:
            handle.remove()


def test_scorers_never_compute_vocabulary_logits(ranker):
    prompts = [p.input_ids for p in ranker.encode([SUMMARY] * len(CANDIDATES), CANDIDATES)[0]]
    for name, run in [
        ("score", lambda: ranker.score(SUMMARY, CANDIDATES)),
        ("score_token_ids", lambda: ranker.score_token_ids(prompts)),
        ("score_users_token_ids", lambda: ranker.score_users_token_ids([(prompts, None), (prompts[:1], None)])),
        ("score_packed", lambda: ranker.score_packed(SUMMARY, CANDIDATES)),
    ]:
        with _Calls(ranker) as calls:
            scores = run()
        assert calls.head == 0 and calls.causal_lm == 0, (name, calls.head, calls.causal_lm)
        assert calls.hidden, name  # the language model itself did run


def test_scores_equal_the_two_token_softmax_of_the_full_logits(ranker):
    prompts = [p.input_ids for p in ranker.encode([SUMMARY] * len(CANDIDATES), CANDIDATES)[0]]
    with _Calls(ranker) as calls:
        scores = ranker.score_token_ids(prompts)
    # The prefix runs first (batch of 1), then the candidates' parts after its cache.
    prefix_len = shared_prefix_length([EncodedPrompt(p, 0, False) for p in prompts], ranker.image_token_id)
    candidates = calls.hidden[-1]
    last = torch.tensor([len(p) - prefix_len - 1 for p in prompts])
    rows = candidates[torch.arange(len(prompts)), last]
    head = ranker.hf_model.get_output_embeddings()
    with torch.no_grad():
        # The whole vocabulary's logits, in float64 so that the reference is exact.
        full = rows.double() @ head.weight.double().T  # (N, vocabulary)
    assert full.shape[1] == head.weight.shape[0] >= 49152
    pair = full[:, [ranker.no_token_id, ranker.yes_token_id]]
    expected = torch.softmax(pair, dim=-1)[:, 1].numpy()
    np.testing.assert_allclose(scores, expected, rtol=0, atol=ROUNDING)
    # And the answer position is the one that matters: the row before it gives other scores.
    before_rows = candidates[torch.arange(len(prompts)), last - 1].double()
    before = torch.softmax(before_rows @ head.weight.double()[[ranker.no_token_id, ranker.yes_token_id]].T,
                           dim=-1)[:, 1].numpy()
    assert np.abs(before - scores).max() > 1e-3
