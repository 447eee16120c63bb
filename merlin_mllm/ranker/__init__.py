"""Stage 3 of MLLM-MSR: the SFT recommender that answers Yes/No and ranks candidates by P(yes).

* :mod:`merlin_mllm.ranker.prompt`: the prompt (user summary first, then the candidate's title and
  image, then the question), tokenized and split where the shared user prefix ends.
* :mod:`merlin_mllm.ranker.features`: item-keyed image feature grids for the embedded model.
* :mod:`merlin_mllm.ranker.model`: :class:`RankerModel` (LoRA, answer-only loss, shared-prefix
  scoring, save/load).
"""
__all__ = [
    "Candidate", "EncodedPrompt", "IGNORE_INDEX", "ImageProjector", "ItemImageFeatures", "PROMPT_VERSION",
    "RankerConfig", "RankerModel", "RankerOutput", "RankerPrompt", "answer_only_labels",
    "batch_from_ragged", "embedded_tokenizer", "pad_right",
]

from merlin_mllm.ranker.features import ItemImageFeatures  # noqa: F401,E402
from merlin_mllm.ranker.model import (  # noqa: F401,E402
    IGNORE_INDEX,
    ImageProjector,
    RankerConfig,
    RankerModel,
    RankerOutput,
    answer_only_labels,
    batch_from_ragged,
    pad_right,
)
from merlin_mllm.ranker.prompt import (  # noqa: F401,E402
    PROMPT_VERSION,
    Candidate,
    EncodedPrompt,
    RankerPrompt,
    embedded_tokenizer,
)
