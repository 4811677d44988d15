"""Request bodies of the OpenAI and TGI routes, validated by pydantic (field names as the protocols say).

Every body is strict: JSON types are not coerced ("stream": "yes" and `prompt: [true]` are refused),
numbers must be finite and within the range the engine can hold, and text must be valid Unicode
(no lone surrogates), so whatever a client sends fails at the edge with the field named, never inside
the engine.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from llamaforge.errors import TokenizerError
from llamaforge.structured import GrammarError, json_schema_grammar, regex_grammar
from llamaforge.tokenizer import check_text

MAX_STOP_SEQUENCES = 4
MAX_PROMPTS = 64  # prompts in one completions request (each becomes a request of the engine)
MAX_CHOICES = 64  # prompts x n: the engine requests one request may open
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's limit)
INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1


def _valid_unicode(value: str) -> str:
    try:
        check_text(value)
    except TokenizerError as exc:
        raise ValueError(str(exc)) from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
# Counts of tokens: anything past int64 could not be a real budget, and must not reach a tensor.
TokenCount = Annotated[int, Field(ge=1, le=INT64_MAX)]


class Body(BaseModel):
    """Strict, finite, unknown fields ignored (as OpenAI-compatible servers do)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


def _stop_list(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop sequences must be non-empty strings")
    return stops


# --- OpenAI ------------------------------------------------------------------------------------------

class TextPart(Body):
    type: Literal["text"]
    text: Text


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(Body):
    include_usage: bool = False


class OpenAIRequest(Body):
    """What chat and completions requests share."""

    model: Text | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: Text | list[Text] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's JSON) -> bias in [-100, 100]
    # OpenAI features llamaforge does not have: refused when used, rather than silently ignored.
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} token biases, got {len(value)}")
        for token, bias in value.items():
            if not token.isdigit() or not token.isascii():
                raise ValueError(f"keys are token ids (digits), got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {token}")
        return value

    def sampling(self) -> dict:
        """SamplingParams keywords that chat and completions share."""
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "stop": tuple(self.stop),
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logit_bias": tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items())}

    @field_validator("tools", "functions")
    @classmethod
    def _not_used(cls, value: dict | list | None, info: ValidationInfo) -> None:
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server; leave it out")
        return None

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_call(cls, value: str | dict | None, info: ValidationInfo) -> None:
        if value not in (None, "none", "auto"):
            raise ValueError(f"{info.field_name} {value!r} asks for tool calls, which this server does not make; "
                             "leave it out")
        return None

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value: dict | None) -> dict | None:
        if value is None or value.get("type") == "text":
            return None
        if value.get("type") == "json_object":
            return value
        if value.get("type") == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ValueError("json_schema must be an object whose 'schema' is a JSON schema object")
            return value
        raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', got {value.get('type')!r}")

    def grammar(self) -> str | None:
        """The grammar response_format asks the answer to follow (None: free text); GrammarError names it."""
        if self.response_format is None:
            return None
        schema = self.response_format.get("json_schema", {}).get("schema") \
            if self.response_format["type"] == "json_schema" else None
        try:
            return json_schema_grammar(schema)
        except GrammarError as exc:
            raise GrammarError(f"response_format: {exc}") from None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        return _stop_list(value)


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(OpenAIRequest):
    prompt: Text | list[int] | list[Text] | list[list[int]] = Field(
        description="a prompt (text, or token ids used as given) or a list of them, answered as choices in order")
    # 0: no new tokens, for scoring a prompt (echo with logprobs), as OpenAI's legacy completions allowed.
    max_tokens: int | None = Field(16, ge=0, le=INT64_MAX)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)  # candidates per prompt, of which the n likeliest return

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> None:
        if value:
            raise ValueError("suffix (insertion) is not supported: Llama 2 has no fill-in-the-middle; leave it out")
        return None


    @field_validator("prompt")
    @classmethod
    def _some_prompts(cls, value: str | list[int] | list[str] | list[list[int]]) -> str | list[int] | list:
        prompts = value if isinstance(value, list) and value and isinstance(value[0], str | list) else [value]
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        if any(not prompt for prompt in prompts):
            raise ValueError("a prompt is empty")
        return value

    @model_validator(mode="after")
    def _stream_one_prompt(self) -> CompletionRequest:
        if self.stream and len(self.prompts()) > 1:
            raise ValueError("stream takes one prompt; send several prompts without streaming, or one request each")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.stream and self.candidates() > self.n:
            raise ValueError("best_of cannot stream: the best candidates are known only at the end")
        if len(self.prompts()) * self.candidates() > MAX_CHOICES:
            raise ValueError(f"n or best_of ({self.candidates()}) times the {len(self.prompts())} prompts exceeds "
                             f"{MAX_CHOICES} choices")
        return self

    def candidates(self) -> int:
        """Answers generated per prompt: best_of, else n."""
        return self.best_of or self.n

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, one or several."""
        value = self.prompt
        return list(value) if isinstance(value, list) and isinstance(value[0], str | list) else [value]


class LoadAdapterRequest(Body):
    lora_name: Text = Field(min_length=1, max_length=200)
    lora_path: Text = Field(min_length=1)


class UnloadAdapterRequest(Body):
    lora_name: Text = Field(min_length=1, max_length=200)


# --- TGI ---------------------------------------------------------------------------------------------

# Parameters TGI has and llamaforge does not implement. huggingface_hub's InferenceClient retries
# without them when the server names them in transformers' "model_kwargs are not used" message.
TGI_UNSUPPORTED = ("typical_p", "watermark", "top_n_tokens", "decoder_input_details")
MAX_BEST_OF = 4  # TGI's /info max_best_of


class TGIParameters(Body):
    max_new_tokens: TokenCount | None = None
    temperature: float | None = Field(None, gt=0.0)
    top_k: int | None = Field(None, gt=0, le=INT64_MAX)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop: list[Text] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)  # TGI's seed is a u64
    do_sample: bool = False
    details: bool = False
    return_full_text: bool | None = False
    truncate: TokenCount | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF)
    typical_p: float | None = None
    watermark: bool = False
    top_n_tokens: int | None = None
    grammar: dict | None = None
    adapter_id: Text | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    decoder_input_details: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str]) -> list[str]:
        return _stop_list(value)

    @field_validator("grammar")
    @classmethod
    def _known_grammar(cls, value: dict | None) -> dict | None:
        if value is None:
            return None
        kind, spec = value.get("type"), value.get("value")
        json_ok = kind in ("json", "json_object") and isinstance(spec, dict | str)
        if json_ok or kind == "regex" and isinstance(spec, str):
            return value
        raise ValueError("grammar must be {'type': 'json', 'value': a JSON schema} or {'type': 'regex', 'value': "
                         f"a pattern}}, got {value!r}"[:300])

    def grammar_text(self) -> str | None:
        """The llguidance grammar of `grammar` (None: free text); GrammarError names the parameter."""
        if self.grammar is None:
            return None
        spec = self.grammar["value"]
        try:
            if self.grammar["type"] == "regex":
                return regex_grammar(spec)
            return json_schema_grammar(json.loads(spec) if isinstance(spec, str) else spec)
        except (GrammarError, ValueError) as exc:
            raise GrammarError(f"parameters.grammar: {exc}") from None

    def unsupported(self) -> list[str]:
        """Names of TGI parameters set to something llamaforge cannot honour."""
        return [name for name in TGI_UNSUPPORTED if getattr(self, name) not in (None, False)]

    def sampling(self) -> dict:
        """SamplingParams keywords, with TGI's rule: greedy unless do_sample or a sampling knob is set."""
        samples = self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p))
        return {
            "temperature": (self.temperature or 1.0) if samples else 0.0,
            "top_p": self.top_p or 1.0,
            "top_k": self.top_k or 0,
            "repetition_penalty": self.repetition_penalty or 1.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "seed": self.seed,
            "stop": tuple(self.stop),
        }


class TGIRequest(Body):
    inputs: Text = Field(min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class TokenizeRequest(Body):
    inputs: Text
    add_special_tokens: bool = True
