"""Request bodies of the OpenAI and TGI routes, validated by pydantic (field names as the protocols say)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4


def _stop_list(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop sequences must be non-empty strings")
    return stops


# --- OpenAI ------------------------------------------------------------------------------------------

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """What chat and completions requests share; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        return _stop_list(value)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported; send separate requests (with different seeds) for more choices")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("presence and frequency penalties are not supported; leave them at 0")
        return value


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(OpenAIRequest):
    prompt: str | list[int] | list[str] = Field(description="one prompt: text, or token ids used as given")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("only one prompt per request is supported; send one request per prompt")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value


# --- TGI ---------------------------------------------------------------------------------------------

# Parameters TGI has and llamaforge does not implement. huggingface_hub's InferenceClient retries
# without them when the server names them in transformers' "model_kwargs are not used" message.
TGI_UNSUPPORTED = ("best_of", "typical_p", "watermark", "top_n_tokens", "grammar", "adapter_id",
                   "frequency_penalty", "decoder_input_details")


class TGIParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0.0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0)
    do_sample: bool = False
    details: bool = False
    return_full_text: bool | None = False
    truncate: int | None = Field(None, ge=1)
    best_of: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    top_n_tokens: int | None = None
    grammar: dict | None = None
    adapter_id: str | None = None
    frequency_penalty: float | None = None
    decoder_input_details: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str]) -> list[str]:
        return _stop_list(value)

    def unsupported(self) -> list[str]:
        """Names of TGI parameters set to something llamaforge cannot honour."""
        return [name for name in TGI_UNSUPPORTED
                if getattr(self, name) not in (None, False) and not (name == "best_of" and self.best_of == 1)]

    def sampling(self) -> dict:
        """SamplingParams keywords, with TGI's rule: greedy unless do_sample or a sampling knob is set."""
        samples = self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p))
        return {
            "temperature": (self.temperature or 1.0) if samples else 0.0,
            "top_p": self.top_p or 1.0,
            "top_k": self.top_k or 0,
            "repetition_penalty": self.repetition_penalty or 1.0,
            "seed": self.seed,
            "stop": tuple(self.stop),
        }


class TGIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class TokenizeRequest(BaseModel):
    inputs: str
    add_special_tokens: bool = True
