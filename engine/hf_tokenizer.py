"""Our tokenizer as Hugging Face files, and back.

`write_hf_tokenizer` turns a `Tokenizer` (tiktoken ranks + split regex + special tokens) into
the three files `AutoTokenizer.from_pretrained(folder)` reads, such that the Hugging Face
tokenizer gives exactly our ids for any text and decodes them back to the same text.
`tokenizer_from_hf` is the inverse, for importing a model that was exported this way.

How tiktoken's BPE is expressed in the `tokenizers` format:

* Vocabulary: tiktoken ranks are byte strings; `tokenizers`' byte-level BPE names a token by
  mapping each byte through GPT-2's byte-to-unicode table (printable bytes stand for
  themselves, the rest are shifted to U+0100 and up, a space becomes "Ġ"). The id of a token
  is its rank.
* Merges: tiktoken has no merge list. At each step it joins the adjacent pair whose
  concatenation has the lowest rank. `tokenizers` joins the adjacent pair that comes first in
  its merge list. Listing, for every token, every split of it into two tokens, ordered by the
  token's rank, gives the same choice at every step: the pair that comes first is one whose
  concatenation has the lowest rank. (The one gap: two *different* splits of the same token
  side by side in one word, e.g. "a"+"aa" and "aa"+"a", where tiktoken takes the leftmost and
  `tokenizers` the earlier-listed. BPE merging from bytes hardly ever builds that; the tests
  compare both encoders on hundreds of KB of text and on every vocabulary entry, and a 32k
  vocabulary trained on 30 MB of Python agreed on 2.6M tokens of held-out code.)
* `ignore_merges`: tiktoken emits a pre-token that is itself in the vocabulary as one token
  without running BPE; `ignore_merges=True` tells `tokenizers` to do the same.
* Pre-tokenizer: our split regex, verbatim (`tokenizers` runs it with Oniguruma, which knows
  the possessive quantifiers, the lookahead and `\\p{..}` classes; the tests check it splits
  every Unicode code point exactly like tiktoken), then ByteLevel without its own regex.
* Special tokens: added tokens with our ids (unused ids between them, as in cl100k_base,
  get "<|reserved_N|>" placeholders, since `tokenizers` numbers added tokens consecutively).
  Hugging Face recognises them in plain text,
  which our `encode` never does (there "<|bos|>" is seven ordinary characters). That
  default is kept because `apply_chat_template` renders the chat to a string and relies on
  it, as do serving stacks; pass `split_special_tokens=True` to encode user text exactly as
  our `encode` does, and `sanitize_control_tokens=True` to `apply_chat_template` when
  message text may contain special-token strings.
* Chat template: a Jinja template that renders messages to our chat format (see
  `CHAT_TEMPLATE`); `TRAINING_CHAT_TEMPLATE` adds `{% generation %}` marks so
  `return_assistant_tokens_mask=True` gives our training mask.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import tiktoken

from engine.fileio import atomic_write
from engine.tokenizer import SPECIAL_TOKENS, Tokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

# A tokenizer.json bigger than this is not one of ours (a 256k vocabulary is ~20 MB).
MAX_TOKENIZER_JSON_BYTES = 256 * 1024 * 1024

# The chat format of `Tokenizer.render_conversation` / `render_for_completion`, for
# `apply_chat_template`: <|bos|>, a leading system message folded into the first user message
# as "system\n\nuser", user turns in <|user_start|>..<|user_end|>, assistant turns in
# <|assistant_start|>..<|assistant_end|> with their parts (text, python tool calls in
# <|python_start|>..<|python_end|>, tool output in <|output_start|>..<|output_end|>).
# `add_generation_prompt` ends with <|assistant_start|> and, like `render_for_completion`,
# drops a trailing assistant message (the reply to regenerate). Every piece of text sits
# between special tokens, so Hugging Face encodes it on its own, as our renderer does.
#
# This version carries `{% generation %}` blocks around what our mask trains on (the
# assistant's text, its tool calls, its <|assistant_end|>), for
# `apply_chat_template(..., chat_template=TRAINING_CHAT_TEMPLATE,
# return_assistant_tokens_mask=True)`. That tag is a transformers extension other runtimes
# (TGI's minijinja, llama.cpp) do not parse, so the template written to tokenizer_config.json
# is `CHAT_TEMPLATE`, the same without those tags. Whitespace control ("-") on every tag keeps
# the template's own layout out of the output under any Jinja trim settings, and variables are
# set only at top level or per loop turn, so scoping rules of other Jinja engines do not matter.
TRAINING_CHAT_TEMPLATE = """\
{%- set has_system = messages[0]['role'] == 'system' -%}
{%- if has_system and messages[0]['content'] is not string -%}
    {{- raise_exception('message 0 (system) content must be a string') -}}
{%- endif -%}
{%- if has_system and (messages | length < 2 or messages[1]['role'] != 'user') -%}
    {{- raise_exception('a system message must be followed by a user message') -}}
{%- endif -%}
{%- set system_prefix = messages[0]['content'] + '\\n\\n' if has_system else '' -%}
{%- set turns = messages[1:] if has_system else messages -%}
<|bos|>
{%- for message in turns -%}
    {%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}
    {%- if message['role'] != expected -%}
        {{- raise_exception('roles must alternate user/assistant starting with user, after an optional leading system message') -}}
    {%- endif -%}
    {%- if expected == 'user' -%}
        {%- if message['content'] is not string -%}
            {{- raise_exception('user content must be a string') -}}
        {%- endif -%}
        {{- '<|user_start|>' + (system_prefix if loop.first else '') + message['content'] + '<|user_end|>' -}}
    {%- elif message['content'] is not string and message['content'] is not sequence -%}
        {{- raise_exception('assistant content must be a string or a list of parts') -}}
    {%- elif not (add_generation_prompt and loop.last) -%}
        {{- '<|assistant_start|>' -}}
        {%- if message['content'] is string -%}
            {%- generation -%}{{- message['content'] -}}{%- endgeneration -%}
        {%- else -%}
            {%- for part in message['content'] -%}
                {%- if part is not mapping or part['text'] is not string -%}
                    {{- raise_exception('an assistant part must be a dict with a string text') -}}
                {%- elif part['type'] == 'text' -%}
                    {%- generation -%}{{- part['text'] -}}{%- endgeneration -%}
                {%- elif part['type'] == 'python' -%}
                    {%- generation -%}
                        {{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}
                    {%- endgeneration -%}
                {%- elif part['type'] == 'python_output' -%}
                    {{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}
                {%- else -%}
                    {{- raise_exception('unknown assistant part type; expected text, python or python_output') -}}
                {%- endif -%}
            {%- endfor -%}
        {%- endif -%}
        {%- generation -%}{{- '<|assistant_end|>' -}}{%- endgeneration -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant_start|>' -}}
{%- endif -%}
"""

CHAT_TEMPLATE = re.sub(r"\{%-?\s*(?:end)?generation\s*-?%\}", "", TRAINING_CHAT_TEMPLATE)


# ---- byte-level names -----------------------------------------------------------------------


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's table from a byte to the printable character that names it in byte-level BPE.

    Bytes that are printable Latin-1 characters (other than space) name themselves; the other
    68 bytes, in order, take U+0100 onwards, so every byte string maps to a printable string
    without whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@cache
def _unicode_to_byte() -> dict[str, int]:
    return {char: b for b, char in byte_to_unicode().items()}


def bytes_to_token(token: bytes) -> str:
    """A token's bytes as its byte-level BPE name."""
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def token_to_bytes(name: str) -> bytes:
    """The inverse of `bytes_to_token`; ValueError for a character no byte maps to."""
    table = _unicode_to_byte()
    try:
        return bytes(table[char] for char in name)
    except KeyError as exc:
        raise ValueError(
            f"token {name!r} is not a byte-level BPE name: {exc.args[0]!r} stands for no byte"
        ) from None


# ---- merges ---------------------------------------------------------------------------------


def bpe_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every multi-byte token into two tokens, ordered as tiktoken prefers them.

    Sorted by the rank of the token they make (tiktoken's priority), then by the ranks of the
    left and right parts so the order is deterministic. See the module docstring for why this
    list makes `tokenizers`' merge-order BPE agree with tiktoken's rank-order BPE.
    """
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                merges.append((rank, left_rank, right_rank, left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


# ---- export ---------------------------------------------------------------------------------


def _encoding(tokenizer: Tokenizer) -> tiktoken.Encoding:
    # The ranks, split regex and special tokens live in the wrapped tiktoken.Encoding; tiktoken
    # keeps them in these attributes (the ones its own pickling writes out).
    return tokenizer._enc


def tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """The `tokenizers` serialization (tokenizer.json) of `tokenizer`, as a dict."""
    enc = _encoding(tokenizer)
    ranks: dict[bytes, int] = enc._mergeable_ranks
    specials: dict[str, int] = enc._special_tokens
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        # Byte-level BPE needs every byte as a token or some text could not be encoded at all.
        raise ValueError(
            f"the tokenizer lacks single-byte tokens for {len(missing)} byte values "
            f"(first: {missing[0]}); byte-level BPE needs all 256"
        )
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("the tokenizer's ranks are not the ids 0..n-1, which tokenizers needs")
    if specials and min(specials.values()) < len(ranks):
        raise ValueError("the tokenizer has special tokens among its ranks; they must come after")
    vocab = {bytes_to_token(token): rank for token, rank in sorted(ranks.items(), key=_by_rank)}
    merges = [f"{bytes_to_token(a)} {bytes_to_token(b)}" for a, b in bpe_merges(ranks)]
    # `tokenizers` numbers added tokens on from the vocabulary, ignoring the ids in the file, so
    # unused ids between specials (cl100k_base has some) are filled with reserved names.
    names = {token_id: name for name, token_id in specials.items()}
    added = [
        (names.get(token_id) or _reserved_name(token_id), token_id)
        for token_id in range(len(ranks), max(names, default=len(ranks) - 1) + 1)
    ]
    if len({name for name, _ in added}) != len(added):
        raise ValueError("a special token's name collides with a reserved-id placeholder name")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": token_id,
                "content": name,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for name, token_id in added
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": enc._pat_str},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },
        # No post-processor: our `encode` adds no BOS/EOS unless asked to.
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": False,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            # "a b" strings rather than pairs: readable by every `tokenizers` version, and
            # unambiguous because a byte-level name never contains a space.
            "merges": merges,
        },
    }


def _by_rank(item: tuple[Any, int]) -> int:
    return item[1]


def _reserved_name(token_id: int) -> str:
    """The placeholder special token written for an id the tokenizer leaves unused."""
    return f"<|reserved_{token_id}|>"


def write_hf_tokenizer(
    tokenizer: Tokenizer,
    folder: str | os.PathLike[str],
    *,
    eos_token: str | None = None,
    model_max_length: int | None = None,
) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`.

    `AutoTokenizer.from_pretrained(folder)` then encodes text to our ids, decodes them back,
    and renders chats with our format (`apply_chat_template`). `eos_token` defaults to
    "<|assistant_end|>" (where a chat model stops) when the tokenizer has it, else to the BOS
    token (a base model ends a document by starting the next one); `model_max_length` is the
    model's context length, when the caller knows it. Returns the written paths.
    """
    specials = tokenizer.special_tokens
    bos_token = tokenizer.id_to_token(tokenizer.get_bos_token_id())
    if eos_token is None:
        eos_token = "<|assistant_end|>" if "<|assistant_end|>" in specials else bos_token
    if eos_token not in specials:
        raise ValueError(f"eos_token {eos_token!r} is not a special token; known: {specials}")
    if model_max_length is not None and (
        isinstance(model_max_length, bool)
        or not isinstance(model_max_length, int)
        or model_max_length < 1
    ):
        raise ValueError(f"model_max_length must be a positive int, got {model_max_length!r}")

    data = tokenizer_json(tokenizer)
    text = json.dumps(data, ensure_ascii=False, indent=2)
    _check_loadable(text)

    extra = [name for name in specials if name not in (bos_token, eos_token)]
    special_map = {"bos_token": bos_token, "eos_token": eos_token}
    if extra:
        special_map["additional_special_tokens"] = extra
    config: dict[str, Any] = {
        # transformers 5 maps this name to TokenizersBackend; transformers 4 knows it as is.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": False,
        "add_eos_token": False,
        # The default cleanup would delete the space in " ." and the like when decoding.
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {
            str(entry["id"]): {k: v for k, v in entry.items() if k != "id"}
            for entry in data["added_tokens"]
        },
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    # Without our chat tokens (a published encoding such as gpt2) no template is written rather
    # than one whose special tokens the tokenizer cannot encode.
    if all(name in specials for name in SPECIAL_TOKENS):
        config["chat_template"] = CHAT_TEMPLATE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        TOKENIZER_JSON: text,
        TOKENIZER_CONFIG: json.dumps(config, ensure_ascii=False, indent=2),
        SPECIAL_TOKENS_MAP: json.dumps(special_map, ensure_ascii=False, indent=2),
    }
    paths = []
    for name, content in files.items():
        payload = (content + "\n").encode("utf-8")
        atomic_write(folder / name, lambda f, payload=payload: f.write(payload))
        paths.append(folder / name)
    return paths


def _check_loadable(text: str) -> None:
    """Parse the JSON with `tokenizers` itself, so a file it cannot read is never written.

    `tokenizers` is optional here (the files are plain JSON); without it the check is skipped.
    """
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        return
    HFTokenizer.from_str(text)


# ---- import ---------------------------------------------------------------------------------


def tokenizer_from_hf(source: str | os.PathLike[str] | Mapping[str, Any]) -> Tokenizer:
    """Rebuild our `Tokenizer` from a tokenizer.json written by `write_hf_tokenizer`.

    `source` is the file, the folder holding it, or its parsed JSON. Accepts byte-level BPE
    with a Split-regex + ByteLevel pre-tokenizer, no normalizer, and as merges every split of
    every token in rank order with `ignore_merges` (what `write_hf_tokenizer` writes): then
    tiktoken, with the vocabulary ids as ranks, gives the same ids. Anything else raises
    ValueError naming what differs rather than importing a tokenizer that would encode
    differently. Reserved-id placeholders are dropped, restoring the unused ids.
    """
    data = _read_tokenizer_json(source)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ValueError("tokenizer.json: model must be a BPE model")
    if data.get("normalizer") is not None:
        raise ValueError("tokenizer.json: a normalizer is not supported (tiktoken has none)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError("tokenizer.json: subword prefixes/suffixes are not byte-level BPE")
    pattern = _split_pattern(data.get("pre_tokenizer"))

    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError("tokenizer.json: model.vocab must be a non-empty object")
    ranks: dict[bytes, int] = {}
    for name, token_id in vocab.items():
        if not isinstance(name, str) or isinstance(token_id, bool) or not isinstance(token_id, int):
            raise ValueError(f"tokenizer.json: vocab entry {name!r}: {token_id!r} is not str: int")
        if token_id < 0:
            raise ValueError(f"tokenizer.json: vocab id {token_id} of {name!r} is negative")
        ranks[token_to_bytes(name)] = token_id
    if len(ranks) != len(vocab) or len(set(ranks.values())) != len(ranks):
        raise ValueError("tokenizer.json: two vocabulary entries share an id")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"tokenizer.json: {len(missing)} byte values have no token (first: {missing[0]}); "
            f"byte-level BPE needs all 256"
        )
    _check_merges(model, ranks)

    specials: dict[str, int] = {}
    rank_ids = set(ranks.values())
    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        raise ValueError("tokenizer.json: added_tokens must be a list")
    for entry in added:
        if not isinstance(entry, dict):
            raise ValueError(f"tokenizer.json: added token {entry!r} is not an object")
        name, token_id = entry.get("content"), entry.get("id")
        if not isinstance(name, str) or not isinstance(token_id, int) or isinstance(token_id, bool):
            raise ValueError(f"tokenizer.json: added token {entry!r} needs str content, int id")
        if not entry.get("special"):
            raise ValueError(
                f"tokenizer.json: added token {name!r} is not special; only special added "
                f"tokens have a tiktoken equivalent"
            )
        if name == _reserved_name(token_id):
            continue  # a placeholder for an id the tokenizer leaves unused
        if token_id in rank_ids or token_id in specials.values():
            raise ValueError(f"tokenizer.json: added token {name!r} reuses id {token_id}")
        specials[name] = token_id

    try:
        encoding = tiktoken.Encoding(
            name="hf_import", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
        )
    except Exception as exc:  # tiktoken raises plain ValueErrors and regex errors
        raise ValueError(f"tokenizer.json: tiktoken cannot use it: {exc}") from exc
    return Tokenizer(encoding)


def _read_tokenizer_json(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / TOKENIZER_JSON
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    size = path.stat().st_size
    if size > MAX_TOKENIZER_JSON_BYTES:
        raise ValueError(
            f"{path} is {size} bytes, more than the {MAX_TOKENIZER_JSON_BYTES} a tokenizer.json "
            f"may have"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


def _split_pattern(pre_tokenizer: Any) -> str:
    """The regex of a Sequence[Split(regex, Isolated), ByteLevel(use_regex=False)]."""
    shape = "pre_tokenizer must be Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)]"
    steps = pre_tokenizer.get("pretokenizers") if isinstance(pre_tokenizer, dict) else None
    if not isinstance(steps, list) or pre_tokenizer.get("type") != "Sequence" or len(steps) != 2:
        raise ValueError(f"tokenizer.json: {shape}")
    split, byte_level = steps
    if not isinstance(split, dict) or not isinstance(byte_level, dict):
        raise ValueError(f"tokenizer.json: {shape}")
    pattern = split.get("pattern")
    pattern = pattern.get("Regex") if isinstance(pattern, dict) else None
    if (
        split.get("type") != "Split"
        or not isinstance(pattern, str)
        or split.get("behavior") != "Isolated"
        or split.get("invert")
    ):
        raise ValueError(f"tokenizer.json: {shape}")
    if (
        byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex", True)
        or byte_level.get("add_prefix_space", False)
    ):
        raise ValueError(f"tokenizer.json: {shape}")
    return pattern


def _check_merges(model: dict[str, Any], ranks: dict[bytes, int]) -> None:
    """Check the BPE model is one tiktoken's rank-order BPE reproduces id for id.

    That holds for what `bpe_merges` writes: every split of every token into two tokens, in the
    order of the rank they make, with `ignore_merges` (whole-vocabulary pre-tokens are taken as
    they are, as tiktoken does). A merge list missing some splits (GPT-2's, for one) lets
    tiktoken join pairs `tokenizers` would not, so it is refused rather than imported wrongly.
    """
    if not model.get("ignore_merges"):
        raise ValueError(
            "tokenizer.json: model.ignore_merges must be true (tiktoken takes a pre-token that "
            "is in the vocabulary whole)"
        )
    if model.get("dropout") or model.get("byte_fallback"):
        raise ValueError("tokenizer.json: BPE dropout and byte_fallback have no tiktoken form")
    merges = model.get("merges")
    if not isinstance(merges, list):
        raise ValueError("tokenizer.json: model.merges must be a list")
    seen: set[tuple[bytes, bytes]] = set()
    last_rank = -1
    for index, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if (
            not isinstance(parts, list)
            or len(parts) != 2
            or not all(isinstance(part, str) for part in parts)
        ):
            raise ValueError(f"tokenizer.json: merge {index} ({merge!r}) is not a pair of tokens")
        left, right = (token_to_bytes(part) for part in parts)
        rank = ranks.get(left + right)
        if rank is None or left not in ranks or right not in ranks:
            raise ValueError(f"tokenizer.json: merge {index} ({merge!r}) uses a token not in vocab")
        if rank < last_rank:
            raise ValueError(
                f"tokenizer.json: merge {index} ({merge!r}) comes after a merge making a "
                f"later-ranked token; tiktoken merges in rank order"
            )
        last_rank = rank
        seen.add((left, right))
    expected = set(bpe_merges(ranks))
    if seen != expected:
        absent = sorted(expected - seen, key=lambda pair: ranks[pair[0] + pair[1]])
        example = f" (first missing: {absent[0]!r})" if absent else ""
        raise ValueError(
            f"tokenizer.json: the merges are not every split of every token "
            f"({len(expected - seen)} missing){example}, so tiktoken's rank-order BPE would "
            f"give other ids than this file"
        )


__all__ = [
    "CHAT_TEMPLATE",
    "TRAINING_CHAT_TEMPLATE",
    "SPECIAL_TOKENS_MAP",
    "TOKENIZER_CONFIG",
    "TOKENIZER_JSON",
    "bpe_merges",
    "byte_to_unicode",
    "bytes_to_token",
    "token_to_bytes",
    "tokenizer_from_hf",
    "tokenizer_json",
    "write_hf_tokenizer",
]
