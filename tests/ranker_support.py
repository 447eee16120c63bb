"""Test helpers for the ranker: reference margins computed the slow, obvious way."""
from __future__ import annotations

import numpy as np
import torch


def own_prompt_margins(ranker, rows) -> np.ndarray:
    """logit(Yes) - logit(No) of each row (``user_summary``, ``title``) from its own full prompt,
    one unpacked forward per row (no packing, no shared prefix), text only."""
    from merlin_mllm.operators.tokenize_prompt import TokenizePrompt
    from merlin_mllm.ranker.batches import pad_right

    encoder = TokenizePrompt.for_ranker(ranker, max_length=512)
    margins = []
    for summary, title in zip(rows["user_summary"], rows["title"]):
        ids, mask = pad_right([encoder.encode_row(summary, title, False).input_ids], ranker.pad_token_id)
        with torch.no_grad():
            logits = ranker(ids, mask).logits[0].double()
        margins.append(float(logits[1] - logits[0]))
    return np.array(margins)
