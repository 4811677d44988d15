"""The Llama 2 chat format against an independent transcription of Meta's chat_completion."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llamaforge.chat import encode_dialog, render_dialog, validate_dialog
from llamaforge.errors import ChatFormatError
from llamaforge.tokenizer import Tokenizer

DIALOGS = {
    "single turn": [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    "system prompt": [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
    "empty system prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "Hello"}],
    "multi turn": [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": "Paris, the capital of France, is known for the Eiffel Tower."},
        {"role": "user", "content": "What is so great about #1?"},
    ],
    "system and multi turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ],
    "whitespace": [
        {"role": "system", "content": "  padded system  \n"},
        {"role": "user", "content": "\n  lots of space around  \t"},
        {"role": "assistant", "content": "   answer with spaces   "},
        {"role": "user", "content": "  again  "},
    ],
    "non-ascii and emoji": [
        {"role": "user", "content": "Wie spät ist es in Zürich? 東京は? 🦙🎉"},
        {"role": "assistant", "content": "Il est midi, señor. 😀"},
        {"role": "user", "content": "Merci ! ¿Y mañana?"},
    ],
}


def meta_chat_tokens(sp, dialog: list[dict]) -> list[int]:
    """Meta's llama/generation.py chat_completion, transcribed on a bare SentencePieceProcessor."""
    if dialog[0]["role"] == "system":
        merged = "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]
        dialog = [{"role": dialog[1]["role"], "content": merged}] + dialog[2:]
    tokens: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):
        text = f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} "
        tokens += [sp.bos_id()] + sp.encode(text)
        tokens += [sp.eos_id()]
    tokens += [sp.bos_id()] + sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")
    return tokens


@pytest.mark.parametrize("name", DIALOGS)
def test_chat_tokens_equal_meta_reference(llama_tokenizer_path: Path, name: str) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    expected = meta_chat_tokens(sp, DIALOGS[name])
    ids = encode_dialog(Tokenizer(llama_tokenizer_path), DIALOGS[name])
    assert ids == expected
    assert ids.count(1) == sum(m["role"] == "user" for m in DIALOGS[name])  # one BOS per exchange, never doubled


def test_known_single_turn_ids(llama_tokenizer_path: Path) -> None:
    """"[INST]" and "[/INST]" tokenize to Llama 2's well-known ids."""
    ids = encode_dialog(Tokenizer(llama_tokenizer_path), [{"role": "user", "content": "Hi"}])
    assert ids == [1, 518, 25580, 29962, 6324, 518, 29914, 25580, 29962]


def test_render_shows_the_prompt_text() -> None:
    text = render_dialog(DIALOGS["system and multi turn"])
    assert text == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
        "<s>[INST] Name a color. [/INST] Blue. </s>"
        "<s>[INST] Another? [/INST]"
    )


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
@pytest.mark.parametrize("index", [0, 1])
def test_special_tags_are_refused(tag: str, index: int) -> None:
    dialog = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]
    dialog[index]["content"] += f" {tag} sneaky"
    with pytest.raises(ChatFormatError, match=rf"message {index} .*control tag '{re.escape(tag)}'"):
        validate_dialog(dialog)


@pytest.mark.parametrize(("dialog", "message"), [
    ([], "the dialog is empty"),
    ([{"role": "assistant", "content": "hi"}], "message 0 has role 'assistant' where 'user' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "message 1 has role 'user' where 'assistant' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     "the last message .* must have role 'user'"),
    ([{"role": "system", "content": "a"}], "the last message .* must have role 'user'"),
    ([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "message 1 has role 'system'"),
    ([{"role": "user"}], "message 0 must be an object with 'role' and 'content'"),
    ([{"role": "user", "content": 3}], "content must be a string"),
])
def test_bad_role_order_names_the_message(dialog: list[dict], message: str) -> None:
    with pytest.raises(ChatFormatError, match=message):
        validate_dialog(dialog)


@pytest.mark.parametrize("name", DIALOGS)
def test_the_jinja_template_renders_the_same_prompt(name: str) -> None:
    """The chat template written into exported GGUF files formats every dialog as llamaforge does."""
    jinja2 = pytest.importorskip("jinja2")
    from llamaforge.chat import JINJA_TEMPLATE

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    template = jinja2.Environment().from_string(JINJA_TEMPLATE)
    rendered = template.render(messages=DIALOGS[name], bos_token="<s>", eos_token="</s>",
                               raise_exception=raise_exception)
    assert rendered == render_dialog(DIALOGS[name])


def test_a_saved_model_folder_formats_chats_in_transformers(llama_tokenizer_path: Path, tmp_path: Path) -> None:
    """What `merge` and full fine-tuning write: transformers' apply_chat_template gives llamaforge's ids."""
    transformers = pytest.importorskip("transformers")
    from factories import random_model

    from llamaforge.chat import JINJA_TEMPLATE
    from llamaforge.checkpoint.hf import save_hf_dir
    from llamaforge.config import ModelArgs

    tokenizer = Tokenizer(llama_tokenizer_path)
    model = random_model(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=32000, hidden_dim=64, max_seq_len=64))
    folder = save_hf_dir(model.state_dict(), model.config, tmp_path / "model", tokenizer, chat_template=JINJA_TEMPLATE)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for name, dialog in DIALOGS.items():
        assert theirs.apply_chat_template(dialog, tokenize=False) == render_dialog(dialog)
        if name == "whitespace":  # transformers' tokenizer splits "\n  padded" as "▁▁" "p", SentencePiece "▁" "▁p"
            continue
        ids = theirs.apply_chat_template(dialog, tokenize=True)
        assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == encode_dialog(tokenizer, dialog)
