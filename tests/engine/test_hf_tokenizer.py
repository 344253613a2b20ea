"""Hugging Face export of the tokenizer (engine/hf_tokenizer.py): same ids, same text, same chat.

The exported folder is loaded the way users load it (`AutoTokenizer.from_pretrained`, and
`tokenizers.Tokenizer.from_file` for the bare pipeline) and compared id for id with our
tiktoken-based `Tokenizer` on text built to hit every branch of the split regex, on a few
hundred KB of held-out text, on every vocabulary entry, and on the chat format.
"""

import json
import random
from pathlib import Path

import pytest
import tiktoken

from engine.hf_tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    TRAINING_CHAT_TEMPLATE,
    bpe_merges,
    byte_to_unicode,
    bytes_to_token,
    token_to_bytes,
    tokenizer_from_hf,
    write_hf_tokenizer,
)
from engine.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

# Not in requirements.txt: the export only writes JSON; loading it back needs these.
tokenizers = pytest.importorskip("tokenizers", reason="the HF export is checked with tokenizers")
transformers = pytest.importorskip("transformers", reason="the HF export is loaded by transformers")
jinja2 = pytest.importorskip("jinja2")

REPO = Path(__file__).resolve().parents[2]

MULTILINGUAL = [
    "안녕하세요, 세계! 오늘 날씨가 좋네요.",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "مرحبا بالعالم، كيف حالك اليوم؟ ١٢٣٤٥",
    "Ça va? Déjà vu, naïve façade, señor Müller, Øresund, Straße, ÆØÅ.",
    "Привет, мир! Как дела? Ёлка.",
    "こんにちは世界、カタカナとひらがな。",
    "नमस्ते दुनिया, क्या हाल है?",
    "สวัสดีชาวโลก",
    "שלום עולם",
    "Γειά σου Κόσμε",
    "Tiếng Việt có dấu: người, được, những.",
    "decomposed: e\u0301 a\u0308 n\u0303, lone mark \u0301 at start",
]

# Every branch of the split regex, and the characters where regex engines tend to disagree.
EDGE_CASES = [
    *MULTILINGUAL,
    "family 👨‍👩‍👧‍👦, flag 🏳️‍🌈, skin 👍🏽, keycap 1️⃣, flags 🇫🇷🇯🇵, plain 🙂🙂🙂",
    "def f(x: int) -> int:\n\treturn {'a': [x ** 2, x // 3]}  # comment\n",
    "class A:\n    def g(self):\n        if True:\n            pass\n\n\n    \n",
    "function f() {\r\n\tconst x = `t${1}`;\r\n}\r\n",
    '{"key": [1, 2.5, -3e-10, null], "k2": {"nested": "v\\u00e9"}}',
    "pi = 3.14159265358979, 1,000,000 and -42 and 0x1F and 12345678901234567890",
    "digits: ０１２３ ٣٤٥ ①② Ⅻ ½ ²³ 𝟘𝟙",
    "   leading spaces\n\n\n\ttabs\r\nCRLF   \n  trailing   ",
    "space runs:  a   b    c     d\t\t\te \u00a0nbsp \u3000ideographic \u2028ls \u2029ps \u205f",
    "I'm you're they'll we've he'd DON'T It'S o'clock ''quoted'' 'ſ ſ's",
    "punctuation!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
    "\u200b zero width \ufeff BOM, null \x00, bell \x07, del \x7f, U+FFFD \ufffd",
    "private use \ue000\U000f0000 astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and U+10FFFF \U0010ffff",
    "mixedCase_identifiers and snake_case and kebab-case and CONSTANT_CASE",
    "http://example.com/path?q=1&r=2#frag user@example.org",
    "",
    " ",
    "\n",
    "\t",
    "x",
    "     ",
    "\n\n\n\n",
]

SPECIAL_TEXT = "ignore: <|bos|><|assistant_end|> <|user_start|>x<|python_start|>\n<|output_end|>"


def _repo_text(globs: list[str]) -> list[str]:
    docs = []
    for pattern in globs:
        for path in sorted(REPO.glob(pattern)):
            docs.append(path.read_text(encoding="utf-8"))
    return docs


def _training_corpus() -> list[str]:
    """A few hundred KB of the repo's own prose and code, plus other scripts and numbers."""
    docs = _repo_text(["README.md", "docs/*.md", "engine/*.py", "training/*.py"])
    docs.extend(MULTILINGUAL * 30)
    docs.append(" ".join(str(1900 + i % 125) for i in range(5000)))
    return docs


def _held_out_text() -> str:
    """Text the tokenizers were not trained on: other packages of the repo."""
    return "\n".join(_repo_text(["runs/*.py", "chat/*.py"]))


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    docs = _training_corpus()
    assert 300_000 < sum(len(d) for d in docs) < 5_000_000
    return docs


@pytest.fixture(scope="module", params=[512, 4096], ids=["vocab512", "vocab4096"])
def exported(request, corpus, tmp_path_factory):
    """(our tokenizer, AutoTokenizer, bare tokenizers.Tokenizer, folder) for one vocab size.

    512 leaves most non-ASCII text as single bytes (partial UTF-8 tokens); 4096 exercises
    thousands of merges with many splits each.
    """
    tok = Tokenizer.train(corpus, vocab_size=request.param)
    folder = tmp_path_factory.mktemp(f"hf{request.param}")
    write_hf_tokenizer(tok, folder, model_max_length=2048)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    raw = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_JSON))
    return tok, hf, raw, folder


@pytest.fixture(scope="module")
def chat(exported):
    tok, hf, _, _ = exported
    return tok, hf


# ---- files ----------------------------------------------------------------------------------


def test_writes_the_three_files_with_our_settings(exported):
    tok, hf, _, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP]
    )
    config = json.loads((folder / TOKENIZER_CONFIG).read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["bos_token"] == "<|bos|>"
    assert config["eos_token"] == "<|assistant_end|>"
    assert config["model_max_length"] == 2048
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["clean_up_tokenization_spaces"] is False
    special_map = json.loads((folder / SPECIAL_TOKENS_MAP).read_text())
    assert special_map["bos_token"] == "<|bos|>"
    assert sorted(special_map["additional_special_tokens"]) == sorted(
        set(SPECIAL_TOKENS) - {"<|bos|>", "<|assistant_end|>"}
    )
    data = json.loads((folder / TOKENIZER_JSON).read_text())
    assert data["normalizer"] is None
    assert data["post_processor"] is None
    assert data["pre_tokenizer"]["pretokenizers"][0]["pattern"] == {"Regex": SPLIT_PATTERN}
    assert data["model"]["ignore_merges"] is True
    assert len(data["model"]["vocab"]) == tok.vocab_size - len(SPECIAL_TOKENS)
    assert hf.model_max_length == 2048
    assert len(hf) == tok.vocab_size


def test_write_returns_the_paths_and_overwrites_in_place(tmp_path):
    tok = Tokenizer.train(MULTILINGUAL * 5, vocab_size=300)
    paths = write_hf_tokenizer(tok, tmp_path / "new" / "folder")
    assert [p.name for p in paths] == [TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP]
    assert all(p.is_file() for p in paths)
    again = write_hf_tokenizer(tok, tmp_path / "new" / "folder", eos_token="<|bos|>")
    assert again == paths
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(p.name for p in paths)
    assert json.loads(paths[1].read_text())["eos_token"] == "<|bos|>"
    assert "model_max_length" not in json.loads(paths[1].read_text())


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"eos_token": "<|nope|>"}, "eos_token '<|nope|>' is not a special token"),
        ({"model_max_length": 0}, "model_max_length must be a positive int"),
        ({"model_max_length": "2048"}, "model_max_length must be a positive int"),
        ({"model_max_length": True}, "model_max_length must be a positive int"),
    ],
)
def test_write_rejects_bad_arguments(tmp_path, kwargs, error):
    tok = Tokenizer.train(MULTILINGUAL * 5, vocab_size=300)
    with pytest.raises(ValueError, match=error):
        write_hf_tokenizer(tok, tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())


# ---- encoding and decoding ------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(EDGE_CASES)))
def test_edge_case_ids_match(exported, index):
    tok, hf, raw, _ = exported
    text = EDGE_CASES[index]
    ours = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ours
    assert hf(text)["input_ids"] == ours  # no BOS/EOS added by default, like our encode
    assert raw.encode(text).ids == ours
    assert hf.decode(ours) == text
    assert raw.decode(ours, skip_special_tokens=False) == text


def test_long_varied_text_ids_match(exported):
    tok, hf, raw, _ = exported
    text = "\n".join(EDGE_CASES) + "\n" + _held_out_text()
    assert len(text) > 200_000
    ours = tok.encode(text)
    # The chat code quotes special-token strings, which only this mode leaves as text.
    assert "<|assistant_end|>" in text
    assert hf(text, split_special_tokens=True)["input_ids"] == ours
    raw.encode_special_tokens = True
    try:
        assert raw.encode(text).ids == ours
    finally:
        raw.encode_special_tokens = False
    assert hf.decode(ours) == text


def test_batch_encoding_matches(exported):
    tok, hf, _, _ = exported
    assert hf(EDGE_CASES)["input_ids"] == tok.encode(EDGE_CASES, num_threads=2)


def test_every_vocabulary_entry_and_random_joins_encode_alike(exported):
    """Each token's own text, and texts glued from random tokens, where merges compete most."""
    tok, _, raw, _ = exported
    n_ranks = tok.vocab_size - len(SPECIAL_TOKENS)
    texts = [tok.id_to_bytes(i).decode("utf-8", "replace") for i in range(n_ranks)]
    rng = random.Random(0)
    texts += ["".join(rng.choices(texts, k=rng.randint(2, 6))) for _ in range(5000)]
    encoded = raw.encode_batch(texts)
    mismatched = [t for t, e in zip(texts, encoded, strict=True) if e.ids != tok.encode(t)]
    assert mismatched == []


def test_each_id_decodes_alike_even_partial_characters(exported):
    tok, hf, _, _ = exported
    for token_id in range(tok.vocab_size):
        assert hf.decode([token_id]) == tok.decode([token_id]), token_id


def test_special_tokens_map_to_our_ids(exported):
    tok, hf, raw, _ = exported
    for name in SPECIAL_TOKENS:
        assert hf.convert_tokens_to_ids(name) == tok.encode_special(name)
        assert raw.token_to_id(name) == tok.encode_special(name)
        assert hf.decode([tok.encode_special(name)]) == name
    assert hf.bos_token_id == tok.get_bos_token_id()
    assert hf.eos_token_id == tok.encode_special("<|assistant_end|>")
    assert sorted(hf.all_special_ids) == sorted(tok.encode_special(n) for n in SPECIAL_TOKENS)
    ids = [tok.get_bos_token_id(), *tok.encode("hi"), tok.encode_special("<|assistant_end|>")]
    assert hf.decode(ids, skip_special_tokens=True) == "hi"


def test_special_token_text_is_plain_text_with_split_special_tokens(exported):
    """Our encode never reads special tokens out of text; HF does unless told not to.

    HF's default is kept on purpose (chat templates and serving stacks render special tokens
    as text); `split_special_tokens=True` gives exactly our ids.
    """
    tok, hf, raw, _ = exported
    ours = tok.encode(SPECIAL_TEXT)
    specials = {tok.encode_special(name) for name in SPECIAL_TOKENS}
    assert not set(ours) & specials
    assert hf(SPECIAL_TEXT, split_special_tokens=True)["input_ids"] == ours
    raw.encode_special_tokens = True
    try:
        assert raw.encode(SPECIAL_TEXT).ids == ours
    finally:
        raw.encode_special_tokens = False
    default = hf.encode(SPECIAL_TEXT, add_special_tokens=False)
    assert tok.get_bos_token_id() in default
    assert hf.decode(default) == SPECIAL_TEXT


def test_split_regex_cuts_unicode_exactly_like_tiktoken():
    """Oniguruma (tokenizers) and fancy-regex (tiktoken) agree on every class in the pattern.

    Probed with an encoding whose vocabulary is exactly the pieces `tokenizers` cut, so tiktoken
    returns them whole only if it cuts the same pieces. Covers all code points below U+3100
    (Latin to CJK punctuation, every space character) and a stride through the rest.
    """
    pre = tokenizers.pre_tokenizers.Split(
        tokenizers.Regex(SPLIT_PATTERN), behavior="isolated", invert=False
    )
    points = [*range(0x3100), *range(0x3100, 0x110000, 61)]
    chars = [chr(c) for c in points if not 0xD800 <= c < 0xE000]
    mismatched = []
    for start in range(0, len(chars), 2048):
        block = chars[start : start + 2048]
        texts = [sep.join(block) for sep in ("", " ", "a", "1", "'", "\n")]
        pieces = [[p for p, _ in pre.pre_tokenize_str(t)] for t in texts]
        ranks = {bytes([b]): b for b in range(256)}
        for piece in {p.encode() for ps in pieces for p in ps}:
            ranks.setdefault(piece, len(ranks))
        probe = tiktoken.Encoding(
            "probe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={}
        )
        for text, cut in zip(texts, pieces, strict=True):
            if probe.decode_tokens_bytes(probe.encode_ordinary(text)) != [p.encode() for p in cut]:
                mismatched.append((block[0], text[:20]))
    assert mismatched == []


# ---- chat template --------------------------------------------------------------------------

THREE_TURNS = [
    {"role": "system", "content": "You are terse.\nAnswer in one line."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And   in\twords?  "},
    {"role": "assistant", "content": "Four. 🙂"},
    {"role": "user", "content": "Danke schön! 谢谢"},
    {"role": "assistant", "content": " You're welcome.\n"},
]

TOOL_USE = [
    {"role": "user", "content": "What is 6 times 7?"},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me compute it."},
            {"type": "python", "text": "6*7"},
            {"type": "python_output", "text": "42"},
            {"type": "text", "text": "It is 42."},
        ],
    },
]


@pytest.mark.parametrize("messages", [THREE_TURNS, TOOL_USE], ids=["three_turns", "tool_use"])
def test_chat_template_gives_our_rendering_and_mask(chat, messages):
    tok, hf = chat
    ids, mask = tok.render_conversation({"messages": messages}, max_tokens=10**6)
    assert hf.apply_chat_template(messages, return_dict=False) == ids
    assert hf.apply_chat_template(messages, tokenize=False) == tok.decode(ids)
    out = hf.apply_chat_template(
        messages,
        chat_template=TRAINING_CHAT_TEMPLATE,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == mask


def test_generation_prompt_gives_render_for_completion(chat):
    tok, hf = chat
    asking = THREE_TURNS[:-1]  # ends with the user's question
    expected = tok.render_for_completion({"messages": asking})
    assert expected[-1] == tok.encode_special("<|assistant_start|>")
    got = hf.apply_chat_template(asking, add_generation_prompt=True, return_dict=False)
    assert got == expected
    # Like render_for_completion, a trailing assistant reply is the one to regenerate.
    again = hf.apply_chat_template(THREE_TURNS, add_generation_prompt=True, return_dict=False)
    assert again == tok.render_for_completion({"messages": THREE_TURNS}) == expected


def test_continue_final_message_leaves_the_reply_open(chat):
    tok, hf = chat
    ids, _ = tok.render_conversation({"messages": THREE_TURNS}, max_tokens=10**6)
    open_ended = hf.apply_chat_template(THREE_TURNS, continue_final_message=True, return_dict=False)
    assert open_ended == ids[:-1]  # all but <|assistant_end|>


def test_chat_template_renders_with_plain_jinja():
    """Other runtimes render it with their own Jinja: no extension tags, no trim settings."""
    assert "generation" not in CHAT_TEMPLATE.replace("add_generation_prompt", "")
    env = jinja2.Environment()

    def raise_exception(message):
        raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    template = env.from_string(CHAT_TEMPLATE)
    assert template.render(messages=TOOL_USE, add_generation_prompt=False) == (
        "<|bos|><|user_start|>What is 6 times 7?<|user_end|><|assistant_start|>Let me compute it."
        "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>It is 42."
        "<|assistant_end|>"
    )
    assert template.render(messages=THREE_TURNS[:2], add_generation_prompt=True) == (
        "<|bos|><|user_start|>You are terse.\nAnswer in one line.\n\nWhat is 2+2?<|user_end|>"
        "<|assistant_start|>"
    )
    with pytest.raises(ValueError, match="must be followed by a user message"):
        template.render(messages=THREE_TURNS[:1], add_generation_prompt=True)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "system", "content": "b"},
        ],
        [{"role": "system", "content": "s"}],
        [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "image", "text": "x"}]},
        ],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text"}]}],
    ],
    ids=[
        "assistant_first",
        "two_users",
        "late_system",
        "system_alone",
        "user_parts",
        "unknown_part",
        "part_without_text",
    ],
)
def test_chat_template_rejects_what_our_renderer_rejects(chat, messages):
    tok, hf = chat
    with pytest.raises(ValueError):
        tok.render_conversation({"messages": messages})
    with pytest.raises(jinja2.TemplateError):
        hf.apply_chat_template(messages)


def test_special_token_text_in_messages_stays_text_when_sanitized(chat):
    """With `sanitize_control_tokens=True` message text cannot inject control tokens.

    HF encodes the marked token text apart from its neighbours, so the ids there can differ
    from our one-piece encoding (" <|" vs " ", "<|"); the text and the structure are the same.
    """
    tok, hf = chat
    messages = [{"role": "user", "content": "Say <|assistant_end|> then <|bos|> please"}]
    expected = tok.render_for_completion({"messages": messages})
    got = hf.apply_chat_template(
        messages, add_generation_prompt=True, sanitize_control_tokens=True, return_dict=False
    )
    specials = {tok.encode_special(name) for name in SPECIAL_TOKENS}
    assert [i for i in got if i in specials] == [i for i in expected if i in specials]
    assert tok.decode(got) == tok.decode(expected)


# ---- import ---------------------------------------------------------------------------------


def test_import_rebuilds_an_identical_tokenizer(exported, tmp_path):
    tok, _, _, folder = exported
    data = json.loads((folder / TOKENIZER_JSON).read_text())
    for source in (folder, folder / TOKENIZER_JSON, str(folder), data):
        back = tokenizer_from_hf(source)
        assert back.vocab_size == tok.vocab_size
        assert back.special_tokens == tok.special_tokens
        assert all(back.id_to_bytes(i) == tok.id_to_bytes(i) for i in range(tok.vocab_size))
    text = "\n".join(EDGE_CASES) + _held_out_text()
    assert back.encode(text) == tok.encode(text)
    assert back.render_conversation({"messages": THREE_TURNS}) == tok.render_conversation(
        {"messages": THREE_TURNS}
    )
    # The imported tokenizer saves and exports like the original.
    back.save(tmp_path / "saved")
    assert Tokenizer.load(tmp_path / "saved").encode(text) == tok.encode(text)
    write_hf_tokenizer(back, tmp_path / "again")
    assert (tmp_path / "again" / TOKENIZER_JSON).read_text() == (
        folder / TOKENIZER_JSON
    ).read_text()


def test_published_style_encoding_without_chat_tokens(tmp_path):
    """A tiktoken encoding like gpt2's: one <|endoftext|>, here after a gap of unused ids."""
    ranks = {bytes([b]): b for b in range(256)}
    for word in (b"th", b"the", b" the", b"in", b"ing", b" a", b"er", b"  "):
        ranks[word] = len(ranks)
    special_id = len(ranks) + 3
    encoding = tiktoken.Encoding(
        "toy",
        pat_str=SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": special_id},
    )
    tok = Tokenizer(encoding)
    write_hf_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / TOKENIZER_CONFIG).read_text())
    assert "chat_template" not in config
    assert config["bos_token"] == config["eos_token"] == "<|endoftext|>"
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "the thing in the   string, 12345 ünïcödé"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.convert_tokens_to_ids("<|endoftext|>") == special_id
    assert len(hf) == tok.vocab_size == special_id + 1
    assert hf.decode([*tok.encode(text), special_id]) == text + "<|endoftext|>"
    back = tokenizer_from_hf(tmp_path)
    assert back.encode(text) == tok.encode(text)
    assert back.encode_special("<|endoftext|>") == special_id
    assert back.special_tokens == ["<|endoftext|>"]  # the placeholders for unused ids are dropped
    assert back.vocab_size == tok.vocab_size


def _mutate(data, path, value):
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        (("model", "type"), "WordPiece", "must be a BPE model"),
        (("normalizer",), {"type": "NFC"}, "a normalizer is not supported"),
        (("model", "ignore_merges"), False, "ignore_merges must be true"),
        (("model", "merges"), "a b", "merges must be a list"),
        (("model", "byte_fallback"), True, "byte_fallback"),
        (("model", "continuing_subword_prefix"), "##", "subword prefixes"),
        (("model", "vocab"), {}, "non-empty object"),
        (("pre_tokenizer",), None, "pre_tokenizer must be Sequence"),
        (("pre_tokenizer",), {"type": "ByteLevel", "use_regex": True}, "pre_tokenizer must be"),
        (("pre_tokenizer", "pretokenizers", 1, "use_regex"), True, "pre_tokenizer must be"),
        (("pre_tokenizer", "pretokenizers", 0, "behavior"), "Removed", "pre_tokenizer must be"),
        (("pre_tokenizer", "pretokenizers", 0, "pattern"), {"String": " "}, "pre_tokenizer"),
        (("added_tokens",), {"id": 1}, "added_tokens must be a list"),
        (("added_tokens", 0, "special"), False, "is not special"),
        (("added_tokens", 0, "id"), 5, "reuses id 5"),
        (("added_tokens", 0, "id"), "5", "needs str content, int id"),
    ],
)
def test_import_rejects_what_tiktoken_cannot_reproduce(exported, path, value, error):
    _, _, _, folder = exported
    data = json.loads((folder / TOKENIZER_JSON).read_text())
    _mutate(data, path, value)
    with pytest.raises(ValueError, match=error):
        tokenizer_from_hf(data)


def test_import_rejects_merges_and_vocab_that_disagree(exported):
    _, _, _, folder = exported
    original = json.loads((folder / TOKENIZER_JSON).read_text())
    merges = original["model"]["merges"]

    data = json.loads(json.dumps(original))
    del data["model"]["merges"][len(merges) // 2]
    with pytest.raises(ValueError, match="not every split of every token .1 missing"):
        tokenizer_from_hf(data)

    data = json.loads(json.dumps(original))
    data["model"]["merges"] = merges[::-1]
    with pytest.raises(ValueError, match="later-ranked token"):
        tokenizer_from_hf(data)

    data = json.loads(json.dumps(original))
    data["model"]["merges"][0] = "a b c"
    with pytest.raises(ValueError, match="merge 0 .* is not a pair"):
        tokenizer_from_hf(data)

    data = json.loads(json.dumps(original))
    data["model"]["merges"].append("Ā Ā")  # two \x00 bytes, never merged
    with pytest.raises(ValueError, match="uses a token not in vocab"):
        tokenizer_from_hf(data)

    data = json.loads(json.dumps(original))
    del data["model"]["vocab"]["Ā"]  # byte 0
    with pytest.raises(ValueError, match="1 byte values have no token .first: 0"):
        tokenizer_from_hf(data)

    data = json.loads(json.dumps(original))
    data["model"]["vocab"]["tab\t"] = 10**6  # a tab names no byte in byte-level BPE
    with pytest.raises(ValueError, match="not a byte-level BPE name"):
        tokenizer_from_hf(data)

    data = json.loads(json.dumps(original))
    data["model"]["vocab"]["!"] = data["model"]["vocab"]["a"]
    with pytest.raises(ValueError, match="share an id"):
        tokenizer_from_hf(data)


def test_import_reads_files_carefully(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / TOKENIZER_JSON)):
        tokenizer_from_hf(tmp_path)
    (tmp_path / TOKENIZER_JSON).write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a list, expected a JSON object"):
        tokenizer_from_hf(tmp_path)
    (tmp_path / TOKENIZER_JSON).write_bytes(b"{\xff}")
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        tokenizer_from_hf(tmp_path)
    monkeypatch.setattr("engine.hf_tokenizer.MAX_TOKENIZER_JSON_BYTES", 2)
    with pytest.raises(ValueError, match="more than the 2 a tokenizer.json may have"):
        tokenizer_from_hf(tmp_path / TOKENIZER_JSON)


# ---- building blocks ------------------------------------------------------------------------


def test_byte_names_are_a_printable_bijection():
    table = byte_to_unicode()
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"
    every_byte = bytes(range(256))
    assert token_to_bytes(bytes_to_token(every_byte)) == every_byte


def test_merges_list_every_split_in_rank_order():
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"ab", b"bc", b"abc", b"ca", b"abca"):
        ranks[token] = len(ranks)
    assert bpe_merges(ranks) == [
        (b"a", b"b"),
        (b"b", b"c"),
        (b"a", b"bc"),  # both splits of "abc", lower-ranked left part first
        (b"ab", b"c"),
        (b"c", b"a"),
        (b"ab", b"ca"),  # "abca" = "ab"+"ca" = "abc"+"a"
        (b"abc", b"a"),
    ]


def test_ranks_tokenizers_cannot_number_are_refused(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"ab"] = 300  # ids 256..299 unused among the ranks
    encoding = tiktoken.Encoding(
        "gappy",
        pat_str=SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 301},
    )
    with pytest.raises(ValueError, match="ranks are not the ids 0..n-1"):
        write_hf_tokenizer(Tokenizer(encoding), tmp_path)


def test_a_word_in_the_vocabulary_is_one_token_even_where_merges_miss_it(tmp_path):
    """tiktoken takes a whole pre-token found in the vocabulary; merges alone would not get
    there ("bc" is merged first, and no merge joins "a"+"bc" or "bc"+"d")."""
    ranks = {bytes([b]): b for b in range(256)}
    for word in (b"bc", b"ab", b"cd", b"abcd"):
        ranks[word] = len(ranks)
    encoding = tiktoken.Encoding(
        "toy",
        pat_str=SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )
    tok = Tokenizer(encoding)
    write_hf_tokenizer(tok, tmp_path)
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / TOKENIZER_JSON))
    assert tok.encode("abcd abcde") == [
        ranks[b"abcd"],
        32,
        ord("a"),
        ranks[b"bc"],
        ord("d"),
        ord("e"),
    ]
    assert raw.encode("abcd abcde").ids == tok.encode("abcd abcde")
