"""The OpenAI-compatible endpoints (/v1) in the site's OpenAPI schema (/api/schema/).

drf-spectacular describes DRF views; the /v1 views are plain async Django views (they stream
server-sent events and answer errors in OpenAI's shape, not DRF's), so spectacular cannot see
them. This postprocessing hook (SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]) adds their paths
and bodies by hand, with the bounds read from the same constants and settings the validation
uses (chat/openai_format.py, CHAT_LIMITS), so a bound changed there is documented here.
"""

from __future__ import annotations

from typing import Any

from chat import openai_format as fmt
from chat.services import chat_limits

TAG = "openai"
SECURITY = [{"bearerAuth": []}, {"tokenAuth": []}, {"cookieAuth": []}]
ERROR_CODES = {
    "400": "a bad or unsupported parameter (`param` names it), or a prompt too long",
    "401": "no API key, or a wrong one",
    "403": "a session without its CSRF token",
    "404": "no such model",
    "503": "no engine worker took the request in time",
}


def add_openai_paths(result: dict, generator, request, public) -> dict:
    """The spectacular hook: /v1 paths and their components added to the generated schema."""
    components = result.setdefault("components", {})
    components.setdefault("schemas", {}).update(_schemas())
    components.setdefault("securitySchemes", {})["bearerAuth"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "an API token (POST /api/auth/token/) as the OpenAI API key",
    }
    result.setdefault("paths", {}).update(_paths())
    return result


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict:
    return {"application/json": {"schema": _ref(name)}}


def _errors(*codes: str) -> dict:
    return {code: {"description": ERROR_CODES[code], "content": _json("OpenAIError")}
            for code in codes}  # fmt: skip


def _completion_post(summary: str, request: str, answer: str, chunk: str) -> dict:
    return {
        "post": {
            "operationId": f"v1_{request.removesuffix('Request').lower()}",
            "summary": summary,
            "tags": [TAG],
            "security": SECURITY,
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {
                "200": {
                    "description": f"the whole answer, or with `stream: true` server-sent events: "
                    f"`data: <{chunk} JSON>` lines, then `data: [DONE]`",
                    "content": {
                        **_json(answer),
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_errors("400", "401", "403", "404", "503"),
            },
        }
    }


def _paths() -> dict:
    get_models = {
        "operationId": "v1_models_list",
        "summary": "The checkpoints as models, then their aliases (latest, latest-<stage>, run-<id>)",
        "tags": [TAG],
        "security": SECURITY,
        "responses": {
            "200": {"description": "models", "content": _json("OpenAIModelList")},
            **_errors("401"),
        },  # fmt: skip
    }
    get_model = {
        "operationId": "v1_models_retrieve",
        "summary": "One model (`ckpt-<id>` or an alias: `latest`, `latest-<stage>`, `run-<id>`)",
        "tags": [TAG],
        "security": SECURITY,
        "parameters": [
            {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "responses": {
            "200": {"description": "the model", "content": _json("OpenAIModel")},
            **_errors("401", "404"),
        },  # fmt: skip
    }
    return {
        "/v1/models": {"get": get_models},
        "/v1/models/{model}": {"get": get_model},
        "/v1/chat/completions": _completion_post(
            "A chat reply (OpenAI chat completions)",
            "ChatCompletionRequest",
            "ChatCompletion",
            "chat.completion.chunk",
        ),
        "/v1/completions": _completion_post(
            "A raw text continuation, no chat template (OpenAI legacy completions)",
            "CompletionRequest",
            "TextCompletion",
            "text_completion",
        ),
    }


def _int(low: int, high: int, description: str = "", **extra: Any) -> dict:
    schema = {"type": "integer", "minimum": low, "maximum": high, "nullable": True, **extra}
    return {**schema, "description": description} if description else schema


def _schemas() -> dict[str, dict]:
    lim = chat_limits()
    nullable_string = {"type": "string", "nullable": True}
    token_logprob = {
        "type": "object",
        "required": ["token", "logprob", "bytes"],
        "properties": {
            "token": {"type": "string"},
            "logprob": {"type": "number"},
            "bytes": {"type": "array", "items": {"type": "integer"}, "nullable": True},
        },
    }
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            name: {"type": "integer"}
            for name in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
    }
    sampling = {
        "model": {
            "type": "string",
            "description": "`ckpt-<id>`, `latest`, `latest-<stage>` or `run-<id>` "
            "(the run's newest checkpoint)",
        },
        "max_tokens": _int(1, lim.max_max_tokens, f"default {lim.default_max_tokens}"),
        "temperature": {
            "type": "number",
            "minimum": lim.min_temperature,
            "maximum": lim.max_temperature,
            "nullable": True,
        },
        "top_k": _int(0, lim.max_top_k, "an extension: 0 = off"),
        "seed": _int(0, fmt.MAX_SEED, "the sampling seed (default: random)", format="int64"),
        "n": _int(1, fmt.MAX_CHOICES, "choices sampled from one prefill"),
        "stop": {
            "oneOf": [
                {"type": "string", "maxLength": fmt.MAX_STOP_CHARS},
                {
                    "type": "array",
                    "maxItems": fmt.MAX_STOPS,
                    "items": {"type": "string", "maxLength": fmt.MAX_STOP_CHARS},
                },
            ],
            "nullable": True,
        },
        "stream": {"type": "boolean", "nullable": True},
        "stream_options": {
            "type": "object",
            "nullable": True,
            "properties": {"include_usage": {"type": "boolean", "nullable": True}},
        },
        "user": {"type": "string"},
    }
    text_part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    }
    return {
        "OpenAIError": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": nullable_string,
                        "code": nullable_string,
                    },
                }
            },
        },
        "OpenAIModel": {
            "type": "object",
            "required": ["id", "object", "created", "owned_by"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["model"]},
                "created": {"type": "integer"},
                "owned_by": {"type": "string"},
                "alias_of": {"type": "string", "description": "for an alias: its checkpoint"},
                "stage": {"type": "string"},
                "step": {"type": "integer"},
                "run": {"type": "integer", "nullable": True},
            },
        },
        "OpenAIModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"type": "string", "enum": ["list"]},
                "data": {"type": "array", "items": _ref("OpenAIModel")},
            },
        },
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "description": "Other OpenAI parameters are refused with a 400 naming them unless "
            "neutral (docs/api.md lists them).",
            "properties": {
                **sampling,
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": lim.max_messages,
                    "items": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {
                            "role": {
                                "type": "string",
                                "enum": ["system", "developer", "user", "assistant"],
                            },
                            "content": {
                                "oneOf": [
                                    {"type": "string", "maxLength": lim.max_message_chars},
                                    {"type": "array", "items": text_part},
                                ]
                            },
                        },
                    },
                },
                "max_completion_tokens": _int(1, lim.max_max_tokens, "wins over max_tokens"),
                "logprobs": {"type": "boolean", "nullable": True},
                "top_logprobs": _int(0, fmt.MAX_TOP_LOGPROBS, "needs logprobs: true"),
            },
        },
        "CompletionRequest": {
            "type": "object",
            "required": ["model", "prompt"],
            "description": "Other OpenAI parameters are refused with a 400 naming them unless "
            "neutral (docs/api.md lists them).",
            "properties": {
                **sampling,
                "prompt": {
                    "oneOf": [
                        {"type": "string", "maxLength": lim.max_total_chars},
                        {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": fmt.MAX_PROMPTS,
                            "items": {"type": "string", "maxLength": lim.max_total_chars},
                        },
                    ]
                },
                "echo": {"type": "boolean", "nullable": True},
                "logprobs": _int(
                    0, fmt.MAX_TEXT_LOGPROBS, "alternatives per token (not with echo)"
                ),
            },
        },
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["chat.completion"]},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "message", "finish_reason", "logprobs"],
                        "properties": {
                            "index": {"type": "integer"},
                            "message": {
                                "type": "object",
                                "required": ["role", "content"],
                                "properties": {
                                    "role": {"type": "string", "enum": ["assistant"]},
                                    "content": {"type": "string"},
                                },
                            },
                            "finish_reason": {"type": "string", "enum": ["stop", "length"]},
                            "logprobs": {
                                "type": "object",
                                "nullable": True,
                                "description": "with logprobs: true; per token of the content",
                                "required": ["content"],
                                "properties": {
                                    "content": {
                                        "type": "array",
                                        "items": {
                                            **token_logprob,
                                            "properties": {
                                                **token_logprob["properties"],
                                                "top_logprobs": {
                                                    "type": "array",
                                                    "items": token_logprob,
                                                },
                                            },
                                        },
                                    },
                                    "refusal": {"nullable": True},
                                },
                            },
                        },
                    },
                },
                "usage": usage,
            },
        },
        "TextCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["text_completion"]},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "text", "finish_reason", "logprobs"],
                        "properties": {
                            "index": {"type": "integer"},
                            "text": {"type": "string"},
                            "finish_reason": {"type": "string", "enum": ["stop", "length"]},
                            "logprobs": {
                                "type": "object",
                                "nullable": True,
                                "description": "with logprobs: k; per token of the text",
                                "properties": {
                                    "tokens": {"type": "array", "items": {"type": "string"}},
                                    "token_logprobs": {
                                        "type": "array",
                                        "items": {"type": "number"},
                                    },
                                    "top_logprobs": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "additionalProperties": {"type": "number"},
                                        },
                                    },
                                    "text_offset": {
                                        "type": "array",
                                        "items": {"type": "integer"},
                                    },
                                },
                            },
                        },
                    },
                },
                "usage": usage,
            },
        },
    }
