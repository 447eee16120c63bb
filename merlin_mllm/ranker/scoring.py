"""The ranker's scorers: P(yes) per candidate, from forward passes (no ``generate()``).

* :func:`score`, :func:`score_token_ids`, :func:`score_users_token_ids`: shared-prefix scoring.
  All candidates of a user share the prompt's user part (system message + summary) as a token
  prefix; it runs once, and its KV cache is reused by every batch of candidates, so only the
  candidates' own tokens (title, image tokens, question) are computed.
* :func:`score_packed`, :func:`score_packed_token_ids`: one user's prefix and candidates packed
  into one row with a block attention mask (:mod:`merlin_mllm.ranker.packing`); families that
  cannot pack run the shared-prefix path instead (logged). Not the default: for 1 + 20
  candidates (``benchmarks/speed/training.json``) it was about as fast as the shared KV cache on
  text-only version 1 prompts (1.02x) and faster on version 2 (1.38x), but with 49 image tokens
  per candidate the packed row's quadratic attention made it slower (0.62x).
* :func:`score_independent`: the reference, one full forward per candidate with LoRA unmerged.
* :func:`score_generate`: the authors' way, ``generate()`` per candidate.

Each takes the :class:`~merlin_mllm.ranker.model.RankerModel` first; the model's methods of the
same names call them. The model family's differences (image inputs, position numbering) come
from ``ranker.backend``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from merlin_mllm.ranker.batches import chunks, pad_right
from merlin_mllm.ranker.groups import candidate_hidden, forward_groups, last_rows, make_group
from merlin_mllm.ranker.packing import CandidateGroup
from merlin_mllm.ranker.prompt import EncodedPrompt, shared_prefix_length

if TYPE_CHECKING:  # for annotations only: the model module imports this one
    from merlin_mllm.ranker.model import RankerModel

__all__ = ["score", "score_token_ids", "score_users_token_ids", "score_packed", "score_packed_token_ids",
           "score_independent", "score_generate"]

#: Per distinct prefix (its token ids): per layer (keys, values) of batch size 1.
PrefixCaches = Dict[Tuple[int, ...], Any]


@torch.inference_mode()
def score(ranker: "RankerModel", user_summary: str, candidates: Sequence[Any], *, batch_size: int = 32) -> np.ndarray:
    """P(yes) for each candidate of one user (see :meth:`RankerModel.score`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    candidates = list(candidates)
    scores = np.zeros(len(candidates), dtype=np.float64)
    prefix_caches: PrefixCaches = {}
    for start, chunk in chunks(candidates, batch_size):
        prompts, grids, image_inputs = ranker.encode([user_summary] * len(chunk), chunk)
        # The user part (system + summary) is the same for every batch of this user, so its
        # cache is computed once; the tokenizer-level split was made by RankerPrompt.
        prefix_len = min(shared_prefix_length(prompts, ranker.image_token_id), min(p.prefix_len for p in prompts))
        scores[start:start + len(chunk)] = _score_shared_prefix(
            ranker, prompts, prefix_len, grids, image_inputs, prefix_caches)
    return scores


@torch.inference_mode()
def score_token_ids(ranker: "RankerModel", prompt_ids: Sequence[Sequence[int]],
                    item_ids: Optional[Sequence[int]] = None, *, batch_size: int = 32) -> np.ndarray:
    """P(yes) for one user's candidates given as token ids (see :meth:`RankerModel.score_token_ids`)."""
    prompts = [EncodedPrompt(list(map(int, ids)), 0, False) for ids in prompt_ids]
    if item_ids is not None and len(item_ids) != len(prompts):
        raise ValueError(f"{len(item_ids)} item ids for {len(prompts)} prompts")
    scores = np.zeros(len(prompts), dtype=np.float64)
    if not prompts:
        return scores
    # Found once over all candidates, so every batch reuses the same prefix cache.
    prefix_len = shared_prefix_length(prompts, ranker.image_token_id)
    caches: PrefixCaches = {}
    for start, chunk in chunks(prompts, batch_size):
        chunk_items = None if item_ids is None else list(item_ids[start:start + len(chunk)])
        scores[start:start + len(chunk)] = _score_shared_prefix(
            ranker, chunk, prefix_len, None, {}, caches, item_ids=chunk_items)
    return scores


@torch.inference_mode()
def score_users_token_ids(ranker: "RankerModel",
                          users: Sequence[Tuple[Sequence[Sequence[int]], Optional[Sequence[int]]]],
                          *, batch_size: int = 32) -> List[np.ndarray]:
    """P(yes) for several users' candidates at once (see :meth:`RankerModel.score_users_token_ids`).

    Only in float32: in bf16 a row's score depends on the shapes it is batched with (padding to
    the longest prefix and candidate of the pass changes kernel blocking, and bf16 rounding
    differences grow through the layers). Measured on the embedded SmolLM2 with LoRA: 2 users x 4
    candidates together differed from per-user scoring by 8.7e-3 in bf16 and 1.4e-6 in fp32. So
    a bf16 ranker scores user by user, and a served user's score does not depend on who else
    shared its dynamic batch (it equals ``score_token_ids``, as ``evaluate_ranker`` scores)."""
    if len(users) <= 1 or not ranker.backend.scores_users_together or ranker.dtype != torch.float32:
        return [score_token_ids(ranker, p, None if i is None else list(i), batch_size=batch_size) for p, i in users]
    caches: PrefixCaches = {}
    prefixes = []  # per user: (prefix length, per-layer (keys, values) or None)
    rows = []  # (user index, prompt ids, item id or None)
    for user, (prompt_ids, item_ids) in enumerate(users):
        encoded = [EncodedPrompt([int(t) for t in p], 0, False) for p in prompt_ids]
        if item_ids is not None and len(item_ids) != len(encoded):
            raise ValueError(f"user {user}: {len(item_ids)} item ids for {len(encoded)} prompts")
        length = shared_prefix_length(encoded, ranker.image_token_id) if encoded else 0
        with ranker.merged_lora():
            layers = _prefix_cache(ranker, encoded[0].input_ids[:length], caches) if length > 0 else None
        prefixes.append((length, layers))
        items = [None] * len(encoded) if item_ids is None else [int(i) for i in item_ids]
        rows.extend((user, p.input_ids, item) for p, item in zip(encoded, items))
    scores = np.zeros(len(rows), dtype=np.float64)
    for start, chunk in chunks(rows, batch_size):
        with ranker.merged_lora():
            scores[start:start + len(chunk)] = _score_rows_of_users(ranker, chunk, prefixes)
    out, offset = [], 0
    for prompt_ids, _ in users:
        out.append(scores[offset:offset + len(prompt_ids)])
        offset += len(prompt_ids)
    return out


@torch.inference_mode()
def score_packed(ranker: "RankerModel", user_summary: str, candidates: Sequence[Any], *,
                 batch_size: int = 32) -> np.ndarray:
    """P(yes) for each candidate of one user from packed rows (see :meth:`RankerModel.score_packed`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    candidates = list(candidates)
    if not candidates:
        return np.zeros(0, dtype=np.float64)
    groups = [make_group(ranker, user_summary, chunk) for _, chunk in chunks(candidates, batch_size)]
    return forward_groups(ranker, groups, path="packed").probs.double().cpu().numpy()


@torch.inference_mode()
def score_packed_token_ids(ranker: "RankerModel", prompt_ids: Sequence[Sequence[int]],
                           item_ids: Optional[Sequence[int]] = None, *, batch_size: int = 32) -> np.ndarray:
    """:func:`score_packed` from one user's full prompt token ids (as :func:`score_token_ids` takes them)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    prompts = [EncodedPrompt(list(map(int, ids)), 0, False) for ids in prompt_ids]
    if item_ids is not None and len(item_ids) != len(prompts):
        raise ValueError(f"{len(item_ids)} item ids for {len(prompts)} prompts")
    if not prompts:
        return np.zeros(0, dtype=np.float64)
    groups = [
        CandidateGroup.from_prompts(chunk, ranker.image_token_id,
                                    item_ids=None if item_ids is None else list(item_ids[start:start + len(chunk)]))
        for start, chunk in chunks(prompts, batch_size)
    ]
    return forward_groups(ranker, groups, path="packed").probs.double().cpu().numpy()


@torch.inference_mode()
def score_independent(ranker: "RankerModel", user_summary: str, candidates: Sequence[Any]) -> np.ndarray:
    """Reference scores: one full forward per candidate (no cache, no padding, batch of 1),
    with LoRA computed unmerged, as in training."""
    scores = []
    with ranker.lora_merge.suspend():
        for candidate in candidates:
            batch = ranker.make_batch([user_summary], [candidate])
            scores.append(float(ranker(**batch).probs[0]))
    return np.asarray(scores, dtype=np.float64)


@torch.inference_mode()
def score_generate(ranker: "RankerModel", user_summary: str, candidates: Sequence[Any], *,
                   max_new_tokens: int = 30) -> Tuple[np.ndarray, int]:
    """The authors' way: ``generate()`` per candidate, P(yes) from the first step's logits.

    Returns
    -------
    (scores, new_tokens) : (np.ndarray, int)
        P(yes) per candidate and the total number of generated tokens.
    """
    scores, new_tokens = [], 0
    for candidate in candidates:
        batch = ranker.make_batch([user_summary], [candidate])
        kwargs = dict(attention_mask=batch["attention_mask"].to(ranker.device), max_new_tokens=max_new_tokens,
                      do_sample=False, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=ranker.pad_token_id)
        kwargs.update(ranker.backend.generate_inputs(batch))
        # Same weights path as score() (merged LoRA when enabled), so timings compare methods.
        with ranker.merged_lora():
            out = ranker.hf_model.generate(**kwargs)
        first = out.logits[0][0].float()[ranker.answer_token_ids]
        scores.append(float(torch.softmax(first, dim=-1)[1]))
        new_tokens += len(out.logits)
    return np.asarray(scores, dtype=np.float64), new_tokens


def _prefix_cache(ranker: "RankerModel", prefix_ids: List[int], caches: PrefixCaches):
    """Per-layer (keys, values) of the shared prefix, computed once per distinct prefix."""
    key = tuple(prefix_ids)
    if key not in caches:
        ids = torch.tensor([prefix_ids], dtype=torch.long, device=ranker.device)
        mask = torch.ones_like(ids)
        position_ids = ranker.backend.prefix_position_ids(len(prefix_ids))
        _, cache = ranker.backend.hidden_states(ids, mask, position_ids=position_ids, use_cache=True)
        caches[key] = [(layer.keys, layer.values) for layer in cache.layers]
    return caches[key]


def _answer_probs(ranker: "RankerModel", hidden: torch.Tensor, cand_mask: torch.Tensor) -> np.ndarray:
    """P(yes) from the hidden states at each row's last candidate token.

    Only what is needed is computed: the language model runs without its lm_head, and only the
    No and Yes rows of lm_head are applied, to the answer position only (not a vocabulary of
    logits per position; ``tests/test_scoring_answer_rows.py`` keeps it so)."""
    logits = ranker.backend.answer_pair_logits(last_rows(hidden, cand_mask), ranker.answer_token_ids)
    # In float64: P(yes) keeps the yes-minus-no logit recoverable (a hybrid adds it to its head's).
    return torch.softmax(logits.double(), dim=-1)[:, 1].cpu().numpy()


def _score_shared_prefix(ranker: "RankerModel", prompts: List[EncodedPrompt], prefix_len: int, grids,
                         image_inputs, caches: PrefixCaches, item_ids=None) -> np.ndarray:
    """P(yes) for prompts sharing their first ``prefix_len`` tokens (one batch)."""
    # Lazy: transformers loads with the model, not with ``import merlin_mllm.ranker``.
    from transformers import DynamicCache

    with ranker.merged_lora():
        past = None
        if prefix_len > 0:
            layers = _prefix_cache(ranker, prompts[0].input_ids[:prefix_len], caches)
            # A fresh cache per batch: forwarding appends the candidates' keys/values to it in
            # place, and batch_repeat_interleave replaces its tensors; the stored prefix
            # tensors themselves are never modified.
            past = DynamicCache(ddp_cache_data=layers, config=ranker.hf_model.config)
            past.batch_repeat_interleave(len(prompts))
        hidden, cand_mask = candidate_hidden(ranker, prompts, prefix_len, past, grids=grids,
                                             image_inputs=image_inputs, item_ids=item_ids)
        return _answer_probs(ranker, hidden, cand_mask)


def _score_rows_of_users(ranker: "RankerModel", chunk, prefixes) -> np.ndarray:
    """One forward pass over candidate rows of different users (see :func:`score_users_token_ids`)."""
    # Lazy: transformers loads with the model, not with ``import merlin_mllm.ranker``.
    from transformers import DynamicCache

    device = ranker.device
    lengths = [prefixes[user][0] for user, _, _ in chunk]
    longest = max(lengths)
    cand_ids, cand_mask = pad_right([ids[length:] for (_, ids, _), length in zip(chunk, lengths)],
                                    ranker.pad_token_id, device)
    past = None
    if longest > 0:
        # Per layer: each user's prefix keys/values right-padded to `longest` once, stacked,
        # then gathered per row (a few large copies instead of one per row and layer).
        users = sorted({user for user, _, _ in chunk})
        slot = {user: index for index, user in enumerate(users)}
        rows_of = torch.tensor([slot[user] for user, _, _ in chunk], device=device)
        template = next(prefixes[user][1] for user in users if prefixes[user][1] is not None)
        layers = []
        for layer, (keys, values) in enumerate(template):
            stacked = []
            for tensor_index, like in ((0, keys), (1, values)):
                per_user = like.new_zeros((len(users), like.shape[1], longest, like.shape[3]))
                for index, user in enumerate(users):
                    length, cached = prefixes[user]
                    if cached is not None:
                        per_user[index, :, :length] = cached[layer][tensor_index][0]
                stacked.append(per_user.index_select(0, rows_of))
            layers.append(tuple(stacked))
        past = DynamicCache(ddp_cache_data=layers, config=ranker.hf_model.config)
    prefix_len = torch.tensor(lengths, device=device)
    prefix_mask = (torch.arange(longest, device=device)[None, :] < prefix_len[:, None]).long()
    full_mask = torch.cat([prefix_mask, cand_mask], dim=1)
    # Each row continues from its own prefix length, not from the padded one.
    position_ids = prefix_len[:, None] + torch.arange(cand_ids.shape[1], device=device)[None, :]
    items = [item for _, _, item in chunk]
    item_ids = None if any(item is None for item in items) else torch.tensor(items, dtype=torch.long)
    hidden, _ = ranker.backend.hidden_states(cand_ids, full_mask, item_ids=item_ids, past_key_values=past,
                                             position_ids=position_ids, use_cache=past is not None)
    return _answer_probs(ranker, hidden, cand_mask)
