"""Generation with AttnRes models: Megatron-Core's static KV cache, chunked prefill, ``attnres-generate``."""

from attnres_megatron.inference.generation import (
    AttnResInferenceWrapper,
    Generation,
    SamplingSettings,
    TokenSampler,
    generate,
)

__all__ = ["AttnResInferenceWrapper", "Generation", "SamplingSettings", "TokenSampler", "generate"]
