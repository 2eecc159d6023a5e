"""Request bodies in the OpenAPI document.

The infer, generate, repository and OpenAI routes read their bodies with hand-written
codecs (DESIGN.md principle 3), so FastAPI cannot see them; this describes them, so that
``/openapi.json`` shows every body and a fuzzer (schemathesis, tests/server) reaches them.
"""

from __future__ import annotations

from typing import Any

from meshserve.protocol.datatypes import DTYPES

_PARAMETERS: dict[str, Any] = {"type": "object", "additionalProperties": {}}

SCHEMAS: dict[str, Any] = {
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestInput"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestOutput"}},
        },
    },
    "RequestInput": {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string", "enum": sorted(DTYPES)},
            "parameters": _PARAMETERS,
            "data": {"type": "array", "items": {}},
        },
    },
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS},
    },
    "RepositoryLoad": {
        "type": "object",
        "properties": {
            "parameters": {
                "type": "object",
                "properties": {"config": {"oneOf": [{"type": "string"}, {"type": "object"}]}},
            }
        },
    },
    "RepositoryIndex": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
    "GenerateRequest": {
        "type": "object",
        "description": "Triton's generate extension: fields map to the model's inputs; "
        "an LLM reads text_input and sampling parameters.",
        "properties": {
            "text_input": {"type": "string"},
            "parameters": {
                "type": "object",
                "properties": {
                    "max_tokens": {"type": "integer"},
                    "temperature": {"type": "number"},
                    "top_p": {"type": "number"},
                    "top_k": {"type": "integer"},
                    "seed": {"type": "integer"},
                    "stop": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            "model": {"type": "string"},
            "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "max_tokens": {"type": "integer"},
            "temperature": {"type": "number"},
            "top_p": {"type": "number"},
            "n": {"type": "integer"},
            "seed": {"type": "integer"},
            "stream": {"type": "boolean"},
            "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string"},
            "messages": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"type": "string", "enum": ["system", "user", "assistant"]},
                        "content": {"type": "string"},
                    },
                },
            },
            "max_tokens": {"type": "integer"},
            "temperature": {"type": "number"},
            "seed": {"type": "integer"},
            "stream": {"type": "boolean"},
        },
    },
}

# Path suffix -> body schema (every version/prefix variant of a route ends the same way).
BODIES: dict[str, str] = {
    "/infer": "InferenceRequest",
    "/generate": "GenerateRequest",
    "/generate_stream": "GenerateRequest",
    "/load": "RepositoryLoad",
    "/repository/index": "RepositoryIndex",
    "/chat/completions": "ChatCompletionRequest",
    "/completions": "CompletionRequest",
}


def describe_bodies(doc: dict[str, Any]) -> dict[str, Any]:
    """Add the request bodies to a generated OpenAPI document (in place; returned)."""
    doc.setdefault("components", {}).setdefault("schemas", {}).update(SCHEMAS)
    for path, ops in doc.get("paths", {}).items():
        post = ops.get("post")
        if post is None:
            continue
        for suffix, schema in BODIES.items():
            if path.endswith(suffix):
                ref = {"$ref": f"#/components/schemas/{schema}"}
                post["requestBody"] = {"required": suffix in ("/infer", "/completions", "/chat/completions"),
                                       "content": {"application/json": {"schema": ref}}}  # fmt: skip
                break
    return doc
