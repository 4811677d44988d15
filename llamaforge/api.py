"""`llamaforge.load(source) -> LLM`: the one object the CLI, server, trainer and evaluator use."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from llamaforge import hugepages
from llamaforge.adapters import AdapterStack
from llamaforge.chat import encode_dialog
from llamaforge.checkpoint import DEMO, load_checkpoint, resolve
from llamaforge.checkpoint.hub import looks_like_repo_id
from llamaforge.config import ModelArgs
from llamaforge.errors import CheckpointError, GenerationError, TokenizerError
from llamaforge.generate import Generation, collect, fit_prompt, generate_events
from llamaforge.lora import AdapterError, load_adapter, merge_lora
from llamaforge.model import Llama
from llamaforge.quantize import (
    MODES,
    check_batch_invariant,
    parse_mode,
    quantize_linears_nf4,
    quantize_model,
    use_bf16_kernel,
    use_fused_decode,
    weight_quantizer,
)
from llamaforge.sampling import SamplingParams
from llamaforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Prompt = str | list[int]
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


MANIFEST = "llamaforge_manifest.json"  # what finetune writes beside its outputs
SPECULATE_MAX = 15  # a verify step's drafts plus one token stay within the bf16 kernel's 16 tokens


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name such as "bf16" (None stays None: keep the stored dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class LLM:
    """A model with its tokenizer: generate, chat and stream, in Meta's chat format."""

    def __init__(self, model: Llama, tokenizer: Tokenizer | None, source: str = "", format: str = "",
                 compile: bool = False, speculate: int = 0, draft: Llama | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config: ModelArgs = model.config
        self.source = source
        self.format = format
        self.compile = compile  # decode steps run torch.compile'd (generate.Decoder)
        self.speculate = speculate  # draft up to this many tokens a step (generate.speculative_events)
        self.draft = draft  # the model that drafts them (None: prompt lookup)
        self.adapters: AdapterStack | None = None  # LoRA adapters served beside the base (llamaforge.adapters)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerError(
                f"{self.source or 'this model'} was loaded without a tokenizer, so it takes token ids only; "
                "put tokenizer.model beside the weights or pass tokenizer=PATH to load()"
            )
        return self.tokenizer

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: a str gets BOS, a list of ids is used exactly as given."""
        if isinstance(prompt, str):
            return self._require_tokenizer().encode(prompt, bos=True)
        if not all(isinstance(t, int) and 0 <= t < self.config.vocab_size for t in prompt):
            raise GenerationError(f"a token-id prompt must hold ints in [0, {self.config.vocab_size})")
        return list(prompt)

    def chat_tokens(self, messages: Sequence[dict]) -> list[int]:
        """The dialog's token ids in Meta's Llama 2 chat format."""
        return encode_dialog(self._require_tokenizer(), messages)

    def generate(self, prompt: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
                 truncate: bool = False, **sampling: Any) -> Generation | list[Generation]:
        """Continue a prompt (or a batch of prompts); `out.text` is the text that follows the prompt's text."""
        prompts, single = _as_batch(prompt)
        results = self._run([self.encode_prompt(p) for p in prompts], _params(params, sampling), truncate, True)
        return results[0] if single else results

    def chat(self, messages: Sequence[dict], params: SamplingParams | None = None, truncate: bool = False,
             **sampling: Any) -> Generation:
        """Answer the last user message; `out.text` is decoded as Meta's chat_completion decodes it."""
        return self._run([self.chat_tokens(messages)], _params(params, sampling), truncate, False)[0]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, truncate: bool = False,
               **sampling: Any) -> Iterator[str]:
        """Text deltas of `generate(prompt)`; they add up to its `text`."""
        return self._stream(self.encode_prompt(prompt), _params(params, sampling), truncate, True)

    def stream_chat(self, messages: Sequence[dict], params: SamplingParams | None = None, truncate: bool = False,
                    **sampling: Any) -> Iterator[str]:
        """Text deltas of `chat(messages)`."""
        return self._stream(self.chat_tokens(messages), _params(params, sampling), truncate, False)

    def _fit(self, prompt_ids: list[int], params: SamplingParams, truncate: bool) -> list[int]:
        return fit_prompt(prompt_ids, params.max_new_tokens, self.config.context_length, truncate)

    def _run(self, prompts: list[list[int]], params: SamplingParams, truncate: bool,
             prompt_as_context: bool) -> list[Generation]:
        prompts = [self._fit(p, params, truncate) for p in prompts]
        batch_params = [params] * len(prompts)
        timings: dict[str, float] = {}
        events = generate_events(self.model, self.tokenizer, prompts, batch_params, prompt_as_context, timings,
                                 self.compile, self.speculate, self.draft)
        results = collect(events, prompts, batch_params)
        for result in results:
            result.timings = timings
        return results

    def _stream(self, prompt_ids: list[int], params: SamplingParams, truncate: bool,
                prompt_as_context: bool) -> Iterator[str]:
        prompt_ids = self._fit(prompt_ids, params, truncate)
        for event in generate_events(self.model, self._require_tokenizer(), [prompt_ids], [params],
                                     prompt_as_context, compile=self.compile, speculate=self.speculate,
                                     draft_model=self.draft):
            if event.text:
                yield event.text


def _as_batch(prompt: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        return [prompt], True
    if isinstance(prompt, (list, tuple)) and prompt:
        return list(prompt), False
    raise GenerationError("the prompt is empty; pass a string, a list of token ids, or a list of those")


def _params(params: SamplingParams | None, sampling: dict[str, Any]) -> SamplingParams:
    if params is not None and sampling:
        raise GenerationError(f"pass sampling values either as params= or as keywords, not both ({sorted(sampling)})")
    if params is not None:
        return params
    try:
        return SamplingParams(**sampling)
    except TypeError as exc:
        raise GenerationError(f"unknown generation option: {exc}") from None


@functools.cache
def _advise_huge_pages() -> None:
    """Say once per process how to put the weights on huge pages, where they are not (llamaforge/hugepages.py)."""
    advice = hugepages.advice()
    if advice is not None:
        log.warning(advice)


def load(source: str | Path | None = None, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, tokenizer: str | Path | None = None,
         adapter: str | Path | None = None, merge_adapter: bool = True, quantize: str | None = "auto",
         group_size: int | None = None, compile: bool = False, speculate: int = 0,
         draft_model: str | Path | None = None, batch_invariant: bool = False) -> LLM:
    """Load a Llama 2 model: HF directory, hub repo id, Meta directory or llama2.c .bin; with no source
    (or "demo"), the small demo chat model built into the package, which needs no download.

    `adapter` (a peft LoRA directory or hub id) is put on the model and, unless `merge_adapter` is
    False, folded into its weights so generation costs what the base model costs.
    `quantize="int8"` or `"int4"` stores the linear layers as integer codes for fast inference (int4 in groups
    of `group_size` weights, default 32; int8 per output row unless `group_size` is given), after any adapter
    is merged. Linear layers a GGUF stores as Q8_0 / Q4_0 / Q4_K / Q5_K / Q6_K stay as they are (also with "auto", the
    default; other quantized types become int8),
    so a llama.cpp file runs at its own size; `quantize=None` dequantizes them. `quantize="nf4"` stores the
    linear layers in QLoRA's 4-bit NormalFloat; "auto" does so only for an adapter that llamaforge trained
    with QLoRA, whose base was 4-bit in training (merging then dequantizes first, so the merged weights are
    exactly the ones the adapter was trained against).

    `compile=True` runs decode steps torch.compile'd: the first generation pays for compiling (tens of seconds,
    cached by torch across processes), later ones decode faster (docs/benchmarks.md). `speculate=K` drafts up
    to K tokens a step when one prompt is generated (greedy output unchanged, sampling's distribution unchanged):
    with `draft_model` (a smaller model of the same vocabulary, loaded like this one; K defaults to 4), else by
    prompt lookup. The server's engine speculates the same way for every request it runs.

    `batch_invariant=True` (bfloat16 or int8 / int4 CPU models) makes every row's numbers independent of how its
    prompt is chunked, cached or batched, to the last bit (int8 / int4 models are so already): bfloat16 linears
    then run the bfloat16 kernel for prompts too: prefill 1.4-1.7x slower on AVX-512 CPUs (docs/benchmarks.md;
    on AVX2 ones they take it anyway).
    """
    if draft_model is not None and not speculate:
        speculate = 4
    if not isinstance(speculate, int) or not 0 <= speculate <= SPECULATE_MAX:
        raise GenerationError(f"speculate={speculate!r}: draft 0 (off) to {SPECULATE_MAX} tokens a step")
    source = DEMO if source is None else source
    # Settings and the adapter are checked first: a mistake there should not cost loading the weights.
    if quantize not in ("auto", None, "none", "nf4", *MODES):
        raise CheckpointError(f"quantize={quantize!r}: use 'int8', 'int4', 'nf4' (QLoRA's 4-bit NormalFloat), "
                              "'auto' or None")
    if group_size is not None and quantize not in MODES:
        raise CheckpointError(f"group_size={group_size} applies to quantize='int8' or 'int4', not {quantize!r}")
    if quantize in MODES:
        try:
            parse_mode(quantize, group_size)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        if adapter is not None and not merge_adapter:
            raise CheckpointError(f"quantize={quantize!r} stores the merged weights; drop merge_adapter=False")
    adapter_path = None
    if adapter is not None:
        if not Path(adapter).expanduser().exists() and not looks_like_repo_id(str(adapter)):
            raise AdapterError(f"adapter {adapter} does not exist; pass a directory holding adapter_config.json "
                               "and adapter_model.safetensors (from llamaforge finetune or peft), or a hub id")
        adapter_path = resolve(adapter)
    # A GGUF's quantized weights stay quantized unless asked otherwise, or an adapter must merge into them.
    keep_quantized = quantize in ("auto", *MODES) and adapter_path is None
    if quantize == "auto":
        quantize = "nf4" if adapter_path is not None and trained_on_nf4(adapter_path) else None
    # int8 / int4 without an adapter to merge: each linear is quantized as it is read (the float model never whole).
    streamed = weight_quantizer(quantize, group_size) if quantize in MODES and adapter_path is None else None
    checkpoint = load_checkpoint(source, parse_dtype(dtype), device, tokenizer, keep_quantized, streamed)
    if quantize == "nf4":
        quantize_linears_nf4(checkpoint.model)
    if adapter_path is not None:
        load_adapter(checkpoint.model, adapter_path)
        if merge_adapter:
            merge_lora(checkpoint.model)
        checkpoint.model.eval()
    if quantize in MODES:
        quantize_model(checkpoint.model, quantize, group_size)
    use_bf16_kernel(checkpoint.model, batch_invariant)  # dense bfloat16 CPU linears: the bfloat16 kernel
    if batch_invariant:
        try:
            check_batch_invariant(checkpoint.model)
        except ValueError as exc:
            raise GenerationError(str(exc)) from None
    use_fused_decode(checkpoint.model)  # bfloat16 CPU models (int8 / int4 too): one C call a step for all layers
    if checkpoint.model.device.type == "cpu":
        _advise_huge_pages()
    draft = None
    if draft_model is not None:
        draft = load_checkpoint(draft_model, checkpoint.model.dtype, checkpoint.model.device).model
        check_draft_vocabulary(checkpoint.model.config, draft.config, draft_model)
        use_bf16_kernel(draft)
    return LLM(checkpoint.model, checkpoint.tokenizer, str(source), checkpoint.format, compile, speculate, draft)


def check_draft_vocabulary(config: ModelArgs, draft: ModelArgs, source: str | Path) -> None:
    """Refuse a draft model whose token ids do not mean the model's (its vocabulary differs in size or ids)."""
    if (draft.vocab_size, draft.bos_token_id, draft.eos_token_id) != (config.vocab_size, config.bos_token_id,
                                                                        config.eos_token_id):
        raise GenerationError(f"the draft model {source} has a {draft.vocab_size}-token vocabulary (BOS "
                              f"{draft.bos_token_id}, EOS {draft.eos_token_id}) but the model {config.vocab_size} "
                              f"(BOS {config.bos_token_id}, EOS {config.eos_token_id}); a draft model must share "
                              "the model's tokenizer")


def trained_on_nf4(adapter: Path) -> bool:
    """Whether llamaforge's manifest beside an adapter says it was trained with QLoRA (a 4-bit base)."""
    manifest = adapter / MANIFEST
    try:
        return json.loads(manifest.read_text()).get("method") == "qlora"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
