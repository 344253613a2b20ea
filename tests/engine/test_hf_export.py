"""Hugging Face export and import (engine/hf_export.py, engine/hf_import.py, engine/export.py).

A tiny checkpoint of each family (weights perturbed so no block is the identity) is exported,
loaded with `transformers` -- a test dependency; the product never imports it -- and held to our
own forward: fp32 logits within 1e-4 on a sequence long enough for GPT's sliding windows to
bind, and greedy `generate()` equal to ours, cached and uncached, alone and left-padded in a
batch. GPT is held both as nanochat's 2026 model (smear gate, backout, qk scale, value gate,
rotary base 100k: GPTConfig's defaults) and as the model before it (a config dict lacking those
fields: every checkpoint written before, held by the committed 2026-12 checkpoint too). The export is imported back and must be the same checkpoint (bit for bit), and chat with
it must answer exactly as with the original. Refusals name what is wrong.
"""

from __future__ import annotations

import ast
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import load_model, load_tokenizer_for, save_checkpoint, tokenizer_dir
from engine.engine import Engine
from engine.export import main as export_main
from engine.hf_export import (
    CARD_FILE,
    CONFIG_FILE,
    GPT_FIELDS,
    HYBRID_FIELDS,
    REMOTE_DIR,
    TOKENIZER_COPY_FILE,
    WEIGHTS_FILE,
    ExportError,
    export_checkpoint,
    safe_settings,
    zip_chunks,
)
from engine.hf_import import import_folder
from engine.models.gpt import GPTConfig
from engine.models.registry import build_model, config_from_dict
from engine.tokenizer import Tokenizer

# Never reach the network from a test (transformers would look up the hub for a bare name).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 😀",
    "Größe, naïve café — 東京は晴れ。안녕하세요 세계! 🎉🚀 emoji 👩‍💻 and 12345 numbers.",
    "How many r are in strawberry? Let me count the letters one by one.",
]
_GPT_SHAPE = dict(sequence_len=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
FAMILIES = {
    # Every field at GPTConfig's default but the short window's rounding (8, not 128), so the
    # quarter-context windows bind within the test sequences.
    "gpt": {
        k: v
        for k, v in GPTConfig(**_GPT_SHAPE, short_window_multiple=8).to_dict().items()
        if k != "vocab_size"
    },
    # The fields a checkpoint written before nanochat's 2026 model lacks: their legacy values.
    "gpt-legacy": dict(model="gpt", **_GPT_SHAPE),
    "gpt2": dict(model="gpt2", sequence_len=48, n_layer=2, n_head=4, n_embd=64, d_ff=0),
    "gpt2-nobias": dict(
        model="gpt2", sequence_len=48, n_layer=2, n_head=4, n_embd=64, d_ff=96, bias=False
    ),
    "hybrid": dict(
        model="hybrid",
        sequence_len=32,
        n_layer=4,
        n_embd=64,
        layer_pattern="LLLF",
        n_head=4,
        n_kv_head=2,
        head_dim=16,
        partial_rotary=0.5,
        n_k_heads=2,
        n_v_heads=4,
        k_head_dim=16,
        v_head_dim=16,
        chunk_size=8,
        num_experts=4,
        experts_per_token=2,
        expert_dim=32,
        shared_expert_dim=32,
    ),  # fmt: skip
}
REMOTE = {"gpt", "gpt-legacy", "hybrid"}
# Longer than GPT's short windows (8 and 16) and its training context (32).
TEST_LENGTH = {"gpt": 45, "gpt-legacy": 45, "gpt2": 40, "gpt2-nobias": 40, "hybrid": 45}
STEP = 7


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS * 20, vocab_size=320)


def make_checkpoint(directory: Path, name: str, tokenizer: Tokenizer, seed: int = 0) -> Path:
    """A saved checkpoint of family `name` with every weight non-trivial, tokenizer beside."""
    torch.manual_seed(seed)
    config = config_from_dict({**FAMILIES[name], "vocab_size": tokenizer.vocab_size})
    model = build_model(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    save_checkpoint(directory, STEP, model_state=model.state_dict(), model_config=config,
                    meta={"val_bpb": 1.25, "user_config": {"depth": 2, "data_dir": "/srv/x"}})  # fmt: skip
    tokenizer.save(tokenizer_dir(directory))
    return directory


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tokenizer, tmp_path_factory):
    """(family name, checkpoint dir, export folder)."""
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = make_checkpoint(root / "ckpt", request.param, tokenizer)
    export_checkpoint(checkpoint, root / "export")
    return request.param, checkpoint, root / "export"


def load_hf(folder: Path, name: str):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=name in REMOTE, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def test_export_folder_holds_the_promised_files(exported):
    name, _, folder = exported
    files = {p.name for p in folder.iterdir()}
    assert {WEIGHTS_FILE, CONFIG_FILE, "generation_config.json", CARD_FILE} <= files
    assert TOKENIZER_COPY_FILE in files
    remote = {f for f in files if f.endswith(".py")}
    # GPT-2 is transformers' own class: no code ships with it.
    assert bool(remote) == (name in REMOTE)
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["nanochat"]["step"] == STEP
    assert config["nanochat"]["model_config"]["model"] == FAMILIES[name]["model"]
    if name in REMOTE:
        for module in config["auto_map"].values():
            assert f"{module.split('.')[0]}.py" in files


def test_logits_equal_ours_within_1e4(exported, tokenizer):
    name, checkpoint, folder = exported
    ours, _ = load_model(checkpoint)
    theirs = load_hf(folder, name)
    if name.startswith("gpt2"):
        assert type(theirs).__name__ == "GPT2LMHeadModel"
    if name.startswith("gpt-"):
        # The legacy model really is the legacy one, the new one the new one.
        assert (ours.config.smear, ours.config.rotary_base) == (False, 10_000)
    elif name == "gpt":
        assert (ours.config.smear, ours.config.backout, ours.config.rotary_base) == (
            True, True, 100_000)  # fmt: skip
    ids = torch.randint(0, tokenizer.vocab_size, (2, TEST_LENGTH[name]), generator=torch.Generator().manual_seed(1))  # fmt: skip
    with torch.no_grad():
        expected = ours(ids)
        got = theirs(ids).logits
    assert got.shape == expected.shape
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # Not a vacuous match: the logits spread over several units.
    assert float(expected.std()) > 0.1


def test_greedy_generate_equals_ours(exported, tokenizer):
    name, checkpoint, folder = exported
    ours, _ = load_model(checkpoint)
    theirs = load_hf(folder, name)
    prompt = tokenizer.encode("def add(a, b):", prepend="<|bos|>")
    expected = list(ours.generate_naive(prompt, 10))
    for use_cache in (True, False):
        with torch.no_grad():
            out = theirs.generate(
                torch.tensor([prompt]), max_new_tokens=10, do_sample=False, use_cache=use_cache,
                eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        assert out[0, len(prompt) :].tolist() == expected, f"use_cache={use_cache}"


@pytest.mark.parametrize("name", sorted(REMOTE))
def test_left_padded_batch_generates_each_row_as_alone(name, tokenizer, tmp_path):
    """The remote code's own decode state keeps rows apart and skips padding: a short prompt
    padded on the left continues as it would alone."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", name, tokenizer, seed=3)
    export_checkpoint(checkpoint, tmp_path / "export")
    ours, _ = load_model(checkpoint)
    theirs = load_hf(tmp_path / "export", name)
    long = tokenizer.encode("The quick brown fox jumps", prepend="<|bos|>")
    short = tokenizer.encode("안녕", prepend="<|bos|>")
    pad = len(long) - len(short)
    ids = torch.tensor([long, [0] * pad + short])
    mask = torch.tensor([[1] * len(long), [0] * pad + [1] * len(short)])
    with torch.no_grad():
        out = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                              do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert out[0, len(long) :].tolist() == list(ours.generate_naive(long, 6))
    assert out[1, len(long) :].tolist() == list(ours.generate_naive(short, 6))


def test_import_gives_back_the_same_checkpoint(exported, tmp_path):
    name, checkpoint, folder = exported
    result = import_folder(folder, tmp_path / "back")
    assert result.step == STEP and result.has_tokenizer
    original, meta = load_model(checkpoint)
    imported, imported_meta = load_model(tmp_path / "back")
    assert imported_meta["model_config"] == meta["model_config"]
    assert imported_meta["val_bpb"] == 1.25
    original_state, imported_state = original.state_dict(), imported.state_dict()
    assert original_state.keys() == imported_state.keys()
    for key, value in original_state.items():
        assert torch.equal(value, imported_state[key]), key
    text = CORPUS[2]
    assert load_tokenizer_for(tmp_path / "back").encode(text) == load_tokenizer_for(
        checkpoint
    ).encode(text)


def test_reimported_checkpoint_chats_like_the_original(exported, tmp_path):
    """Chat: the conversation rendered for completion, greedy through the engine, gives the
    same reply from the re-imported checkpoint; transformers' generate stops at the same place
    with the same tokens (its stop ids are the chat's)."""
    name, checkpoint, folder = exported
    import_folder(folder, tmp_path / "back")
    conversation = {"messages": [{"role": "user", "content": "Hello 👋 how are you? 東京"}]}
    replies = []
    for directory in (checkpoint, tmp_path / "back"):
        model, _ = load_model(directory)
        tokenizer = load_tokenizer_for(directory)
        prompt = tokenizer.render_for_completion(conversation)
        sequences, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=12, temperature=0.0)  # fmt: skip
        replies.append(sequences[0][len(prompt) :])
    assert replies[0] == replies[1]
    assert len(replies[0]) > 0
    theirs = load_hf(folder, name)
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    generated = out[0, len(prompt) :].tolist()
    reply = replies[0]
    assert generated[: len(reply)] == reply
    # The engine stops at a stop token or at the model's context (sequence_len), whichever
    # comes first; at a stop token, generate stops there too.
    room = min(12, model.config.sequence_len - len(prompt))
    if len(reply) < room:
        stops = set(json.loads((folder / "generation_config.json").read_text())["eos_token_id"])
        assert generated[len(reply)] in stops


def test_bfloat16_export_round_trips_as_bfloat16(tokenizer, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", "gpt", tokenizer)
    export_checkpoint(checkpoint, tmp_path / "export", dtype="bfloat16")
    tensors = load_file(tmp_path / "export" / WEIGHTS_FILE)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "export" / CONFIG_FILE).read_text())["dtype"] == "bfloat16"
    import_folder(tmp_path / "export", tmp_path / "back")
    original, _ = load_model(checkpoint)
    imported, _ = load_model(tmp_path / "back")
    for key, value in original.state_dict().items():
        assert torch.equal(value.to(torch.bfloat16).float(), imported.state_dict()[key]), key


def test_tokenizer_loads_with_autotokenizer_and_encodes_to_our_ids(exported, tokenizer):
    pytest.importorskip("engine.hf_tokenizer")
    _, _, folder = exported
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in CORPUS:
        assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode(text)


# ---- refusals ------------------------------------------------------------------------------


@pytest.fixture
def gpt_export(tokenizer, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", "gpt", tokenizer)
    export_checkpoint(checkpoint, tmp_path / "export")
    return tmp_path / "export"


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_FILE)


def test_import_refuses_an_unknown_tensor(gpt_export, tmp_path):
    _edit_weights(gpt_export, lambda t: t.update({"backdoor.weight": torch.zeros(2)}))
    with pytest.raises(ExportError, match=r"unknown tensors backdoor\.weight"):
        import_folder(gpt_export, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_import_refuses_a_missing_tensor(gpt_export, tmp_path):
    _edit_weights(gpt_export, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ExportError, match=r"missing tensors lm_head\.weight"):
        import_folder(gpt_export, tmp_path / "back")


def test_import_refuses_a_misshapen_tensor(gpt_export, tmp_path):
    _edit_weights(gpt_export, lambda t: t.update({"resid_lambdas": torch.ones(5)}))
    with pytest.raises(ExportError, match=r"resid_lambdas has shape \[5\], the model needs \[3\]"):
        import_folder(gpt_export, tmp_path / "back")


def test_import_refuses_integer_weights(gpt_export, tmp_path):
    _edit_weights(gpt_export, lambda t: t.update({"x0_lambdas": torch.zeros(3, dtype=torch.int64)}))  # fmt: skip
    with pytest.raises(ExportError, match="x0_lambdas is I64; weights must be floating point"):
        import_folder(gpt_export, tmp_path / "back")


def test_import_refuses_a_config_that_contradicts_its_family(gpt_export, tmp_path):
    path = gpt_export / CONFIG_FILE
    config = json.loads(path.read_text())
    config["model_type"] = "gpt2"
    path.write_text(json.dumps(config))
    with pytest.raises(ExportError, match="model_type 'gpt2' but its model_config is a 'gpt'"):
        import_folder(gpt_export, tmp_path / "back")


def test_import_refuses_a_folder_not_exported_here(gpt_export, tmp_path):
    path = gpt_export / CONFIG_FILE
    config = json.loads(path.read_text())
    del config["nanochat"]
    path.write_text(json.dumps(config))
    with pytest.raises(ExportError, match="no 'nanochat' entry"):
        import_folder(gpt_export, tmp_path / "back")


def test_import_refuses_a_tokenizer_larger_than_the_model(gpt_export, tmp_path):
    path = gpt_export / TOKENIZER_COPY_FILE
    data = json.loads(path.read_text())
    data["special_tokens"]["<|extra|>"] = 4000
    path.write_text(json.dumps(data))
    with pytest.raises(ExportError, match="token id 4000 is outside the model's vocabulary"):
        import_folder(gpt_export, tmp_path / "back")


def test_import_refuses_to_overwrite_a_step(gpt_export, tmp_path):
    import_folder(gpt_export, tmp_path / "back")
    with pytest.raises(ExportError, match=f"already has a checkpoint at step {STEP}"):
        import_folder(gpt_export, tmp_path / "back")
    assert import_folder(gpt_export, tmp_path / "back", step=8).step == 8


def test_import_refuses_nonzero_biases_for_a_bias_free_gpt2(tokenizer, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", "gpt2-nobias", tokenizer)
    export_checkpoint(checkpoint, tmp_path / "export")
    _edit_weights(
        tmp_path / "export", lambda t: t["transformer.ln_f.bias"].fill_(0.5)
    )  # a real bias the model cannot hold
    with pytest.raises(ExportError, match=r"transformer\.ln_f\.bias is not zero"):
        import_folder(tmp_path / "export", tmp_path / "back")


def test_export_refuses_a_non_empty_folder(tokenizer, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", "gpt", tokenizer)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_checkpoint(checkpoint, tmp_path / "export")


def test_export_refuses_config_fields_it_does_not_implement(tokenizer, tmp_path, monkeypatch):
    """A field added to GPTConfig stops the export until the remote code learns it, rather
    than exporting a model whose transformers logits would silently differ."""
    import engine.hf_export as hf_export

    monkeypatch.setattr(hf_export, "GPT_FIELDS", GPT_FIELDS - {"window_pattern"})
    checkpoint = make_checkpoint(tmp_path / "ckpt", "gpt", tokenizer)
    with pytest.raises(ExportError, match=r"fields the export does not implement yet: \['window_pattern'\]"):  # fmt: skip
        export_checkpoint(checkpoint, tmp_path / "export")


@pytest.mark.parametrize(
    ("module", "fields"),
    [("modeling_nanochat_gpt.py", GPT_FIELDS), ("modeling_nanochat_hybrid.py", HYBRID_FIELDS)],
)
def test_remote_code_knows_exactly_the_fields_the_exporter_allows(module, fields):
    tree = ast.parse((REMOTE_DIR / module).read_text())
    known = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and node.targets[0].id == "KNOWN_FIELDS"
    )
    assert set(ast.literal_eval(known)) == set(fields)


def test_every_gpt_config_field_is_implemented():
    """A field GPTConfig gained (nanochat's 2026 model) is one the export implements."""
    assert set(GPTConfig().to_dict()) == set(GPT_FIELDS)


def test_cached_steps_carry_the_smear_gate(tokenizer, tmp_path):
    """transformers' forward fed one token at a time through the decode state gives the
    logits of the whole sequence at once (and ours): the smear gate's previous token crosses
    the steps. With the carried embedding dropped, the logits move -- the check can fail."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", "gpt", tokenizer, seed=5)
    ours, _ = load_model(checkpoint)
    # A wide-open gate, so the previous token weighs in every logit.
    with torch.no_grad():
        ours.smear_lambda.fill_(2.0)
    save_checkpoint(tmp_path / "ckpt", STEP + 1, model_state=ours.state_dict(),
                    model_config=ours.config, meta={})  # fmt: skip
    export_checkpoint(tmp_path / "ckpt", tmp_path / "export", step=STEP + 1)
    theirs = load_hf(tmp_path / "export", "gpt")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))  # fmt: skip
    with torch.no_grad():
        whole = theirs(ids).logits
        torch.testing.assert_close(whole, ours(ids), atol=1e-4, rtol=0)
        out = theirs(ids[:, :7], use_cache=True)
        steps = [out.logits]
        for t in range(7, ids.size(1)):
            state = out.cache
            out = theirs(ids[:, t : t + 1], cache=state, use_cache=True)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-4, rtol=0)
        state = theirs(ids[:, :7], use_cache=True).cache
        state.previous = None
        dropped = theirs(ids[:, 7:8], cache=state, use_cache=True).logits
    assert float((dropped[:, 0] - whole[:, 7]).abs().max()) > 1e-3
    # Left padding: a row's first real token has no previous one (the padding is not smeared
    # into it), so a padded row's logits are those of the row alone.
    pad = 3
    padded = torch.cat((torch.zeros(2, pad, dtype=ids.dtype), ids[:, :-pad]), dim=1)
    mask = torch.ones_like(padded)
    mask[1, :pad] = 0
    padded[0] = ids[0]
    with torch.no_grad():
        logits = theirs(padded, attention_mask=mask).logits
    torch.testing.assert_close(logits[0], whole[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[1, pad:], whole[1, :-pad], atol=1e-4, rtol=0)


# ---- model card, zip, CLI ------------------------------------------------------------------


def test_model_card_tells_how_to_load_and_hides_server_paths(exported):
    name, _, folder = exported
    card = (folder / CARD_FILE).read_text()
    assert "AutoModelForCausalLM.from_pretrained(folder" in card
    assert ("trust_remote_code=True" in card) == (name in REMOTE)
    assert "| depth | 2 |" in card  # from the checkpoint's user_config
    assert "/srv/x" not in card and "data_dir" not in card
    assert "python -m engine.export import" in card


def test_safe_settings_keeps_numbers_and_words_only():
    values = {"depth": 20, "lr": 0.02, "name": "d20", "data_dir": "/data", "out": "/srv/a",
              "nested": {"a": 1}, "inf": float("inf"), "note": "x" * 100, "compile": True}  # fmt: skip
    assert safe_settings(values) == {"depth": 20, "lr": 0.02, "name": "d20", "compile": True}


def test_zip_chunks_stream_the_folder(gpt_export):
    chunks = list(zip_chunks(gpt_export, "model", block_size=4096))
    assert len(chunks) > 3  # produced as it goes, not in one piece
    archive = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
    assert archive.testzip() is None
    names = sorted(archive.namelist())
    assert names == sorted(f"model/{p.name}" for p in gpt_export.iterdir())
    assert archive.read(f"model/{WEIGHTS_FILE}") == (gpt_export / WEIGHTS_FILE).read_bytes()


def test_cli_exports_zips_and_imports(tokenizer, tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "ckpt", "gpt2", tokenizer)
    code = export_main(["export", str(checkpoint), "--out", str(tmp_path / "hf"),
                        "--zip", str(tmp_path / "hf.zip")])  # fmt: skip
    assert code == 0
    assert zipfile.ZipFile(tmp_path / "hf.zip").namelist()
    assert export_main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert f"imported step {STEP}" in capsys.readouterr().out
    # A second import into the same step is refused with the reason, exit status 1.
    assert export_main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 1
    assert "already has a checkpoint" in capsys.readouterr().err


def test_model_card_usage_snippet_runs(exported, tokenizer):
    """The card's Python block, run as written (with the folder filled in), chats."""
    pytest.importorskip("engine.hf_tokenizer")
    name, _, folder = exported
    card = (folder / CARD_FILE).read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    snippet = snippet.replace('"path/to/this/folder"', repr(str(folder)))
    snippet = snippet.replace("max_new_tokens=64", "max_new_tokens=4")
    exec(compile(snippet, "README.md", "exec"), {})


def test_a_checkpoint_saved_without_tokenizer_exports_its_weights(tmp_path):
    """The committed checkpoint of 2026-12 (no tokenizer beside it) exports, and transformers
    reproduces the logits recorded with it."""
    fixture = Path(__file__).resolve().parent.parent / "fixtures" / "gpt_checkpoint_2026_12"
    files = {p.name for p in export_checkpoint(fixture, tmp_path / "export")}
    assert TOKENIZER_COPY_FILE not in files and "tokenizer.json" not in files
    config = json.loads((tmp_path / "export" / CONFIG_FILE).read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    expected = json.loads((fixture / "expected.json").read_text())
    assert "smear" not in config["nanochat"]["model_config"] or (
        config["nanochat"]["model_config"]["smear"] is False
    )
    model = load_hf(tmp_path / "export", "gpt")
    assert not hasattr(model, "smear_gate") and not hasattr(model, "backout_lambda")
    with torch.no_grad():
        logits = model(torch.tensor([expected["prompt"]])).logits[0, -1]
        out = model.generate(
            torch.tensor([expected["prompt"]]), max_new_tokens=len(expected["greedy"]),
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    torch.testing.assert_close(logits, torch.tensor(expected["last_logits"]), atol=1e-4, rtol=0)
    ours, _ = load_model(fixture)
    assert out[0, len(expected["prompt"]) :].tolist() == expected["greedy"]
    assert expected["greedy"] == list(
        ours.generate_naive(expected["prompt"], len(expected["greedy"]))
    )
    assert not import_folder(tmp_path / "export", tmp_path / "back").has_tokenizer
    back, _ = load_model(tmp_path / "back")
    assert back.config == ours.config
    for key, value in ours.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_tokenizer_eos_follows_the_stage_and_context_is_recorded(tokenizer, tmp_path):
    """A base model ends a document with <|bos|>; a chat model stops at <|assistant_end|>."""
    found = {}
    for stage in ("base", "sft"):
        checkpoint = make_checkpoint(tmp_path / f"{stage}_checkpoints" / "d2", "gpt", tokenizer)
        export_checkpoint(checkpoint, tmp_path / f"{stage}-hf")
        config = json.loads((tmp_path / f"{stage}-hf" / "tokenizer_config.json").read_text())
        found[stage] = config["eos_token"]
        context = load_model(checkpoint)[0].config.sequence_len
        assert config["model_max_length"] == context
    assert found == {"base": "<|bos|>", "sft": "<|assistant_end|>"}
