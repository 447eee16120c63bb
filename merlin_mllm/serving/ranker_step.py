"""The ranker step (``mllm_ranker``): token-id prompts -> P(yes), or a hybrid's score, per candidate.

The Triton export (:mod:`merlin_mllm.serving.export`) writes its folder into the version folder
of the ``mllm_ranker`` python-backend model, and the merlin.systems operator
(:mod:`merlin_mllm.serving.systems`) saves the same folder as an artefact; both run this code.
It takes the tensors of the feature step (:mod:`merlin_mllm.serving.steps`). Folder layout::

    ranker/                    RankerModel.save_pretrained (config, LoRA adapter, projector), and
                               hybrid_head.safetensors for a hybrid (HybridHead)
    item_images.safetensors    ItemImageFeatures, looked up by item id (embedded model with images)
    ranker.json                scoring settings (candidates per forward pass)

Per user it calls :meth:`RankerModel.score_token_ids`, which runs the shared user prefix once
and reuses its KV cache for every candidate. A hybrid's score is sigmoid(head logit + LLM
logit), the LLM logit being logit(P(yes)) = logit(Yes) - logit(No), as
``evaluate_ranker(..., features=...)`` scores it (:func:`merlin_mllm.ranker.hybrid_head.hybrid_probability`).

Usage::

    from merlin_mllm.serving.ranker_step import RankerStep

    ranker = RankerStep.load("triton_repo/mllm_ranker/1/artifacts")
    scores = ranker.score_rows(batch["prompt_ids"], batch["prompt_lengths"], item_ids, batch.get("head_features"))
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

# torch and the ranker are imported inside the functions that use them (as in steps.py).

__all__ = ["RankerStep", "RANKER_DIR", "RANKER_CONFIG"]

RANKER_DIR = "ranker"
RANKER_CONFIG = "ranker.json"


class RankerStep:
    """Token-id prompts -> P(yes) per candidate, with the shared user prefix computed once.

    Parameters
    ----------
    ranker : RankerModel
        With its item image table attached (embedded model with images).
    batch_size : int
        Candidates per forward pass.
    head : HybridHead, optional
        A hybrid's head: the score is then sigmoid(head(features) + logit(P(yes))).
    """

    def __init__(self, ranker, batch_size: int = 32, head=None):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.ranker = ranker
        self.batch_size = int(batch_size)
        self.head = head.eval() if head is not None else None

    @staticmethod
    def write(folder: Union[str, os.PathLike], model_dir: Union[str, os.PathLike], item_features=None,
              batch_size: int = 32, precision: Optional[str] = None) -> Path:
        """Copy a saved ranker (its hybrid head, its collaborative tokens' files, and its item image
        table too) into a step folder.

        ``precision`` (:data:`~merlin_mllm.models.precision.PRECISIONS`): what the step runs in,
        resolved where it loads ("auto" detects there); default: the saved ranker's.
        """
        from merlin_mllm.models.precision import check_precision
        from merlin_mllm.ranker.ranker_config import (ADAPTER_DIR, COLLAB_EMBEDDINGS_FILE, COLLAB_PROJECTOR_FILE,
                                                      CONFIG_FILE, HEAD_FILE, ITEM_IMAGES_FILE, PROJECTOR_FILE)
        from merlin_mllm.ranker.hybrid_head import saved_head_path

        folder, model_dir = Path(folder), Path(model_dir)
        target = folder / RANKER_DIR
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        # A ranker with collaborative tokens brings their projector and item table (loaded by from_pretrained).
        for name in (CONFIG_FILE, ADAPTER_DIR, PROJECTOR_FILE, COLLAB_PROJECTOR_FILE, COLLAB_EMBEDDINGS_FILE):
            source = model_dir / name
            if source.is_dir():
                shutil.copytree(source, target / name)
            elif source.is_file():
                shutil.copy2(source, target / name)
        head = saved_head_path(model_dir)
        if head is not None:
            shutil.copy2(head, target / HEAD_FILE)
        if item_features is not None:
            item_features.save(folder / ITEM_IMAGES_FILE)
        elif (folder / ITEM_IMAGES_FILE).exists():
            (folder / ITEM_IMAGES_FILE).unlink()
        settings = {"batch_size": int(batch_size)}
        if precision is not None:
            settings["precision"] = check_precision(precision)
        (folder / RANKER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: Union[str, os.PathLike], *, device=None, precision: Optional[str] = None,
             batch_size: Optional[int] = None) -> "RankerStep":
        """Load the ranker of a step folder onto ``device`` (default: CUDA when available), in
        ``precision`` (default: the one :meth:`write` recorded, else the saved ranker's)."""
        import torch

        from merlin_mllm.models.loading import default_device
        from merlin_mllm.ranker.ranker_config import ITEM_IMAGES_FILE
        from merlin_mllm.ranker.image_features import ItemImageFeatures
        from merlin_mllm.ranker.hybrid_head import saved_head
        from merlin_mllm.ranker.model import RankerModel

        folder = Path(folder)
        if not (folder / RANKER_DIR).is_dir():
            raise FileNotFoundError(f"{folder / RANKER_DIR} not found: {folder} is not an exported ranker step")
        device = torch.device(device) if device is not None else default_device()
        table = ItemImageFeatures.load(folder / ITEM_IMAGES_FILE) if (folder / ITEM_IMAGES_FILE).exists() else None
        settings = json.loads((folder / RANKER_CONFIG).read_text()) if (folder / RANKER_CONFIG).exists() else {}
        ranker = RankerModel.from_pretrained(folder / RANKER_DIR, item_features=table, device=device,
                                             precision=precision or settings.get("precision"))
        # The head stays on the CPU in float32: a few hundred weights, scored as evaluation scores them.
        head = saved_head(folder / RANKER_DIR)
        return cls(ranker, batch_size=batch_size or settings.get("batch_size", 32), head=head)

    def hybrid_parts(self, p_yes: np.ndarray, features: np.ndarray) -> Dict[str, np.ndarray]:
        """A hybrid's score of one user's candidates from the LLM's P(yes) and the head's features.

        Exactly what ``evaluate_ranker(..., features=...)`` computes: ``llm_logit`` =
        log(P) - log(1 - P) (= logit(Yes) - logit(No)), ``head_logit`` = the head on the
        float32 features, ``score`` = sigmoid(their sum), all float64.
        """
        import torch

        from merlin_mllm.ranker.hybrid_head import hybrid_probability

        if self.head is None:
            raise ValueError("this ranker has no hybrid head: it is not a hybrid")
        p_yes = np.asarray(p_yes, dtype=np.float64).reshape(-1)
        features = np.asarray(features, dtype=np.float32).reshape(len(p_yes), -1)
        with torch.no_grad():
            head_logit = self.head(torch.as_tensor(features)).double().numpy()
        llm_logit, score = hybrid_probability(p_yes, head_logit)
        return {"llm_logit": llm_logit, "head_logit": head_logit, "score": score}

    def warm_up(self) -> None:
        """Score two probe prompts, so the first client does not pay for first-call set-up."""
        probe = self.ranker.prompt.encode("A user.", "An item", has_image=False).input_ids
        self.ranker.score_token_ids([probe, probe[:-1] + probe[-1:]], None, batch_size=self.batch_size)

    def score(self, prompts: Sequence[Sequence[int]], item_ids: Sequence[int],
              features: Optional[np.ndarray] = None) -> np.ndarray:
        """P(yes) (float64) of one user's candidates, in input order; a hybrid's score with ``features``."""
        p_yes = self.ranker.score_token_ids([list(map(int, p)) for p in prompts],
                                            [int(i) for i in item_ids], batch_size=self.batch_size)
        return self._finish([p_yes], None if features is None else [features])[0]

    def _finish(self, p_yes: List[np.ndarray], features: Optional[Sequence[np.ndarray]]) -> List[np.ndarray]:
        # The LLM's P(yes) as it is, or a hybrid's score: a hybrid needs the head's features.
        if self.head is None:
            if features is not None:
                raise ValueError("head features were given, but this ranker has no hybrid head (not a hybrid)")
            return p_yes
        if features is None:
            raise ValueError(f"this ranker is a hybrid: it needs the head's features {list(self.head.feature_names)} "
                             "of every candidate (the feature step's head_features)")
        if len(features) != len(p_yes):
            raise ValueError(f"head features for {len(features)} users, but {len(p_yes)} users were scored")
        return [self.hybrid_parts(p, f)["score"] for p, f in zip(p_yes, features)]

    def score_users(self, users: Sequence[Tuple[Sequence[Sequence[int]], Sequence[int]]],
                    features: Optional[Sequence[np.ndarray]] = None) -> List[np.ndarray]:
        """P(yes) for several users' candidates at once (what a dynamic batch of requests holds).

        Each user's prompt prefix is computed once, as in :meth:`score`; then the candidates of
        *all* users go through the model together, ``batch_size`` rows per forward pass. A row
        attends to its own user's cached prefix: the prefixes are right-padded to the longest
        one in the pass and the padding is masked out, and each row's positions continue from
        its own prefix length. So the scores equal per-user scoring (up to float rounding), but
        the matrix products are larger, which is what a GPU needs to be busy.

        Parameters
        ----------
        users : list of (prompts, item_ids)
            Per user: the candidates' full prompt token ids and their item ids.
        features : list of np.ndarray, optional
            A hybrid's head features per user, (candidates, head features) each; required for
            a hybrid (see :meth:`hybrid_parts`), refused otherwise.

        Returns
        -------
        list of np.ndarray (float64), one per user, in input order: P(yes), or the hybrid's score.
        """
        return self._finish(self.ranker.score_users_token_ids(users, batch_size=self.batch_size), features)

    @staticmethod
    def unpad(prompt_ids: np.ndarray, prompt_lengths: np.ndarray, item_ids: np.ndarray) -> List[Tuple[list, np.ndarray]]:
        """(prompts, item_ids) per user row from the feature step's padded tensors."""
        prompt_ids = np.asarray(prompt_ids)
        prompt_lengths = np.asarray(prompt_lengths).reshape(prompt_ids.shape[:2])
        item_ids = np.asarray(item_ids).reshape(prompt_ids.shape[:2])
        return [([prompt_ids[row, c, : int(prompt_lengths[row, c])] for c in range(prompt_ids.shape[1])], item_ids[row])
                for row in range(prompt_ids.shape[0])]

    def score_rows(self, prompt_ids: np.ndarray, prompt_lengths: np.ndarray, item_ids: np.ndarray,
                   head_features: Optional[np.ndarray] = None) -> np.ndarray:
        """Scores (batch, candidates) from the feature step's padded tensors, one user per row.

        ``head_features`` (batch, candidates, head features): a hybrid's, from the feature step.
        """
        features = None if head_features is None else list(np.asarray(head_features))
        return np.stack(self.score_users(self.unpad(prompt_ids, prompt_lengths, item_ids), features))
