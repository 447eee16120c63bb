"""Serving: the Triton ensemble export, the bundled Triton server, the client and the
merlin.systems operator.

- :mod:`merlin_mllm.serving.export`: ``export`` writes the Triton model repository
  (``mllm_rerank`` = ``mllm_features`` -> ``mllm_ranker``).
- :mod:`merlin_mllm.serving.steps` and :mod:`merlin_mllm.serving.ranker_step`: what the two
  python-backend models load and run (``FeatureStep`` with a hybrid's ``HeadFeatures``,
  ``RankerStep``, ``ServingLimits``), shared with the in-process path;
  :mod:`merlin_mllm.serving.triton_configs`: their ``config.pbtxt``.
- :mod:`merlin_mllm.serving.tritonserver`: ``TritonServer``, the tritonserver of the
  nvidia-pytriton wheel.
- :mod:`merlin_mllm.serving.client`: ``RerankClient`` and ``rank`` (gRPC or HTTP).
- :mod:`merlin_mllm.serving.systems`: ``MLLMRerank``, a merlin.systems operator.

Names are imported lazily, on first use.
"""
from __future__ import annotations

from merlin_mllm.lazy_exports import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["MANIFEST_FILE", "export", "prompt_token_limit", "user_summary_table"], "export"),
    **dict.fromkeys(["FeatureStep", "HeadFeatures", "ServingLimits", "UnknownUserError"], "steps"),
    "RankerStep": "ranker_step",
    "TritonServer": "tritonserver",
    **dict.fromkeys(["RankResult", "RerankClient", "RerankError", "rank"], "client"),
    **dict.fromkeys(["MLLMRerank", "export_python_only"], "systems"),
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
