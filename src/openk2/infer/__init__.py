"""Inference: batched generation over the compressed MLA cache with continuous batching,
schema-constrained decoding, an OpenAI-compatible server and a terminal chat."""

from openk2.infer.cache import CompressedDecoder, MLACache
from openk2.infer.constrain import Grammar, json_grammar, tool_call_grammar
from openk2.infer.engine import Completion, Delta, Engine, EngineError, RequestHandle, SamplingParams
from openk2.infer.schema import Limits, SchemaError

__all__ = [
    "Completion", "CompressedDecoder", "Delta", "Engine", "EngineError", "Grammar", "Limits", "MLACache",
    "RequestHandle", "SamplingParams", "SchemaError", "json_grammar", "tool_call_grammar",
]
