"""Wire schemas: the OpenAI request and response shapes, field for field, plus our additive
fields (``steering`` on requests). Validation of single fields lives here; checks that need
the model or the registry live in the routes."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)

from steering.sampling import MAX_SEED
from steering.vector import NAME_PATTERN

VectorName = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
Coefficient = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# torch seeds a generator from any integer in [-2**63, 2**64 - 1] (a negative seed s acts as
# s + 2**64) and raises outside it; that covers OpenAI's and vLLM's signed 64-bit seeds and
# unsigned 64-bit ones.
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=MAX_SEED)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SteeringEntry(_Strict):
    """Add ``coefficient`` x ``vector`` at ``layers`` (default: the vector's recommended layer)."""

    vector: VectorName
    coefficient: Coefficient
    layers: list[StrictInt] | None = Field(None, min_length=1, max_length=256)
    positions: Literal["all", "prompt", "response"] = "all"
    unit: Literal["raw", "unit", "residual"] = "raw"


class RemediationEntry(SteeringEntry):
    """A monitor's remediation entry: steering on generated tokens only (the prompt is read
    before the monitor decides)."""

    positions: Literal["response"] = "response"


# Either the full list, or the shorthand {"optimistic": 1.5}.
SteeringField = list[SteeringEntry] | dict[VectorName, Coefficient] | None


def steering_entries(value: SteeringField) -> list[SteeringEntry]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [SteeringEntry(vector=k, coefficient=v) for k, v in value.items()]
    return list(value)


class MonitorRequestOptions(_Strict):
    """Per-request monitor options (``"monitor": {"return_scores": true}``)."""

    return_scores: bool = False


class _OpenAIRequest(BaseModel):
    """An OpenAI-shaped request: a field this server does not implement is refused (400 naming
    it), never ignored, so a client never gets an answer other than the one it asked for. A field
    sent as ``null`` counts as not sent, as OpenAI reads it (clients send ``"tools": null``)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_OpenAIRequest):
    include_usage: bool = False


class _Informational(_OpenAIRequest):
    """Fields OpenAI clients send that describe the caller or ask for OpenAI-side bookkeeping; they
    do not change the answer, so they are accepted and ignored (this server stores nothing)."""

    user: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None


class _GenerationFields(_Informational):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=16)
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = Field(
        None, max_length=1024)
    # vLLM's extras: sampling controls, and fixed output lengths for benchmarks and load tests.
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, allow_inf_nan=False)
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=64)
    ignore_eos: bool = False
    min_tokens: StrictInt = Field(0, ge=0)
    steering: SteeringField = None
    monitor: MonitorRequestOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


class TextPart(_OpenAIRequest):
    type: Literal["text"]
    text: str


class ChatMessage(_OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return v

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_GenerationFields):
    prompt: str | list[StrictInt] | list[str] = Field(...)
    logprobs: StrictInt | None = Field(None, ge=0, le=20)

    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], str):
                if len(v) != 1:
                    raise ValueError("only one prompt per request is supported")
                return v[0]
        elif not v:
            raise ValueError("prompt must not be empty")
        return v


class ModelCard(BaseModel):
    """One entry of ``/v1/models``, as vLLM shows it: ``root`` is the model an alias serves."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "persona-server"
    root: str
    parent: str | None = None
    max_model_len: int


class LoadLoraAdapterRequest(_Strict):
    """vLLM's ``POST /v1/load_lora_adapter`` body: a PEFT directory on the server's disk."""

    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(_Strict):
    """vLLM's ``POST /v1/unload_lora_adapter`` body."""

    lora_name: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_OpenAIRequest):
    """Body of ``POST /tokenize`` (vLLM's): a text ``prompt`` or chat ``messages``, exactly one.

    ``add_special_tokens`` defaults as vLLM's do, to the ids the generation routes use: on for a
    prompt (a completion's prompt gets the tokenizer's BOS), off for messages (the chat template
    writes its own)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_OpenAIRequest):
    """Body of ``POST /detokenize`` (vLLM's)."""

    model: str | None = None
    tokens: list[StrictInt] = Field(max_length=1_000_000)


class VectorUpload(_Strict):
    """JSON form of a vector upload (the other form is a safetensors file)."""

    directions: list[list[float]]
    description: str = ""
    method: str = "uploaded"
    recommended_layer: StrictInt | None = None
    coefficient_range: tuple[float, float] | None = None

    @field_validator("directions")
    @classmethod
    def _finite(cls, v):
        if not v or len({len(row) for row in v}) != 1:
            raise ValueError("directions must be a non-empty matrix [num_layers + 1][hidden]")
        if any(not math.isfinite(x) for row in v for x in row):
            raise ValueError("directions must be finite numbers")
        return v



class MonitorPut(_Strict):
    """Body of ``PUT /v1/monitors/{vector}``; see :class:`steering.monitor.MonitorConfig`."""

    layer: StrictInt | None = None
    score: Literal["projection", "z"] = "z"
    flag_threshold: float | None = Field(None, allow_inf_nan=False)
    block_threshold: float | None = Field(None, allow_inf_nan=False)
    mode: Literal["enforce", "annotate", "off"] = "annotate"
    response_threshold: float | None = Field(None, allow_inf_nan=False)
    response_min_tokens: StrictInt = Field(4, ge=1, le=4096)
    steering_min: float | None = Field(None, allow_inf_nan=False)
    steering_max: float | None = Field(None, allow_inf_nan=False)
    remediation: list[RemediationEntry] | None = Field(None, min_length=1, max_length=16)
    remediate_threshold: float | None = Field(None, allow_inf_nan=False)


class CalibrateRequest(_Strict):
    """Body of ``POST /v1/monitors/{vector}/calibrate``."""

    prompts: list[Annotated[str, Field(min_length=1, max_length=20_000)]] | None = Field(None, min_length=2, max_length=5000)
    target_flag_rate: float = Field(0.05, gt=0.0, lt=1.0)
    target_block_rate: float = Field(0.01, gt=0.0, lt=1.0)
    apply: bool = True


class ExtractRequest(_Strict):
    """Body of ``POST /v1/vectors/extract``: a trait definition (inline or a shipped one's name)."""

    trait: dict | None = None
    trait_name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    name: VectorName | None = None
    # None: the definition's ``extraction.method``, else contrastive_texts.
    method: Literal["contrastive_texts", "contrastive_prompts", "labelled_sentences"] | None = None
    sweep: bool = True
    # A loaded LoRA adapter to extract through (its states, not the base model's); None: the base model.
    model: str | None = Field(None, max_length=200)


class AssessRequest(_Strict):
    """Body of ``POST /v1/assess``."""

    inventory: Literal["mbti", "big5"] = "mbti"
    # A loaded LoRA adapter to assess (None or the served model's name: the base model).
    model: str | None = Field(None, max_length=200)
    repetitions: StrictInt = Field(30, ge=2, le=100)
    steering: SteeringField = None
    compare: bool = False
    seed: Seed = 0
    background: bool = False
