"""Model layer: loading HF LLMs/MLLMs and the embedded offline defaults."""
from merlin_mllm.models.loading import (  # noqa: F401
    LoadedModel,
    default_device,
    default_dtype,
    load,
    single_token_id,
)
