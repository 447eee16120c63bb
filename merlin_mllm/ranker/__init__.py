"""Stage 3 of MLLM-MSR: the SFT recommender that answers Yes/No and ranks candidates by P(yes).

* :mod:`merlin_mllm.ranker.prompt`: the prompt (user summary first, then the candidate's title and
  image, then the question), tokenized and split where the shared user prefix ends.
* :mod:`merlin_mllm.ranker.image_features`: item-keyed image feature grids for the embedded model.
* :mod:`merlin_mllm.ranker.model`: :class:`RankerModel` (LoRA, answer-only loss, shared-prefix
  scoring, save/load), a thin composition of:

  * :mod:`~merlin_mllm.ranker.ranker_config`: :class:`RankerConfig` and the saved folder's file names;
  * :mod:`~merlin_mllm.ranker.backend`: the interface to a model family, implemented by
    :mod:`~merlin_mllm.ranker.embedded_backend` (SmolLM2 + projected EfficientNet grids) and
    :mod:`~merlin_mllm.ranker.hf_backend` (Hugging Face MLLMs, mrope), chosen in
    :mod:`~merlin_mllm.ranker.backend_registry`;
  * :mod:`~merlin_mllm.ranker.lora`: LoRA attachment and the merged-weights cache for scoring;
  * :mod:`~merlin_mllm.ranker.scoring`: shared-prefix KV-cache scoring, packed scoring and the
    reference scorers;
  * :mod:`~merlin_mllm.ranker.packing` (one user's prefix and candidates in one row, a block
    attention mask), :mod:`~merlin_mllm.ranker.groups` (forward passes over such groups) and
    :mod:`~merlin_mllm.ranker.losses` (``lm``, ``binary``, ``listwise``): groupwise training;
  * :mod:`~merlin_mllm.ranker.batches`: right padding and the answer-only labels.
* :mod:`merlin_mllm.ranker.saved`: :func:`load_ranker` (a saved ranker with its item image table).
* :mod:`merlin_mllm.ranker.block`: the Merlin block (``RankerBlock``, ``RankerMerlinModel``).

Training and evaluation build on the ranker one layer up, in :mod:`merlin_mllm.pipelines`.

Names are imported lazily, so importing a light submodule (``merlin_mllm.ranker.prompt``) does not
load the model code.
"""
from __future__ import annotations

from merlin_mllm.lazy_exports import lazy_exports

#: Public names by the submodule that defines them.
_EXPORTS = dict(
    **dict.fromkeys(["IGNORE_INDEX", "answer_only_labels", "batch_from_ragged", "pad_right"], "batches"),
    **dict.fromkeys(["Candidate", "EncodedPrompt", "PROMPT_VERSION", "RankerPrompt", "embedded_tokenizer"], "prompt"),
    **dict.fromkeys(["RankerModel", "RankerOutput"], "model"),
    CandidateGroup="packing",
    GroupOutput="groups",
    **dict.fromkeys(["load_ranker", "item_image_table"], "saved"),
    RankerConfig="ranker_config",
    ImageProjector="embedded_backend",
    ItemImageFeatures="image_features",
)
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
