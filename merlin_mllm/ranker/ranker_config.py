"""The ranker's settings (:class:`RankerConfig`) and the layout of a saved ranker folder.

A saved ranker is one folder; the base weights are not copied (the config names the base
model)::

    ranker_config.json         RankerConfig.to_dict()            (CONFIG_FILE)
    adapter/                   peft save_pretrained: LoRA weights  (ADAPTER_DIR; not zero-shot)
    projector.safetensors      the image projector                 (PROJECTOR_FILE; embedded with images)
    item_images.safetensors    the item image table, next to it    (ITEM_IMAGES_FILE; training and serving)
    hybrid_head.safetensors    the hybrid's tabular head           (HEAD_FILE; a hybrid: merlin_mllm.ranker.hybrid_head)
    collab_projector.safetensors  the collaborative tokens' projector  (COLLAB_PROJECTOR_FILE; collab_tokens)
    collab_embeddings.safetensors the item embedding table, next to it (COLLAB_EMBEDDINGS_FILE; collab_tokens)

These names are defined here only; training, evaluation and serving import them.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from merlin_mllm.choices import CANDIDATE_TEXTS, USER_CONTEXTS
from merlin_mllm.models.precision import DEFAULT_PRECISION, check_precision
from merlin_mllm.models.vision import TOKEN_DIM
from merlin_mllm.ranker.image_features import ItemImageFeatures
from merlin_mllm.ranker.losses import check_loss_name
from merlin_mllm.ranker.prompt import IMAGE_TOKEN, PROMPT_VERSION, check_prompt_version

__all__ = [
    "RankerConfig",
    "FORMAT_VERSION",
    "CONFIG_FILE",
    "ADAPTER_DIR",
    "PROJECTOR_FILE",
    "ITEM_IMAGES_FILE",
    "HEAD_FILE",
    "COLLAB_PROJECTOR_FILE",
    "COLLAB_EMBEDDINGS_FILE",
    "LEGACY_HEAD_FILE",
    "EMBEDDED",
    "is_saved_ranker",
]

FORMAT_VERSION = 1
CONFIG_FILE = "ranker_config.json"
ADAPTER_DIR = "adapter"
PROJECTOR_FILE = "projector.safetensors"
ITEM_IMAGES_FILE = "item_images.safetensors"
HEAD_FILE = "hybrid_head.safetensors"
COLLAB_PROJECTOR_FILE = "collab_projector.safetensors"
COLLAB_EMBEDDINGS_FILE = "collab_embeddings.safetensors"
#: What folders saved before the hybrid had one name call the head (still read).
LEGACY_HEAD_FILE = "fusion_head.safetensors"
#: The embedded model's name, as ``base_model`` and as ``backend`` (the backend names are those
#: of :data:`merlin_mllm.ranker.backend_registry.BACKENDS`).
EMBEDDED = "embedded"


@dataclass
class RankerConfig:
    """Everything needed to rebuild a ranker around its base model (saved as JSON).

    Parameters
    ----------
    base_model : str
        ``"embedded"`` (SmolLM2 + EfficientNet-Lite0), a Hugging Face hub id or a local folder.
    backend : {"embedded", "hf"}
    use_images : bool
        False: text-only prompts (the MLLM-MSR_I ablation).
    zero_shot : bool
        True: no LoRA, nothing trainable (the "without SFT" baseline).
    lora_r, lora_alpha, lora_dropout :
        LoRA settings. The paper used r=8; the authors' code r=16, alpha=32, dropout 0.1.
    lora_init : str or bool
        peft ``init_lora_weights``: True (B=0, so step 0 equals the base model) or "gaussian"
        (the authors' code).
    loss : {"lm", "binary", "listwise"}
        "lm": negative log-likelihood of the answer token over the whole vocabulary (the paper's
        objective, with the prompt masked). "binary": cross-entropy over [No, Yes] only.
        "listwise": softmax over a user's group of candidates (groups only; see
        :mod:`merlin_mllm.ranker.losses`).
    seed : int
        Seeds the projector and LoRA initialisation.
    max_summary_tokens, max_title_tokens : int
        Prompt token budgets for the user summary and the candidate text (the title by default).
    prompt_version : str
        The prompt layout (:data:`merlin_mllm.choices.PROMPT_VERSIONS`): "1" (the default;
        configs saved before versions were selectable hold it) or "2" (question first, for
        packed groups).
    user_context : {"summary", "titles", "both"}
        What the prompt's user part holds (made by
        :func:`merlin_mllm.summaries.rows.user_context_texts` in training, evaluation and the
        export): the user summary (the paper's; configs saved before this setting hold it), the
        last ``context_titles`` titles of the history, or both.
    context_titles : int
        Titles in the user part with ``user_context`` "titles" or "both".
    context_ratings, context_attributes : bool
        With "titles" or "both", each title followed by the user's rating of it (from the
        row's own events before its time) and/or the item's catalogue attributes
        (:func:`merlin_mllm.summaries.rows.recent_titles_text`). Configs saved before these
        settings hold False (the titles alone).
    candidate_text : str
        What the prompt's candidate part holds (:data:`merlin_mllm.choices.CANDIDATE_TEXTS`,
        made by :class:`merlin_mllm.summaries.candidates.CandidateText` in training, evaluation
        and the export): the title (configs saved before this setting hold it), or the title
        with the catalogue attributes and/or the item summary. ``max_title_tokens`` is then the
        budget of that whole text.
    precision : {"float32", "bfloat16", "auto"}
        The numeric precision the ranker runs in (:mod:`merlin_mllm.models.precision`): scoring
        casts the language model's weights to it; training keeps LoRA and the projector in
        float32 and runs under bf16 autocast. "auto" is decided on the machine that loads the
        ranker. Configs saved before the setting hold "float32".
    collab_tokens : bool
        LLaRA-style collaborative tokens (:mod:`merlin_mllm.ranker.collab_tokens`): one soft token
        after each history title and after the candidate's title, the projected item embedding of
        that item (embedded backend). Configs saved before the setting hold False.
    collab_dim : int
        The item embeddings' size (the projector's input), set from the table when trained.
    """

    base_model: str = EMBEDDED
    backend: str = EMBEDDED
    use_images: bool = True
    zero_shot: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_init: Union[str, bool] = True
    loss: str = "lm"
    seed: int = 0
    max_summary_tokens: int = 384
    max_title_tokens: int = 64
    user_context: str = "summary"
    context_titles: int = 5
    context_ratings: bool = False
    context_attributes: bool = False
    candidate_text: str = "title"
    precision: str = DEFAULT_PRECISION
    collab_tokens: bool = False
    collab_dim: int = 64
    # Filled in when the model is built:
    prompt_version: str = PROMPT_VERSION
    yes_token_id: Optional[int] = None
    no_token_id: Optional[int] = None
    image_token: str = IMAGE_TOKEN
    num_image_tokens: int = 49
    vision_feature_dim: int = TOKEN_DIM  # EfficientNet 1280 + cell colour 10
    lora_target_modules: Optional[str] = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "RankerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{source}: unknown ranker settings {sorted(unknown)}")
        config = cls(**data)
        if config.format_version > FORMAT_VERSION:
            raise ValueError(
                f"{source}: ranker format {config.format_version} is newer than this merlin-mllm "
                f"understands ({FORMAT_VERSION}); upgrade merlin-mllm"
            )
        return config

    @classmethod
    def read(cls, folder: Union[str, os.PathLike]) -> "RankerConfig":
        """The config of a saved ranker folder (``ranker_config.json``)."""
        config_file = Path(folder) / CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: {folder} is not a saved ranker")
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{config_file}: invalid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(config_file))

    def write(self, folder: Union[str, os.PathLike]) -> Path:
        """Write ``ranker_config.json`` into ``folder``; returns its path."""
        config_file = Path(folder) / CONFIG_FILE
        config_file.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return config_file

    def validate(self) -> None:
        """Refuse impossible settings (the backend name is checked where the backend is chosen,
        :func:`merlin_mllm.ranker.backend_registry.backend_class`)."""
        check_loss_name(self.loss)
        check_precision(self.precision)
        check_prompt_version(self.prompt_version)
        if self.user_context not in USER_CONTEXTS:
            raise ValueError(f"user_context must be one of {USER_CONTEXTS}, not {self.user_context!r}")
        if isinstance(self.context_titles, bool) or not isinstance(self.context_titles, int) or self.context_titles < 1:
            raise ValueError(f"context_titles must be a positive integer, not {self.context_titles!r}")
        for name in ("context_ratings", "context_attributes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if self.candidate_text not in CANDIDATE_TEXTS:
            raise ValueError(f"candidate_text must be one of {tuple(CANDIDATE_TEXTS)}, not {self.candidate_text!r}")
        if self.collab_tokens and self.backend != EMBEDDED:
            raise ValueError(f"collab_tokens needs the embedded backend (the {self.backend} backend feeds token ids "
                             "to its model, which cannot hold collaborative tokens)")
        if not self.zero_shot and self.lora_r < 1:
            raise ValueError(f"lora_r must be at least 1, not {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), not {self.lora_dropout}")

    def check_item_features(self, table: ItemImageFeatures) -> None:
        """Refuse an item image table whose grids are not the shape this ranker projects."""
        if len(table) and (table.num_tokens, table.feature_dim) != (self.num_image_tokens, self.vision_feature_dim):
            raise ValueError(
                f"item image table has {table.num_tokens}x{table.feature_dim} grids; this ranker expects "
                f"{self.num_image_tokens}x{self.vision_feature_dim}"
            )


def is_saved_ranker(path: Union[str, os.PathLike, None]) -> bool:
    """True when ``path`` is a folder written by ``RankerModel.save_pretrained``."""
    return path is not None and (Path(path) / CONFIG_FILE).is_file()
