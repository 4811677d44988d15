"""Tokenizers: Llama 2 reference encodings, SentencePiece = tokenizer.json = llama2.c .bin, streaming."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llamaforge.errors import TokenizerError
from llamaforge.tokenizer import StreamDecoder, Tokenizer

# llama2.c test.c: the Llama 2 tokenizer with BOS prepended.
TEST_C_CASES = [
    ("", [1]),
    ("I believe the meaning of life is", [1, 306, 4658, 278, 6593, 310, 2834, 338]),
    ("Simply put, the theory of relativity states that ",
     [1, 3439, 17632, 1925, 29892, 278, 6368, 310, 14215, 537, 5922, 393, 29871]),
    ("A brief message congratulating the team on the launch:\n\n        Hi everyone,\n\n        I just ",
     [1, 319, 11473, 2643, 378, 629, 271, 18099, 278, 3815, 373, 278, 6826, 29901, 13, 13, 4706, 6324, 14332,
      29892, 13, 13, 4706, 306, 925, 29871]),
    ("Translate English to French:\n\n        sea otter => loutre de mer\n        peppermint => menthe poivrée\n"
     "        plush girafe => girafe peluche\n        cheese =>",
     [1, 4103, 9632, 4223, 304, 5176, 29901, 13, 13, 4706, 7205, 4932, 357, 1149, 301, 449, 276, 316, 2778, 13,
      4706, 1236, 407, 837, 524, 1149, 6042, 354, 772, 440, 29878, 1318, 13, 4706, 715, 1878, 330, 3055, 1725,
      1149, 330, 3055, 1725, 4639, 28754, 13, 4706, 923, 968, 1149]),
]

STREAM_TEXTS = [
    "Grüße aus Zürich! Ça va très bien, señor.",
    "東京は日本の首都です。北京和上海也很大。",
    "Llamas 🦙 party 🎉🎉 with family 👨‍👩‍👧 emoji.",
    "  leading spaces, trailing spaces  ",
    "mixed: naïve 日本 🦙 done\n\nnew paragraph",
]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Strings full of what tokenizers get wrong: repeated spaces, tabs, digits, CJK, emoji, accents."""
    rng = random.Random(seed)
    alphabet = list("ab cd  \n\t.,!?0123") + ["é", "日", "🦙", "  ", "   ", "ñ", "\u200b", "ﬁ", "Ａ", "[INST]", "<s>"]
    words = ["the", "llama", "said", "hello", "world", "12345", "def", "return", "model(prompt)", "naïve", "café"]
    texts = []
    for index in range(count):
        pool = alphabet if index % 2 else [w + " " for w in words] + ["  ", "\n"]
        texts.append("".join(rng.choice(pool) for _ in range(rng.randint(0, 30))))
    return texts


@pytest.mark.parametrize(("text", "expected"), TEST_C_CASES)
def test_llama2_tokenizer_reproduces_llama2c_encodings(llama_tokenizer_path: Path, text: str, expected) -> None:
    assert Tokenizer(llama_tokenizer_path).encode(text, bos=True) == expected


def hf_tokenizer_json(tokenizer_model: Path, directory: Path) -> Path:
    """tokenizer.json as transformers converts a tokenizer.model (what HF Llama repos ship)."""
    transformers = pytest.importorskip("transformers")
    directory.mkdir(exist_ok=True)
    (directory / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    converted = transformers.AutoTokenizer.from_pretrained(str(directory))
    path = directory / "tokenizer.json"
    converted.backend_tokenizer.save(str(path))
    (directory / "tokenizer.model").unlink()
    return path


def test_tokenizer_json_gives_sentencepiece_ids(llama_tokenizer_path: Path, tmp_path: Path) -> None:
    sentencepiece = Tokenizer(llama_tokenizer_path)
    hf = Tokenizer(hf_tokenizer_json(llama_tokenizer_path, tmp_path / "hf"))
    assert hf.vocab_size == sentencepiece.vocab_size == 32000
    assert (hf.bos_id, hf.eos_id) == (sentencepiece.bos_id, sentencepiece.eos_id) == (1, 2)
    for text in random_texts(1500) + [text for text, _ in TEST_C_CASES] + STREAM_TEXTS:
        ids = sentencepiece.encode(text, bos=True)
        assert hf.encode(text, bos=True) == ids, text
        assert hf.decode(ids) == sentencepiece.decode(ids), text


def test_tokenizer_json_of_tiny_vocabulary(tiny_tokenizer_path: Path, tmp_path: Path) -> None:
    sentencepiece = Tokenizer(tiny_tokenizer_path)
    hf = Tokenizer(hf_tokenizer_json(tiny_tokenizer_path, tmp_path / "hf"))
    for text in random_texts(500, seed=1):
        assert hf.encode(text) == sentencepiece.encode(text), text


def test_llama2c_tokenizer_bin_matches_sentencepiece(assets: Path) -> None:
    llama, stories = assets / "llama2-tokenizer", assets / "stories260K"
    for model, binary in [(llama / "tokenizer.model", llama / "tokenizer.bin"),
                          (stories / "tok512.model", stories / "tok512.bin")]:
        reference, rebuilt = Tokenizer(model), Tokenizer(binary)
        assert rebuilt.vocab_size == reference.vocab_size
        # Repeated and edge spaces are left out: tok512 removes them, and a .bin does not record that setting.
        for text in [t for t in random_texts(300, seed=2) if "  " not in t and t == t.strip()] + STREAM_TEXTS[:3]:
            ids = reference.encode(text, bos=True)
            assert rebuilt.encode(text, bos=True) == ids, text
            assert rebuilt.decode(ids) == reference.decode(ids)


def test_control_tags_in_text_stay_text(tiny_tokenizer_path: Path) -> None:
    tokenizer = Tokenizer(tiny_tokenizer_path)
    ids = tokenizer.encode("<s> hi </s>")
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == "<s> hi </s>"


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_deltas_add_up_to_the_full_decode(llama_tokenizer_path: Path, text: str) -> None:
    tokenizer = Tokenizer(llama_tokenizer_path)
    ids = tokenizer.encode(text)
    decoder = StreamDecoder(tokenizer)
    deltas = [decoder.push(token) for token in ids] + [decoder.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    # No delta ever carries half a character.
    assert all("\ufffd" not in delta for delta in deltas)


def test_stream_holds_multibyte_characters_until_complete(llama_tokenizer_path: Path) -> None:
    tokenizer = Tokenizer(llama_tokenizer_path)
    ids = tokenizer.encode("🦙")  # "▁" then four byte-fallback pieces
    assert len(ids) == 5
    decoder = StreamDecoder(tokenizer)
    deltas = [decoder.push(token) for token in ids]
    assert deltas[:-1] == [""] * 4 and deltas[-1] == "🦙"


def test_stream_with_context_keeps_the_leading_space(llama_tokenizer_path: Path) -> None:
    tokenizer = Tokenizer(llama_tokenizer_path)
    prompt, continuation = tokenizer.encode("Once upon", bos=True), tokenizer.encode("a time, 日本 🦙")
    decoder = StreamDecoder(tokenizer, context=prompt)
    text = "".join(decoder.push(t) for t in continuation) + decoder.flush()
    assert text == " a time, 日本 🦙"
    assert tokenizer.decode(prompt) + text == tokenizer.decode(prompt + continuation)


def test_stream_of_random_ids_matches_decode(llama_tokenizer_path: Path) -> None:
    """Even invalid byte sequences (what a random model emits) add up to the full decode."""
    tokenizer = Tokenizer(llama_tokenizer_path)
    rng = random.Random(3)
    for _ in range(50):
        ids = [rng.choice([rng.randrange(3, 259), rng.randrange(259, 32000)]) for _ in range(40)]
        decoder = StreamDecoder(tokenizer)
        assert "".join([decoder.push(t) for t in ids] + [decoder.flush()]) == tokenizer.decode(ids)


def test_bad_tokenizer_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer(junk)
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer(broken)
