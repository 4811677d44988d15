"""Llama tokenizers: SentencePiece `tokenizer.model`, HF `tokenizer.json`, llama2.c `tokenizer.bin`, and the
vocabulary inside a GGUF file (rebuilt as a SentencePiece model by checkpoint/gguf.py).

All of them give the same ids for the same vocabulary. Control tokens (BOS/EOS) are added as ids, never
parsed out of text: "<s>" typed by a user is five characters, not BOS.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from llamaforge.errors import TokenizerError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
LLAMA2_VOCAB_SIZE, LLAMA2_DOUBLE_SPACE_ID = 32000, 259  # how Llama 2's vocabulary is recognised


def check_text(text: str) -> None:
    """Refuse text that is not Unicode a tokenizer can take: a lone UTF-16 surrogate (JSON's "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizerError(f"the text holds a lone surrogate {text[exc.start]!r} at character {exc.start}, "
                             "which is not valid Unicode; send the character's full surrogate pair, or "
                             "the character itself") from None


class Tokenizer:
    """Encode text to ids and back, Meta-style: `encode(text, bos=True)` and `decode(ids)`."""

    def __init__(self, path: str | Path, model_proto: bytes | None = None) -> None:
        """`path` is the tokenizer's file; `model_proto`, a SentencePiece model rebuilt from the vocabulary
        another format keeps in that file (GGUF)."""
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer file {self.path} does not exist")
        self._sp = None
        self._hf = None
        if self.path.suffix == ".json" and model_proto is None:
            self._hf = _load_tokenizers_json(self.path)
            self.bos_id = self._special_id("<s>", 1)
            self.eos_id = self._special_id("</s>", 2)
        else:
            if model_proto is None and self.path.suffix == ".bin":
                model_proto = _llama2c_to_sentencepiece(self.path)
            self._sp = _load_sentencepiece(self.path, model_proto)
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()

    @property
    def vocab_size(self) -> int:
        if self._sp is not None:
            return self._sp.get_piece_size()
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS/EOS ids added on request."""
        check_text(text)
        ids = self._sp.encode(text) if self._sp is not None else self._hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` as Meta's decode gives it: control tokens dropped, a leading space removed."""
        ids = list(ids)
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def encode_with_offsets(self, text: str) -> list[tuple[int, int, int]]:
        """(id, start, stop) of each token of `text`, as character offsets into it."""
        check_text(text)
        if self._hf is not None:
            encoding = self._hf.encode(text, add_special_tokens=False)
            return [(i, start, stop) for i, (start, stop) in zip(encoding.ids, encoding.offsets, strict=True)]
        char_at = {}  # byte offset -> character offset
        position = 0
        for index, char in enumerate(text):
            char_at[position] = index
            position += len(char.encode("utf-8"))
        char_at[position] = len(text)
        pieces = self._sp.encode(text, return_type="proto").pieces
        return [(p.id, char_at.get(p.begin, len(text)), char_at.get(p.end, len(text))) for p in pieces]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for ("▁" as a space; byte-fallback pieces as their byte)."""
        piece = self.id_to_piece(token_id)
        if is_byte_piece(piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def sentencepiece_model(self) -> bytes:
        """The SentencePiece model (what a tokenizer.model file holds), also when it was rebuilt from another format."""
        if self._sp is None:
            raise TokenizerError(f"{self.path} is an HF tokenizer.json; this needs the SentencePiece tokenizer.model "
                                 "that came with the weights (pass --tokenizer tokenizer.model)")
        return self._sp.serialized_model_proto()

    def save(self, directory: Path) -> Path:
        """Write the tokenizer into a model folder: its own file as is, a rebuilt model as tokenizer.model."""
        if self.path.name in TOKENIZER_FILES:
            target = directory / self.path.name
            target.write_bytes(self.path.read_bytes())
        else:
            target = directory / "tokenizer.model"
            target.write_bytes(self.sentencepiece_model())
        return target

    def id_to_piece(self, token_id: int) -> str:
        if self._sp is not None:
            return self._sp.id_to_piece(token_id)
        return self._hf.id_to_token(token_id)

    def _special_id(self, token: str, default: int) -> int:
        found = self._hf.token_to_id(token)
        return default if found is None else found


def _load_sentencepiece(path: Path, proto: bytes | None):
    import sentencepiece

    try:
        if proto is not None:
            return sentencepiece.SentencePieceProcessor(model_proto=proto)
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        raise TokenizerError(
            f"{path} is not a SentencePiece model ({exc}); pass the tokenizer.model that came with the weights"
        ) from None


def _load_tokenizers_json(path: Path):
    from tokenizers import Tokenizer as HFTokenizer

    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        tokenizer = HFTokenizer.from_str(json.dumps(_sentencepiece_compatible(spec)))
    except Exception as exc:  # tokenizers raises a bare Exception for parse errors
        raise TokenizerError(f"{path} is not a valid tokenizer.json ({exc}); re-download it") from None
    # Treat "<s>" in user text as plain characters, exactly like SentencePiece does.
    tokenizer.encode_special_tokens = True
    return tokenizer


def _sentencepiece_compatible(spec: dict) -> dict:
    """Make a Llama-style tokenizer.json split text exactly as SentencePiece does, Meta's reference.

    Non-legacy HF files use a Metaspace pre-tokenizer that adds no dummy prefix before a leading
    space; SentencePiece always adds it. And Llama 2's own vocabulary scores its whitespace-only
    pieces ("▁▁", "▁▁▁▁", ...) -1e9, so SentencePiece merges them last, while converters that rank
    merges by piece id merge them first. Tokenizers of other shapes are left untouched.
    """
    model = spec.get("model") or {}
    vocab = model.get("vocab", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback") or "\u2581" not in vocab:
        return spec
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ]}
    spec["pre_tokenizer"] = None
    if vocab.get("\u2581\u2581") == LLAMA2_DOUBLE_SPACE_ID and len(vocab) == LLAMA2_VOCAB_SIZE:
        merges = model.get("merges", [])

        def whitespace_only(merge: str | list[str]) -> bool:
            return set("".join(merge) if isinstance(merge, list) else merge.replace(" ", "")) == {"\u2581"}

        model["merges"] = [m for m in merges if not whitespace_only(m)] + [m for m in merges if whitespace_only(m)]
    return spec


def _llama2c_to_sentencepiece(path: Path) -> bytes:
    """Rebuild a SentencePiece model from llama2.c's `tokenizer.bin` (pieces and BPE scores).

    The .bin keeps no normaliser settings, so Meta's are used (add a dummy prefix, keep repeated
    spaces). Ids 0/1/2 are unk/BOS/EOS and `<0xHH>` pieces are byte fallback, as in Llama's own model.
    """
    data = path.read_bytes()
    pieces = []
    offset = 4  # int32 max_token_length, unused here
    try:
        while offset < len(data):
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            raw = data[offset:offset + length]
            if len(raw) != length:
                raise struct.error("piece runs past the end of the file")
            offset += length
            piece = _llama2c_piece(raw.decode("utf-8"), len(pieces))
            pieces.append((piece, score, _piece_type(piece, len(pieces))))
    except (struct.error, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path} is not a llama2.c tokenizer.bin ({exc})") from None
    if len(pieces) < 3:
        raise TokenizerError(f"{path} holds {len(pieces)} pieces; a llama2.c tokenizer.bin has hundreds")
    return sentencepiece_proto(pieces)


def sentencepiece_proto(pieces: list[tuple[str, float, int]], unk_id: int = 0, bos_id: int = 1, eos_id: int = 2,
                        add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = False) -> bytes:
    """A serialized SentencePiece BPE model of (piece, score, type) with Llama's settings: byte fallback,
    identity normalisation, spaces as "▁", a dummy prefix and repeated spaces kept (unless told otherwise)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    model = model_pb2.ModelProto()
    for text, score, kind in pieces:
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = text, score, kind
    trainer = model.trainer_spec
    trainer.model_type = model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = unk_id, bos_id, eos_id, -1
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = add_dummy_prefix
    normalizer.remove_extra_whitespaces = remove_extra_whitespaces
    normalizer.escape_whitespaces = True
    return model.SerializeToString()


def _llama2c_piece(text: str, token_id: int) -> str:
    if token_id in (1, 2):  # stored as "\n<s>\n" and "\n</s>\n"
        return text.strip()
    return text.replace(" ", "\u2581")


def _piece_type(piece: str, token_id: int) -> int:
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    if token_id == 0:
        return model_pb2.ModelProto.SentencePiece.UNKNOWN
    if token_id in (1, 2):
        return model_pb2.ModelProto.SentencePiece.CONTROL
    if is_byte_piece(piece):
        return model_pb2.ModelProto.SentencePiece.BYTE
    return model_pb2.ModelProto.SentencePiece.NORMAL


def is_byte_piece(piece: str) -> bool:
    """A byte-fallback piece, "<0xHH>"."""
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def find_tokenizer(directory: Path) -> Path | None:
    """The tokenizer file in a checkpoint directory, preferring SentencePiece's own model."""
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


class StreamDecoder:
    """Turn token ids, one at a time, into text deltas that add up exactly to the full decode.

    A delta is released only when it does not end in U+FFFD, so byte-fallback pieces that together
    form one multi-byte character are held until the character is complete. Each step decodes a short
    window that starts at an already-released token, so the leading-space rule of SentencePiece applies
    the same way to the window's text and to the text already sent.

    With `context` (e.g. the prompt's last tokens), text is what follows the context: a leading space
    of the first new token is kept. Without it, the text equals `tokenizer.decode(new_ids)`, as Meta's
    reference returns it.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, context: list[int] | tuple[int, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context[-self.CONTEXT_TOKENS:]) if context else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Release whatever is held back (an incomplete character becomes U+FFFD, as in the full decode)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        sent = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(text) <= len(sent) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(sent):]
