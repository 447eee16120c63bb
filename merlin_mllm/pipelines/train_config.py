""":class:`TrainConfig`: the settings of :func:`~merlin_mllm.pipelines.training.train_ranker`.

A dataclass that checks its values when it is made (as peft's ``LoraConfig`` does), so a bad
setting fails at once with the field's name, not minutes later inside Lightning. Each field
carries its help text (``metadata["help"]``), whether ``train_config.json`` records it
(``metadata["saved"]``, default True) and whether a checkpoint made with another value may be
resumed (``metadata["resume"]``: those must match). This module imports nothing heavy, so the
CLI can take its defaults from here without loading torch.

Usage::

    from merlin_mllm.pipelines import TrainConfig, train_ranker
    train_ranker("data/ml100k", "data/summaries", "runs/ranker", TrainConfig(epochs=2, lr=5e-4))
    TrainConfig.small_budget(epochs=2)      # the quickstart's recipe for a few hundred steps
    TrainConfig.recipe("paper")             # by name, as `merlin-mllm train --recipe` does
    TrainConfig.small_budget().too_few_steps(train_rows=64)   # None, or a warning with the numbers
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

from merlin_mllm.choices import CANDIDATE_TEXTS, LOSSES, PROMPT_VERSIONS, USER_CONTEXTS
from merlin_mllm.models.precision import DEFAULT_PRECISION, PRECISIONS  # torch-free names
from merlin_mllm.ranker.prompt import DEFAULT_MAX_PROMPT_TOKENS  # torch-free

__all__ = ["TrainConfig", "RECIPES", "DEFAULT_RECIPE", "MIN_LR_STEPS", "BATCHINGS"]

#: ``groups``: each micro-batch holds whole groups (one user's positive and its negatives at one
#: target), run as one packed pass per group; ``rows``: candidate rows shuffled one by one.
BATCHINGS = ("groups", "rows")
#: The named training recipes (``merlin-mllm train --recipe``).
RECIPES = {
    "small-budget": "the quickstart's: lr 5e-4, micro-batches of 8, one per optimizer step, 2 epochs; learns within "
                    "tens to a few hundred steps (AUC 0.52 -> 0.69 in 189 steps on all ML-100k users)",
    "paper": "the paper's: lr 2e-5, micro-batches of 4, 8 per optimizer step, 1 epoch; made for far more data: on "
             "the 40-user quickstart folder it makes 2 steps and its adapter moves P(yes) by 0.005 at most",
}
#: The CLI's default: the recipe that learns on the data a CPU run can afford (see RECIPES).
DEFAULT_RECIPE = "small-budget"
#: Adam moves each weight by about ``lr`` per optimizer step, so ``lr x steps`` is how far a run
#: can move the adapter. Measured on the 40-user quickstart folder (paper protocol, 64 training
#: rows, groups/listwise defaults; each model scored with and without its adapter, LoRA B zeroed):
#: the paper recipe's 2 steps at 2e-5 (4e-5) moved P(yes) by 0.005 at most (test AUC 0.5625 with
#: the adapter, 0.55 without); small-budget's 16 steps at 5e-4 (8e-3) moved it by 0.215 on
#: average (AUC 0.747 against 0.55). 5e-3 is the smallest committed run that moved the ranker off
#: its zero-shot scores: 10 steps at 5e-4 (benchmarks/quality/README.md, leave-last-out, 20 users); 189
#: steps at 5e-4 (0.0945) reach AUC 0.691 against 0.515 (benchmarks/quality/sft_vs_zero_shot.json).
MIN_LR_STEPS = 5e-3


def _setting(default: Any, help: str, *, resume: bool = False, saved: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "resume": resume, "saved": saved})


@dataclass
class TrainConfig:
    """How :func:`~merlin_mllm.pipelines.training.train_ranker` fine-tunes the ranker.

    Every field has a default (the paper's LoRA recipe: r=8, lr 2e-5, 8 micro-batches of 4 per
    step); see each field's ``metadata["help"]``, or the list below. Training runs on groups
    (``batching="groups"``: one packed pass per user group) with the ``listwise`` loss and prompt
    version 2 unless told otherwise; ``batching="rows"`` is the paper's row-wise training (then
    ``lm`` and prompt version 1 by default). ``loss`` and ``prompt_version`` left at ``None``
    are resolved from ``batching`` when the config is made.

    Raises
    ------
    ValueError
        On construction, naming the field, when a value is out of range.
    """

    # base_model and use_images are RankerConfig's names for the same settings (train_config.json
    # of older runs says model and image: merlin_mllm.ranker.saved.read_train_config reads both).
    base_model: Optional[str] = _setting(
        None, "None/'embedded' (SmolLM2 + EfficientNet-Lite0), or a Hugging Face id/folder (text-only "
        "through this pipeline: use_images=False)", resume=True)
    use_images: bool = _setting(True, "Show candidate images (embedded model); False: the text-only ablation "
                                "(MLLM-MSR_I)", resume=True)
    lora_r: int = _setting(8, "LoRA rank (the paper's 8)", resume=True)
    lora_alpha: int = _setting(16, "LoRA alpha", resume=True)
    lora_dropout: float = _setting(0.05, "LoRA dropout, in [0, 1)", resume=True)
    lr: float = _setting(2e-5, "LoRA learning rate (the paper's 2e-5)")
    projector_lr: Optional[float] = _setting(None, "Learning rate of the image projector, which starts from random "
                                                   "(default: lr)")
    epochs: int = _setting(1, "Stop after this many epochs")
    max_steps: int = _setting(-1, "Stop after this many optimizer steps (-1: no step limit)")
    grad_accum: int = _setting(8, "Micro-batches per optimizer step")
    max_length: int = _setting(DEFAULT_MAX_PROMPT_TOKENS, "Longest prompt in tokens; longer ones get a shorter user "
                               "summary", resume=True)
    batch_size: int = _setting(4, "Candidate rows per micro-batch (per process); batching='groups': whole groups of "
                                  "up to this many rows (at least one group)")
    seed: int = _setting(42, "Seeds LoRA/projector initialisation, shuffling, the DDP shards and max_groups' choice",
                         resume=True)
    loss: Optional[str] = _setting(
        None, "lm: full-vocabulary NLL of the answer token (the paper); binary: CE over [No, Yes]; listwise: softmax "
        "over each group's yes-minus-no logits (batching='groups' only). Default: listwise with groups (it ranked "
        "best on held-out groups, benchmarks/quality/group_training_quality.json), lm with rows", resume=True)
    batching: str = _setting(
        "groups", "groups (default): micro-batches of whole groups (a user's positive and its K negatives, K set by "
        "`data prepare --train-negatives`), each run as one packed pass, 4x the rows per CPU-second and at least "
        "the rows' held-out AUC (benchmarks/quality/group_training_quality.json); rows: candidate rows shuffled one by one, "
        "each its whole prompt (the reference scores')", resume=True)
    prompt_version: Optional[str] = _setting(
        None, "Ranker prompt layout: '1' (candidate, then the question) or '2' (the question in the part a user's "
        "candidates share, which packs well). Default: '2' with groups, '1' with rows", resume=True)
    user_context: str = _setting(
        "summary", "What the prompt's user part holds: summary (the user summary, the paper's), titles (the last "
        "context_titles titles of the history: no user summaries needed) or both", resume=True)
    context_titles: int = _setting(5, "Titles in the user part with user_context titles or both", resume=True)
    context_ratings: bool = _setting(
        False, "With user_context titles or both: each title followed by the user's rating of it, read from the "
        "row's own events before its time ('Toy Story (1995) (rated 5/5)'; the dataset needs ratings, as ML-100k "
        "has). Saved with the ranker, so evaluate and export show the same text", resume=True)
    context_attributes: bool = _setting(
        False, "With user_context titles or both: each title followed by the item's catalogue attributes (genres "
        "and year; category and brand). Saved with the ranker, so evaluate and export show the same text",
        resume=True)
    candidate_text: str = _setting(
        "title", "What the prompt shows of each candidate: title (the paper's), title+attributes (the catalogue "
        "attributes of data prepare: genres and year, category and brand), summary (the item summary of `summarize "
        "items`, read from the summary store), title+summary or title+attributes+summary. Saved with the ranker, "
        "so evaluate and export show the same text", resume=True)
    collab_tokens: bool = _setting(
        False, "LLaRA-style collaborative tokens: SASRec item embeddings, trained on the events before the train "
        "split's cut, go through a trained projector to one soft token after each history title and after the "
        "candidate's title (embedded model; items with no event before the cut share a learned cold vector). The "
        "item table is saved with the run (collab_embeddings.safetensors) and with the ranker", resume=True)
    head_features: Optional[Tuple[str, ...]] = _setting(
        None, "Train a hybrid: these tabular feature columns (e.g. merlin_mllm.data.collaborative.HEAD_FEATURES) "
        "feed a HybridHead whose logit is added to the LLM's yes-minus-no logit, trained jointly (loss binary "
        "or listwise). train_ranker then needs features=<rows with these columns>. None: the LLM alone", resume=True)
    head_hidden: Tuple[int, ...] = _setting((16,), "Hidden widths of the hybrid's head (() makes it linear)",
                                            resume=True)
    head_lr: Optional[float] = _setting(None, "Learning rate of the hybrid's head during joint training (default: lr)")
    head_recent_days: Optional[float] = _setting(
        None, "The recent window (days) the hybrid's item_log_recent_count was counted with, saved with the head so "
        "that serving counts alike. None: merlin_mllm.data.collaborative.DEFAULT_RECENT_DAYS", resume=True)
    head_warm_start: bool = _setting(
        True, "Fit the hybrid's head on the training rows alone before joint training, so the LLM learns what the "
        "tabular features miss rather than relearning item popularity", resume=True)
    precision: str = _setting(
        DEFAULT_PRECISION, "float32 | bfloat16 | auto. bfloat16: the frozen base weights in bf16 and the forward under "
        "bf16 autocast; LoRA, the image projector and a hybrid's head keep fp32 weights and optimizer state. auto: "
        "bfloat16 on CUDA with bf16 and on CPUs with native bf16 (avx512_bf16/amx_bf16, detected), else float32. "
        "Saved with the ranker, so evaluate and export run in it unless told otherwise")
    devices: int = _setting(1, "Lightning devices (processes/GPUs; -1: all); >1 trains with DDP")
    strategy: Any = _setting(
        "auto", "Lightning strategy: 'auto', 'ddp' (Lightning re-runs the launching script on every rank: guard "
        "code after train_ranker with LOCAL_RANK == '0') or 'ddp_spawn' (needs an `if __name__ == '__main__':` "
        "guard and picklable summaries); on CPU the processes talk over gloo")
    max_groups: Optional[int] = _setting(None, "Train (and validate) on this many groups only, chosen with seed")
    accelerator: Optional[str] = _setting(None, "Lightning accelerator (default: gpu when CUDA is available, else cpu)",
                                          saved=False)
    resume: bool = _setting(True, "Continue from out/checkpoints/last.ckpt when it exists (resume settings must match)",
                            saved=False)
    validate: bool = _setting(True, "Compute the validation loss after each epoch when valid/ exists", saved=False)
    checkpoint_every_n_steps: int = _setting(50, "Also save last.ckpt every this many optimizer steps (and at each "
                                                 "epoch end)", saved=False)

    def __post_init__(self):
        if self.base_model is not None and (not isinstance(self.base_model, str) or not self.base_model):
            raise ValueError(f"base_model must be None or a non-empty model id/folder, not {self.base_model!r}")
        _check_bool("use_images", self.use_images)
        self.use_images = bool(self.use_images)
        _check_int("lora_r", self.lora_r, low=1)
        _check_number("lora_alpha", self.lora_alpha, positive=True)
        _check_number("lora_dropout", self.lora_dropout)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), not {self.lora_dropout!r}")
        _check_number("lr", self.lr, positive=True)
        if self.projector_lr is not None:
            _check_number("projector_lr", self.projector_lr, positive=True)
        _check_int("epochs", self.epochs, low=1)
        _check_int("max_steps", self.max_steps, low=-1)
        if self.max_steps == 0:
            raise ValueError("max_steps must be -1 (no limit) or at least 1, not 0")
        _check_int("grad_accum", self.grad_accum, low=1)
        _check_int("max_length", self.max_length, low=1)
        _check_int("batch_size", self.batch_size, low=1)
        _check_int("seed", self.seed, low=0)
        if self.batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {BATCHINGS}, not {self.batching!r}")
        groups = self.batching == "groups"
        if self.loss is None:
            self.loss = "listwise" if groups else "lm"
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {tuple(LOSSES)}, not {self.loss!r}")
        if self.loss == "listwise" and not groups:
            raise ValueError("loss='listwise' compares the candidates of one group: it needs batching='groups' "
                             "(with batching='rows' use loss='lm' or 'binary')")
        if self.prompt_version is None:
            self.prompt_version = "2" if groups else "1"
        if self.prompt_version not in PROMPT_VERSIONS:
            raise ValueError(f"prompt_version must be one of {tuple(PROMPT_VERSIONS)}, not {self.prompt_version!r}")
        if self.user_context not in USER_CONTEXTS:
            raise ValueError(f"user_context must be one of {USER_CONTEXTS}, not {self.user_context!r}")
        _check_int("context_titles", self.context_titles, low=1)
        for name in ("context_ratings", "context_attributes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if not isinstance(self.collab_tokens, bool):
            raise ValueError(f"collab_tokens must be True or False, not {self.collab_tokens!r}")
        if self.candidate_text not in CANDIDATE_TEXTS:
            raise ValueError(f"candidate_text must be one of {tuple(CANDIDATE_TEXTS)}, not {self.candidate_text!r}")
        if self.head_features is not None:
            if isinstance(self.head_features, str) or not len(self.head_features) \
                    or not all(isinstance(c, str) and c for c in self.head_features):
                raise ValueError(f"head_features must be None or a non-empty sequence of column names, "
                                 f"not {self.head_features!r}")
            self.head_features = tuple(self.head_features)
            if len(set(self.head_features)) != len(self.head_features):
                raise ValueError(f"head_features repeat a column: {list(self.head_features)}")
            if self.loss == "lm":
                raise ValueError("a hybrid (head_features) trains with loss='binary' or 'listwise': 'lm' is a loss "
                                 "over the LLM's vocabulary, which the tabular head has no part in")
        if isinstance(self.head_hidden, (str, bytes)) or not all(
                isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1 for w in self.head_hidden):
            raise ValueError(f"head_hidden must be a sequence of positive integers, not {self.head_hidden!r}")
        self.head_hidden = tuple(int(w) for w in self.head_hidden)
        if self.head_lr is not None:
            _check_number("head_lr", self.head_lr, positive=True)
        if self.head_recent_days is not None:
            _check_number("head_recent_days", self.head_recent_days, positive=True)
        _check_bool("head_warm_start", self.head_warm_start)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        _check_int("devices", self.devices, low=-1)
        if self.devices == 0:
            raise ValueError("devices must be -1 (all) or at least 1, not 0")
        if isinstance(self.strategy, str) and not self.strategy:
            raise ValueError("strategy must be a Lightning strategy name or object, not ''")
        if self.max_groups is not None:
            _check_int("max_groups", self.max_groups, low=1)
        if self.accelerator is not None and (not isinstance(self.accelerator, str) or not self.accelerator):
            raise ValueError(f"accelerator must be None or a Lightning accelerator name, not {self.accelerator!r}")
        _check_bool("resume", self.resume)
        _check_bool("validate", self.validate)
        _check_int("checkpoint_every_n_steps", self.checkpoint_every_n_steps, low=1)

    @classmethod
    def small_budget(cls, **changes: Any) -> "TrainConfig":
        """LoRA settings for runs of a few hundred optimizer steps (the quickstart, the CPU
        benchmarks): lr 5e-4, micro-batches of 8, no accumulation; then ``changes``.

        Measured by benchmarks/quality/sft_vs_zero_shot.py on all ML-100k users: one epoch of 189
        steps gives AUC 0.69 against 0.52 zero-shot. The paper's lr 2e-5 (or 1e-4 with batches of
        4 x 4) needs far more steps; over a few hundred the ranker stays at the Yes/No prior.
        """
        return cls(**{"lr": 5e-4, "batch_size": 8, "grad_accum": 1, **changes})

    @classmethod
    def paper(cls, **changes: Any) -> "TrainConfig":
        """The paper's LoRA recipe (the field defaults: lr 2e-5, 8 micro-batches of 4 per step); then ``changes``."""
        return cls(**changes)

    @classmethod
    def recipe(cls, name: str, **changes: Any) -> "TrainConfig":
        """The named recipe (a key of :data:`RECIPES`), then ``changes``.

        ``"small-budget"`` is what the quickstart trains with: :meth:`small_budget` for 2 epochs.
        ``"paper"`` is :meth:`paper`.
        """
        if name not in RECIPES:
            raise ValueError(f"recipe must be one of {tuple(RECIPES)}, not {name!r}")
        if name == "small-budget":
            return cls.small_budget(**{"epochs": 2, **changes})
        return cls.paper(**changes)

    def optimizer_steps(self, train_rows: int, world_size: int = 1) -> int:
        """Optimizer steps a run over ``train_rows`` rows makes (``epochs``, then ``max_steps``).

        Each of ``world_size`` processes takes ``batch_size`` rows per micro-batch and steps
        after ``grad_accum`` of them (and at the end of an epoch).
        """
        micro_batches = math.ceil(int(train_rows) / max(1, int(world_size)) / self.batch_size)
        steps = math.ceil(micro_batches / self.grad_accum) * self.epochs
        return min(steps, self.max_steps) if self.max_steps > 0 else steps

    def too_few_steps(self, train_rows: int, world_size: int = 1) -> Optional[str]:
        """A warning, with the numbers, when the run cannot move the adapter; else ``None``.

        The rule: ``lr x optimizer steps`` below :data:`MIN_LR_STEPS` (see there for where the
        threshold comes from).
        """
        steps = self.optimizer_steps(train_rows, world_size)
        if self.lr * steps >= MIN_LR_STEPS:
            return None
        needed = math.ceil(MIN_LR_STEPS / self.lr)
        return (f"this run makes {steps} optimizer step(s) at lr {self.lr:g} ({train_rows} training rows, "
                f"micro-batches of {self.batch_size}, {self.grad_accum} per step, {self.epochs} epoch(s)"
                f"{f', max_steps {self.max_steps}' if self.max_steps > 0 else ''}): lr x steps = {self.lr * steps:.2g}, "
                f"below the {MIN_LR_STEPS:g} that measured runs needed to move the ranker off its zero-shot "
                f"scores. At lr {self.lr:g} that takes at least {needed} steps: train more epochs, or use the "
                f"small-budget recipe (lr 5e-4, batches of 8, no accumulation)")

    @classmethod
    def resume_fields(cls) -> Tuple[str, ...]:
        """The fields a resumed checkpoint must have been trained with (``metadata["resume"]``)."""
        return tuple(f.name for f in fields(cls) if f.metadata["resume"])

    def saved_fields(self) -> Dict[str, Any]:
        """The fields ``train_config.json`` records (``metadata["saved"]``), in field order."""
        # Tuples as lists: what json gives back, so a resume compares equal values.
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in fields(self) if f.metadata["saved"] for v in [getattr(self, f.name)]}


def _check_bool(name: str, value: Any) -> None:
    if value not in (True, False):
        raise ValueError(f"{name} must be True or False, not {value!r}")


def _check_int(name: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, not {value!r}")


def _check_number(name: str, value: Any, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, not {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be greater than 0, not {value!r}")
