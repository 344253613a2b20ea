"""Byte-level BPE tokenizer and the chat format built on its special tokens.

Training and encoding are split between two libraries on purpose: `rustbpe` learns the merges
(fast, parallel, streaming over a text iterator) and the learned ranks are handed to
`tiktoken`, whose threaded encoder is what training and inference actually call. The split
regex is GPT-4's except that numbers are cut into groups of at most two digits, which keeps
the vocabulary from spending thousands of ids on arbitrary numbers.

The 9 special tokens are appended after the learned ranks, so they are always the last 9 ids.
They are never parsed out of plain text: a user typing "<|bos|>" gets ordinary tokens, and only
`encode_special` (and the chat renderer) can emit the real ids.

A tokenizer directory holds `tokenizer.pkl` (the pickled `tiktoken.Encoding`: ranks, pattern,
special tokens -- the same file nanochat writes) and `token_bytes.pt` (per id, how many UTF-8
bytes that token stands for; 0 for specials), which bits-per-byte evaluation needs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import rustbpe
import tiktoken
import torch

from engine.fileio import atomic_write

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)

TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"

# 256 single-byte tokens are the floor of any byte-level BPE vocabulary.
_BYTE_TOKENS = 256

_PART_TYPES = ("text", "python", "python_output")


class Tokenizer:
    """A `tiktoken.Encoding` plus the special-token and chat-format conventions of this project."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._enc = encoding
        self._token_bytes: torch.Tensor | None = None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 32768,
        doc_cap: int = 10_000,
        max_chars: int = 10**10,
    ) -> Tokenizer:
        """Learn `vocab_size - 9` BPE ranks from `texts`, then append the 9 special tokens.

        Each document is cut to `doc_cap` characters (a few huge documents would otherwise
        dominate the pair counts) and reading stops once `max_chars` characters have been seen.
        """
        n_ranks = vocab_size - len(SPECIAL_TOKENS)
        if vocab_size < _BYTE_TOKENS + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must be at least {_BYTE_TOKENS + len(SPECIAL_TOKENS)} "
                f"({_BYTE_TOKENS} byte tokens + {len(SPECIAL_TOKENS)} special tokens), "
                f"got {vocab_size}"
            )
        if doc_cap < 1:
            raise ValueError(f"doc_cap must be a positive number of characters, got {doc_cap}")
        if max_chars < 1:
            raise ValueError(f"max_chars must be a positive number of characters, got {max_chars}")

        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(
            _capped_documents(texts, doc_cap, max_chars), n_ranks, pattern=SPLIT_PATTERN
        )
        ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        if len(ranks) != n_ranks:
            # rustbpe stops early when no pair occurs twice; a smaller vocabulary than asked
            # would silently break every model config built for `vocab_size`.
            raise ValueError(
                f"the training text only supports {len(ranks) - _BYTE_TOKENS} merges but "
                f"vocab_size={vocab_size} needs {n_ranks - _BYTE_TOKENS}: give more text "
                f"or ask for a smaller vocab_size"
            )
        specials = {name: n_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
        encoding = tiktoken.Encoding(
            name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
        return cls(encoding)

    @classmethod
    def from_pretrained_tiktoken(cls, name: str) -> Tokenizer:
        """Wrap one of tiktoken's published encodings, e.g. "gpt2" or "cl100k_base" (GPT-4).

        tiktoken downloads the ranks on first use and caches them (`TIKTOKEN_CACHE_DIR`).
        Raises OSError when they are not cached and cannot be downloaded (offline), and
        ValueError for a name tiktoken does not know.
        """
        try:
            encoding = tiktoken.get_encoding(name)
        except OSError as exc:  # requests' errors are OSErrors too
            raise OSError(
                f"could not load the tiktoken encoding {name!r}: it is downloaded on first use "
                f"and nothing is cached (are we offline?): {exc}"
            ) from exc
        return cls(encoding)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Read a directory written by `save` (or by nanochat's tokenizer training)."""
        directory = Path(directory)
        pkl_path = directory / TOKENIZER_FILE
        bytes_path = directory / TOKEN_BYTES_FILE
        for path in (pkl_path, bytes_path):
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {path}")
        with open(pkl_path, "rb") as f:
            encoding = pickle.load(f)
        if not isinstance(encoding, tiktoken.Encoding):
            raise ValueError(
                f"{pkl_path} holds a {type(encoding).__name__}, expected a pickled tiktoken.Encoding"
            )
        tokenizer = cls(encoding)
        token_bytes = torch.load(bytes_path, map_location="cpu", weights_only=True)
        if token_bytes.shape != (tokenizer.vocab_size,):
            raise ValueError(
                f"{bytes_path} has shape {tuple(token_bytes.shape)} but the tokenizer has "
                f"{tokenizer.vocab_size} ids"
            )
        tokenizer._token_bytes = token_bytes.to(torch.int32)
        return tokenizer

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `tokenizer.pkl` and `token_bytes.pt` into `directory` (created if missing)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        token_bytes = self.token_bytes()
        atomic_write(directory / TOKEN_BYTES_FILE, lambda f: torch.save(token_bytes, f))
        atomic_write(directory / TOKENIZER_FILE, lambda f: pickle.dump(self._enc, f))

    # ---- vocabulary ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def special_tokens(self) -> list[str]:
        """Names of the special tokens, in id order."""
        return sorted(self._enc.special_tokens_set, key=self._enc.encode_single_token)

    def encode_special(self, name: str) -> int:
        if name not in self._enc.special_tokens_set:
            raise ValueError(f"{name!r} is not a special token; known: {self.special_tokens}")
        return self._enc.encode_single_token(name)

    def get_bos_token_id(self) -> int:
        # Published encodings have no <|bos|>; their document separator plays that role.
        for name in ("<|bos|>", "<|endoftext|>"):
            if name in self._enc.special_tokens_set:
                return self._enc.encode_single_token(name)
        raise ValueError(f"no BOS-like special token among {self.special_tokens}")

    def id_to_token(self, token_id: int) -> str:
        """The text of one token (a partial UTF-8 character shows as U+FFFD)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(
                f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        return self._enc.decode([token_id])

    def id_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special token's name), possibly part of a character:
        what the OpenAI API's logprobs report as a token's `bytes`."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(
                f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        try:
            return self._enc.decode_single_token_bytes(token_id)
        except KeyError:  # an unassigned id of a published encoding
            return b""

    def token_bytes(self) -> torch.Tensor:
        """int32 tensor of shape (vocab_size,): the UTF-8 bytes each id stands for, 0 for specials.

        Counted on the token's raw bytes, so for any text the sum over its ids equals its UTF-8
        length exactly, even when a character is split across tokens.
        """
        if self._token_bytes is None:
            specials = {self._enc.encode_single_token(s) for s in self._enc.special_tokens_set}
            lengths = [0] * self.vocab_size
            for token_id in range(self.vocab_size):
                if token_id in specials:
                    continue
                # Published encodings have unassigned ids below n_vocab; they count 0 too.
                with contextlib.suppress(KeyError):
                    lengths[token_id] = len(self._enc.decode_single_token_bytes(token_id))
            self._token_bytes = torch.tensor(lengths, dtype=torch.int32, device="cpu")
        return self._token_bytes

    # ---- encoding -----------------------------------------------------------------------

    def encode(
        self,
        text: str | list[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """Encode one text (-> list of ids) or a batch (-> one list per text, threaded).

        `prepend`/`append` add one token (an id or a special token's name) to every result.
        Special-token text inside `text` is encoded as ordinary text.
        """
        first = None if prepend is None else self._token_id(prepend)
        last = None if append is None else self._token_id(append)
        if isinstance(text, str):
            rows = [self._enc.encode_ordinary(text)]
        elif isinstance(text, list):
            rows = self._enc.encode_ordinary_batch(text, num_threads=num_threads)
        else:
            raise ValueError(f"encode expects a str or a list of str, got {type(text).__name__}")
        for row in rows:
            if first is not None:
                row.insert(0, first)
            if last is not None:
                row.append(last)
        return rows[0] if isinstance(text, str) else rows

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))

    def _token_id(self, token: int | str) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
        return token

    # ---- chat format --------------------------------------------------------------------

    def render_conversation(
        self, conversation: dict[str, Any], max_tokens: int = 2048
    ) -> tuple[list[int], list[int]]:
        """Render a conversation to (ids, mask); mask is 1 on the tokens the model must learn.

        Only the assistant's own output is trained on: its text, its tool calls and the
        `<|assistant_end|>` that tells it to stop. Tool outputs and the user's words are 0.
        Both lists are cut to `max_tokens`.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        ids, mask = self._render(_checked_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict[str, Any]) -> list[int]:
        """Render a conversation as a prompt that asks the model for the next assistant reply.

        A trailing assistant message is dropped (it is the reply to regenerate). The result is
        not truncated: cutting a prompt would drop the latest question, so the caller, which
        knows the model's context length, decides what to do with a long one.
        """
        messages = _checked_messages(conversation)
        # Roles alternate from a user message, so without a trailing assistant reply the
        # conversation ends with the user's turn.
        if messages[-1][1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self._render(messages)
        ids.append(self.encode_special("<|assistant_start|>"))
        return ids

    def visualize(self, ids: Sequence[int], mask: Sequence[int]) -> str:
        """Tokens joined by '|', trained ones (mask 1) in green, the rest grey (ANSI colours)."""
        if len(ids) != len(mask):
            raise ValueError(f"ids and mask differ in length: {len(ids)} vs {len(mask)}")
        green, grey, reset = "\x1b[32m", "\x1b[90m", "\x1b[0m"
        return "|".join(
            f"{green if m else grey}{self.id_to_token(i)}{reset}"
            for i, m in zip(ids, mask, strict=True)
        )

    def _render(self, messages: list[tuple[int, dict[str, Any]]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: list[int], trained: int) -> None:
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        special = self.encode_special
        add([self.get_bos_token_id()], 0)
        for index, message in messages:
            content = message["content"]
            if message["role"] == "user":
                add([special("<|user_start|>")], 0)
                add(self._enc.encode_ordinary(content), 0)
                add([special("<|user_end|>")], 0)
                continue
            add([special("<|assistant_start|>")], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part_index, part in enumerate(parts):
                kind, text = _checked_part(part, index, part_index)
                tokens = self._enc.encode_ordinary(text)
                if kind == "text":
                    add(tokens, 1)
                elif kind == "python":
                    add([special("<|python_start|>"), *tokens, special("<|python_end|>")], 1)
                else:
                    add([special("<|output_start|>"), *tokens, special("<|output_end|>")], 0)
            add([special("<|assistant_end|>")], 1)
        return ids, mask


def _capped_documents(texts: Iterable[str], doc_cap: int, max_chars: int) -> Iterator[str]:
    seen = 0
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"training document {index} is a {type(text).__name__}, not a str")
        text = text[: min(doc_cap, max_chars - seen)]
        seen += len(text)
        yield text
        if seen >= max_chars:
            return


def _checked_messages(conversation: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """Validate roles and content; fold a leading system message into the first user message.

    Returns (original index, message) pairs so errors further on can name the message the
    caller actually sent.
    """
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation must be a dict with a non-empty 'messages' list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index} must be a dict with 'role' and 'content'")

    indexed = list(enumerate(messages))
    if messages[0]["role"] == "system":
        system = messages[0]["content"]
        if not isinstance(system, str):
            raise ValueError(
                f"message 0 (system) content must be a str, got {type(system).__name__}"
            )
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        user = messages[1]["content"]
        if not isinstance(user, str):
            raise ValueError(f"message 1 (user) content must be a str, got {type(user).__name__}")
        indexed = [(1, {"role": "user", "content": system + "\n\n" + user}), *indexed[2:]]

    for position, (index, message) in enumerate(indexed):
        role = message["role"]
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"message {index} has role {role!r} where {expected!r} was expected: roles must "
                f"alternate user/assistant starting with user (after an optional leading system)"
            )
        content = message["content"]
        if role == "user" and not isinstance(content, str):
            raise ValueError(
                f"message {index} (user) content must be a str, got {type(content).__name__}"
            )
        if role == "assistant" and not isinstance(content, str | list):
            raise ValueError(
                f"message {index} (assistant) content must be a str or a list of parts, "
                f"got {type(content).__name__}"
            )
    return indexed


def _checked_part(part: Any, index: int, part_index: int) -> tuple[str, str]:
    where = f"message {index} part {part_index}"
    if not isinstance(part, dict):
        raise ValueError(f"{where} must be a dict with 'type' and 'text', got {part!r}")
    kind = part.get("type")
    if kind not in _PART_TYPES:
        raise ValueError(f"{where} has unknown type {kind!r}; expected one of {_PART_TYPES}")
    text = part.get("text")
    if not isinstance(text, str):
        raise ValueError(f"{where} ({kind}) needs a str 'text', got {type(text).__name__}")
    return kind, text
