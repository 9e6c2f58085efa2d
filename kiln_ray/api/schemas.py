"""Request bodies of the HTTP API (OpenAI-compatible, plus Kiln's batch helper).

Unknown fields are accepted and ignored (`extra="ignore"`), as OpenAI clients send fields a
server may not implement (`user`, `store`, `metadata`, ...). Ranges follow OpenAI where it
has them; out-of-range values are a 400 with the offending field as `param`.

Every body is checked once here for what JSON can carry but nothing downstream can use:
NaN and Infinity (Python's JSON parser accepts them), lone UTF-16 surrogates (`"\\ud800"`
is valid JSON but not text: the tokenizer cannot encode it) and nesting deeper than
MAX_JSON_DEPTH (free-form fields such as chat_template_kwargs reach recursive code).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kiln_ray.api.chat import ForcedCall

MAX_N = 16
MAX_BATCH_COMPLETIONS = 64
_TOKEN_ID = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only: str.isdigit() also takes "²", which int() refuses
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
MAX_JSON_DEPTH = 64


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _usable_json(cls, data: Any) -> Any:
        _check_json(data, ())
        return data


def _check_json(value: Any, path: tuple) -> None:
    """Raise ValueError at the first string (value or key) of a JSON value that holds a lone
    surrogate, or the first container nested deeper than MAX_JSON_DEPTH. Nested bodies walk
    their own part again: cheap next to tokenizing it."""
    if isinstance(value, str):
        if match := _LONE_SURROGATE.search(value):
            where = ".".join(map(str, path)) or "the body"
            raise ValueError(f"{where} is not valid Unicode text (lone surrogate {match.group()!r})")
    elif isinstance(value, (dict, list)) and len(path) >= MAX_JSON_DEPTH:
        raise ValueError(f"{path[0]} is nested deeper than {MAX_JSON_DEPTH} levels")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, (*path, "<key>"))
            _check_json(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, (*path, i))


class StreamOptions(_Body):
    include_usage: bool = False


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # true: a schema that cannot be enforced is a 400, not a free object


class JsonSchemaFormat(_Body):
    name: str = Field("response", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: {"json": schema}, {"choice": [strings]} or {"regex": pattern}."""

    json_: dict[str, Any] | bool | None = Field(None, alias="json")
    choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    regex: str | None = Field(None, min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        if sum(v is not None for v in (self.json_, self.choice, self.regex)) != 1:
            raise ValueError("structured_outputs takes exactly one of json, choice, regex")
        return self


class ResponseFormat(_Body):
    """OpenAI's response_format: "text" (free), "json_object" (any JSON object) or "json_schema"
    (JSON valid for the schema; kiln_ray/engine/json_grammar.py lists what is enforced)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: dict[str, str]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class SamplingFields(_Body):
    """Sampling fields shared by chat, completions and batch completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="None, 0 or -1 disable it")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, validate_default=True, description="becomes a list")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    adapter: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}(@[1-9][0-9]{0,17})?$", description="Kiln: an adapter name[@version]")
    adapters: list["AdapterWeight"] | None = Field(None, min_length=1, max_length=4, description="compose adapters")
    response_format: ResponseFormat | None = None
    # vLLM's structured-output extensions (one of these or response_format, not two)
    guided_json: dict[str, Any] | None = None
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    guided_regex: str | None = Field(None, min_length=1, max_length=4096)
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _one_structure(self) -> SamplingFields:
        given = self._structures()
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} cannot be combined: give one")
        return self

    def _structures(self) -> list[str]:
        """The output-structure fields given (response_format "text" is none)."""
        given = [name for name in ("guided_json", "guided_choice", "guided_regex", "structured_outputs") if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        return given

    @property
    def wants_structure(self) -> bool:
        return bool(self._structures())

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 8:
            raise ValueError("at most 8 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (v or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids, got {key[:32]!r}")
            if not -100 <= value <= 100:
                raise ValueError("logit_bias values must be in [-100, 100]")
        return v


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.get("name") not in names:
                raise ValueError("tool_choice names a function that is not in tools")
        if self.tool_choice in ("required",) and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        if self.wants_structure and self.offered_tools:
            raise ValueError("response_format json_object / json_schema (or a guided_* field) cannot be combined "
                             "with tools (use tool_choice 'none', or leave out the format)")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def offered_tools(self) -> list[Tool] | None:
        """The tools rendered into the prompt (and whose calls are parsed): None for no tools
        or tool_choice "none", only the named one for a named function, else all of them."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.tool_choice.function.get("name")]
        return list(self.tools)

    @property
    def forced_call(self) -> ForcedCall | None:
        """The call the reply is made to start with: of a named function (a named tool_choice,
        or "required" with one tool), of any offered function ("required"), or None."""
        if not self.tools:
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return ForcedCall(self.tool_choice.function["name"])
        if self.tool_choice == "required":
            return ForcedCall(self.tools[0].function.name if len(self.tools) == 1 else None)
        return None

    @property
    def single_tool_call(self) -> bool:
        """At most one call, the reply ending with it: parallel_tool_calls false or a named
        function (OpenAI's named tool_choice yields exactly one call)."""
        return not self.parallel_tool_calls or isinstance(self.tool_choice, NamedToolChoice)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        prompt = self.prompt
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError("prompt must not be empty")
        if isinstance(prompt, list) and len(prompt) > MAX_BATCH_COMPLETIONS and not isinstance(prompt[0], int):
            raise ValueError(f"at most {MAX_BATCH_COMPLETIONS} prompts per request")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


class BatchCompletionRequest(SamplingFields):
    """Kiln's GRPO helper: several chat prompts x n completions, run together."""

    prompts: list[list[ChatMessage]] = Field(min_length=1)
    max_tokens: int = Field(256, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _checks(self) -> BatchCompletionRequest:
        if any(not p for p in self.prompts):
            raise ValueError("every prompt needs at least one message")
        if len(self.prompts) * self.n > MAX_BATCH_COMPLETIONS:
            raise ValueError(f"prompts x n must be <= {MAX_BATCH_COMPLETIONS} (got {len(self.prompts) * self.n})")
        return self


# -- training (Kiln's request shapes, extended) ------------------------------------------------

ADAPTER_NAME = r"^[A-Za-z0-9._-]{1,64}$"
MAX_TRAIN_EXAMPLES = 256
MAX_GRPO_GROUPS = 64


class TrainJobConfig(_Body):
    """Per-job settings; absent fields take the server's defaults."""

    output_name: str | None = Field(None, pattern=ADAPTER_NAME, description="Kiln's name for `adapter`")
    epochs: int | None = Field(None, ge=1, le=1000)
    steps: int | None = Field(None, ge=1, le=1000)
    learning_rate: float | None = Field(None, gt=0, le=1.0)
    lora_rank: int | None = Field(None, ge=1, le=512)  # and at most engine.max_lora_rank (training_routes)
    lora_alpha: float | None = Field(None, gt=0)
    from_scratch: bool = False
    activate: bool = False
    publish_every: int | None = Field(None, ge=1)
    replay_per_step: int | None = Field(None, ge=0, le=64)
    early_stop_loss: float | None = Field(None, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)
    kl_coeff: float | None = Field(None, ge=0)
    clip_epsilon: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    webhook_url: str | None = Field(None, pattern=r"^https?://")


class SftExample(_Body):
    messages: list[ChatMessage] = Field(min_length=2)


class SftRequest(_Body):
    adapter: str | None = Field(None, pattern=ADAPTER_NAME)
    examples: list[SftExample] = Field(min_length=1, max_length=MAX_TRAIN_EXAMPLES)
    config: TrainJobConfig = TrainJobConfig()


class GrpoCompletion(_Body):
    text: str
    reward: float


class GrpoGroup(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    completions: list[GrpoCompletion] = Field(min_length=2, max_length=64)


class GrpoRequest(_Body):
    adapter: str | None = Field(None, pattern=ADAPTER_NAME)
    groups: list[GrpoGroup] = Field(min_length=1, max_length=MAX_GRPO_GROUPS)
    config: TrainJobConfig = TrainJobConfig()


# -- adapters ------------------------------------------------------------------------------------


class AdapterRefBody(_Body):
    name: str = Field(pattern=ADAPTER_NAME)
    version: int | None = Field(None, ge=1)


class RollbackRequest(_Body):
    version: int = Field(ge=1)


class MergeSource(_Body):
    name: str = Field(pattern=ADAPTER_NAME)
    version: int | None = Field(None, ge=1)
    weight: float = 1.0


class MergeRequest(_Body):
    name: str = Field(pattern=ADAPTER_NAME, description="the merged adapter's name")
    adapters: list[MergeSource] = Field(min_length=2, max_length=8)
    method: Literal["weighted_average", "ties", "concat"] = "weighted_average"
    density: float = Field(0.5, gt=0, le=1)


# POST /v1/adapters/upload reads its multipart form itself (to bound its size before parsing),
# so FastAPI cannot derive the body from a model: this is its OpenAPI description.
UPLOAD_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object",
    "required": ["file", "name"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "a PEFT LoRA adapter as tar.gz"},
        "name": {"type": "string", "pattern": ADAPTER_NAME},
        "activate": {"type": "boolean", "default": False, "description": "serve it as the default adapter"},
    },
}}}}}


class AdapterWeight(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}(@[1-9][0-9]{0,17})?$")
    scale: float = Field(1.0, ge=-10, le=10)


SamplingFields.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
BatchCompletionRequest.model_rebuild()
