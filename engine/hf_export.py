"""Checkpoints as Hugging Face folders: weights, configs, tokenizer, model card, modeling code.

An export folder loads with `transformers` (a tool the user brings; this project never imports
it) and back into this project (engine/hf_import.py):

  model.safetensors         the weights (safetensors: no pickle, so loading one runs no code)
  config.json               transformers' config; the `nanochat` entry holds the training
                            code's own config, constants and per-layer facts, which is what the
                            modeling code and the import read
  generation_config.json    BOS, stop tokens (<|assistant_end|>, <|bos|>), the context length
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
                            the tokenizer in `tokenizers` format with the chat template
                            (engine/hf_tokenizer.py)
  nanochat_tokenizer.json   the BPE ranks, split pattern and special tokens exactly as tiktoken
                            holds them: the import rebuilds the tokenizer from this, as JSON
                            rather than our pickle, so importing a folder never unpickles
  README.md                 the model card
  *.py                      modeling code, only where `transformers` has no class for the model

Per family: `gpt2` is exactly transformers' GPT2LMHeadModel (learned positions, LayerNorm
eps 1e-5, tanh GELU, 1/sqrt(d) attention, tied head), so it exports to that class with no
remote code; `bias=False` models get zero biases, which is the same function. `gpt` and
`hybrid` have no exact match (see engine/hf_remote/) and ship remote code whose parameter
names are the training code's, so their weights are the state dict as is.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
import shutil
import time
import unicodedata
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import load_checkpoint, tokenizer_dir
from engine.hf_tokenizer import write_hf_tokenizer
from engine.models.registry import config_from_dict, family_of

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CARD_FILE = "README.md"
TOKENIZER_COPY_FILE = "nanochat_tokenizer.json"
TOKENIZER_COPY_FORMAT = "nanochat-site-tokenizer"
REMOTE_DIR = Path(__file__).resolve().parent / "hf_remote"
REMOTE_CONFIG = "configuration_nanochat_site.py"
REMOTE_COMMON = "nanochat_site_common.py"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The GPT config fields the remote code implements (engine/hf_remote/modeling_nanochat_gpt.py
# keeps the same list). A field added to GPTConfig stops the export until both learn it.
GPT_FIELDS = frozenset(
    {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
     "window_pattern", "model", "rotary_base", "qk_scale", "ve_gate_channels", "ve_gate_range",
     "short_window_divisor", "short_window_multiple", "smear", "backout", "wte_init_std",
     "value_embed_init", "c_fc_init_scale", "gate_init_max", "resid_lambda_first",
     "resid_lambda_last", "x0_lambda_first", "x0_lambda_last"}
)  # fmt: skip
HYBRID_FIELDS = frozenset(
    {"sequence_len", "vocab_size", "n_layer", "n_embd", "layer_pattern", "n_head", "n_kv_head",
     "head_dim", "partial_rotary", "n_k_heads", "n_v_heads", "k_head_dim", "v_head_dim",
     "conv_kernel", "chunk_size", "num_experts", "experts_per_token", "expert_dim",
     "shared_expert_dim", "aux_loss_coef", "norm_eps", "model"}
)  # fmt: skip
GPT2_FIELDS = frozenset(
    {"sequence_len", "vocab_size", "n_layer", "n_head", "n_embd", "d_ff", "dropout", "bias",
     "model"}
)  # fmt: skip
# GPT-2's linears that transformers stores as Conv1D, i.e. transposed: (in, out).
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which engine/models/gpt2.py uses


class ExportError(ValueError):
    """A checkpoint that cannot be exported, or an export folder that cannot be imported."""


@dataclass
class FamilyExport:
    """What a family contributes: the weights under their export names, config.json's
    family-specific entries, and the modeling files to copy (none for a shipped class)."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    remote_files: tuple[str, ...] = ()


@dataclass
class CardInfo:
    """What the model card tells beyond the weights (all optional; plain data, so the CLI fills
    it from the checkpoint's meta and the web app from its database)."""

    title: str = ""
    source: str = ""  # e.g. "run #12 (name), stage sft"
    stage: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    evals: list[tuple[str, str, float | None]] = field(default_factory=list)
    val_bpb: float | None = None


# ---- public entry points -------------------------------------------------------------------


def export_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
    card: CardInfo | None = None,
) -> list[Path]:
    """Write the export of `step` (default: the latest) of `checkpoint_dir` into `out_dir`
    (created; it must not exist or must be empty). Returns the files written, sorted.

    dtype: "float32", "bfloat16" or "float16" converts the floating weights; None keeps them.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder; export into a new one")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)} (or left out), got {dtype!r}")
    state, _, meta = load_checkpoint(checkpoint_dir, step)
    try:
        config = config_from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as error:
        raise ExportError(f"the checkpoint's meta has no usable model_config: {error}") from error
    tokenizer = _load_tokenizer(checkpoint_dir)
    target = DTYPES.get(dtype) if dtype else None
    state = {
        key.removeprefix("_orig_mod."): (
            value.to(target) if target is not None and value.is_floating_point() else value
        )
        for key, value in state.items()
    }
    exported = _FAMILIES[family_of(config).name](state, config)
    card = card or card_from_meta(meta)
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(out / WEIGHTS_FILE, exported.tensors)
    specials = _special_ids(tokenizer)
    weights_dtype = _dtype_name(exported.tensors)
    nanochat = {
        "format_version": FORMAT_VERSION,
        "family": family_of(config).name,
        "model_config": config.to_dict(),
        "step": int(meta.get("step", 0)),
        "val_bpb": _finite(meta.get("val_bpb")),
        "source": _clean_text(card.source, 300),
        **exported.config.pop("nanochat", {}),
    }
    hf_config = {
        **exported.config,
        # None rather than a class default (GPT-2's 50256) when there is no tokenizer.
        "bos_token_id": specials.get("bos_token_id"),
        "eos_token_id": specials.get("eos_token_id"),
        "pad_token_id": specials.get("pad_token_id"),
        "dtype": weights_dtype,
        "use_cache": True,
        "nanochat": nanochat,
    }
    _write_json(out / CONFIG_FILE, hf_config)
    _write_json(out / GENERATION_CONFIG_FILE, _generation_config(specials))
    if tokenizer is not None:
        _write_json(out / TOKENIZER_COPY_FILE, tokenizer_copy(tokenizer))
        base = card.stage == "base" or Path(checkpoint_dir).parent.name == "base_checkpoints"
        _write_hf_tokenizer(
            tokenizer, out, base=base, context=getattr(config, "sequence_len", None)
        )
    for name in exported.remote_files:
        shutil.copyfile(REMOTE_DIR / name, out / name)
    (out / CARD_FILE).write_text(
        model_card(config, card, hf_config, remote=bool(exported.remote_files),
                   has_tokenizer=tokenizer is not None),
        encoding="utf-8",
    )  # fmt: skip
    return sorted(p for p in out.iterdir() if p.is_file())


def card_from_meta(meta: Mapping[str, Any]) -> CardInfo:
    """A model card's facts from a checkpoint's meta alone (the CLI has no database)."""
    training = meta.get("user_config")
    return CardInfo(
        training=safe_settings(training) if isinstance(training, Mapping) else {},
        val_bpb=_finite(meta.get("val_bpb")),
    )


def safe_settings(values: Mapping[str, Any], limit: int = 60) -> dict[str, Any]:
    """The settings worth publishing from a run's config: numbers, booleans and short words.

    Paths and anything path-like are left out -- a model card travels, the server's folders
    must not -- and so are nested values and long text."""
    kept: dict[str, Any] = {}
    for key, value in values.items():
        if len(kept) >= limit or not isinstance(key, str) or len(key) > 60:
            continue
        if any(word in key.lower() for word in ("dir", "path", "file", "url", "token")):
            continue
        if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
            kept[key] = value
        elif isinstance(value, str) and len(value) <= 40 and not re.search(r"[/\\:~]", value):
            kept[key] = _clean_text(value, 40)
    return kept


def tokenizer_copy(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer as plain JSON: split pattern, special tokens and every BPE rank (bytes in
    base64), which is exactly what a tiktoken Encoding is built from."""
    # The Tokenizer wraps a tiktoken Encoding; these are the fields tiktoken itself pickles.
    enc = tokenizer._enc
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda item: item[1])
    return {
        "format": TOKENIZER_COPY_FORMAT,
        "version": FORMAT_VERSION,
        "name": enc.name,
        "pattern": enc._pat_str,
        "special_tokens": dict(sorted(enc._special_tokens.items(), key=lambda item: item[1])),
        "mergeable_ranks": [
            [base64.b64encode(token).decode("ascii"), rank] for token, rank in ranks
        ],
    }


# ---- zip -----------------------------------------------------------------------------------


class _ChunkSink(io.RawIOBase):
    """A write-only, unseekable file that keeps what is written until `drain`: zipfile then
    writes each member with a data descriptor, so the archive is produced front to back and
    streamed as it is made (never whole in memory)."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._chunks.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def drain(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


def zip_chunks(folder: str | Path, root: str, block_size: int = 1 << 20) -> Iterator[bytes]:
    """The files of `folder` (not its subfolders or links) as one zip archive, under `root/`,
    in pieces of about `block_size` bytes. The weights are stored as they are (they do not
    compress), the text files deflated."""
    sink = _ChunkSink()
    with zipfile.ZipFile(sink, "w", allowZip64=True) as archive:
        for path in sorted(Path(folder).iterdir()):
            if path.is_symlink() or not path.is_file():
                continue
            stat = path.stat()
            info = zipfile.ZipInfo(f"{root}/{path.name}", time.localtime(stat.st_mtime)[:6])
            info.file_size = stat.st_size  # lets zipfile choose zip64 for large files up front
            info.external_attr = 0o644 << 16
            info.compress_type = (
                zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
            )
            with path.open("rb") as source, archive.open(info, "w") as member:
                while block := source.read(block_size):
                    member.write(block)
                    if data := sink.drain():
                        yield data
            if data := sink.drain():
                yield data
    yield sink.drain()


# ---- families ------------------------------------------------------------------------------


def _check_fields(config: Any, known: frozenset[str], family: str) -> None:
    unknown = sorted(set(config.to_dict()) - known)
    if unknown:
        raise ExportError(
            f"the {family} config has fields the export does not implement yet: {unknown} "
            "(engine/hf_export.py and engine/hf_remote/ must learn them first)"
        )


def _export_gpt(state: dict[str, torch.Tensor], config: Any) -> FamilyExport:
    from engine.models import gpt

    _check_fields(config, GPT_FIELDS, "GPT")
    return FamilyExport(
        tensors=dict(state),
        config={
            "architectures": ["NanochatSiteGPTForCausalLM"],
            "model_type": "nanochat_site_gpt",
            "auto_map": {
                "AutoConfig": "configuration_nanochat_site.NanochatSiteGPTConfig",
                "AutoModelForCausalLM": "modeling_nanochat_gpt.NanochatSiteGPTForCausalLM",
            },
            "vocab_size": config.vocab_size,
            "hidden_size": config.n_embd,
            "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_head,
            "head_dim": config.head_dim,
            "max_position_embeddings": config.sequence_len,
            "tie_word_embeddings": False,
            "nanochat": {
                "constants": {
                    "rotary_base": config.rotary_base,
                    "logit_softcap": gpt.LOGIT_SOFTCAP,
                    "ve_gate_channels": config.ve_gate_channels,
                    "smear_gate_channels": gpt.SMEAR_GATE_CHANNELS,
                },
                "padded_vocab_size": config.padded_vocab_size,
                "layers": {
                    "window": config.window_sizes(),
                    "value_embedding": [
                        config.has_value_embedding(i) for i in range(config.n_layer)
                    ],
                },
            },
        },
        remote_files=(REMOTE_CONFIG, REMOTE_COMMON, "modeling_nanochat_gpt.py"),
    )


def _export_hybrid(state: dict[str, torch.Tensor], config: Any) -> FamilyExport:
    from engine.models import gpt, hybrid_layers

    _check_fields(config, HYBRID_FIELDS, "hybrid")
    return FamilyExport(
        tensors=dict(state),
        config={
            "architectures": ["NanochatSiteHybridForCausalLM"],
            "model_type": "nanochat_site_hybrid",
            "auto_map": {
                "AutoConfig": "configuration_nanochat_site.NanochatSiteHybridConfig",
                "AutoModelForCausalLM": "modeling_nanochat_hybrid.NanochatSiteHybridForCausalLM",
            },
            "vocab_size": config.vocab_size,
            "hidden_size": config.n_embd,
            "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_head,
            "head_dim": config.head_dim,
            "max_position_embeddings": config.sequence_len,
            "tie_word_embeddings": False,
            "nanochat": {
                "constants": {
                    "rotary_base": gpt.ROTARY_BASE,
                    "l2_norm_eps": hybrid_layers.L2_NORM_EPS,
                },
                "padded_vocab_size": config.padded_vocab_size,
                "layers": {"kind": config.layer_kinds()},
            },
        },
        remote_files=(REMOTE_CONFIG, REMOTE_COMMON, "modeling_nanochat_hybrid.py"),
    )


def _export_gpt2(state: dict[str, torch.Tensor], config: Any) -> FamilyExport:
    """GPT-2 as transformers' own GPT2LMHeadModel: Conv1D weights transposed, the tied head
    left to transformers, zero biases where the model has none."""
    _check_fields(config, GPT2_FIELDS, "GPT-2")
    return FamilyExport(
        tensors=gpt2_to_hf(state, config),
        config={
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": config.vocab_size,
            "n_positions": config.sequence_len,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.d_ff,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": GPT2_LAYER_NORM_EPS,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "add_cross_attention": False,
            "tie_word_embeddings": True,
        },
    )


def gpt2_to_hf(state: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Our GPT-2 state dict under transformers' names and layouts (the names are the same;
    the four block linears are stored transposed, and missing biases become zeros)."""
    tensors = {}
    for key, value in state.items():
        tensors[key] = value.t() if key.endswith(GPT2_CONV1D) else value
    if not config.bias:
        for name, size in gpt2_bias_shapes(config).items():
            dtype = state["transformer.wte.weight"].dtype
            tensors[name] = torch.zeros(size, dtype=dtype)
    return tensors


def gpt2_bias_shapes(config: Any) -> dict[str, int]:
    """The biases transformers' GPT-2 has that a `bias=False` model lacks, with their sizes."""
    c, f = config.n_embd, config.d_ff
    shapes = {"transformer.ln_f.bias": c}
    for i in range(config.n_layer):
        prefix = f"transformer.h.{i}."
        shapes.update({
            prefix + "ln_1.bias": c, prefix + "ln_2.bias": c, prefix + "attn.c_attn.bias": 3 * c,
            prefix + "attn.c_proj.bias": c, prefix + "mlp.c_fc.bias": f,
            prefix + "mlp.c_proj.bias": c,
        })  # fmt: skip
    return shapes


_FAMILIES: dict[str, Callable[[dict[str, torch.Tensor], Any], FamilyExport]] = {
    "gpt": _export_gpt,
    "gpt2": _export_gpt2,
    "hybrid": _export_hybrid,
}


# ---- files ---------------------------------------------------------------------------------


def _write_weights(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    # safetensors wants contiguous tensors that share no storage (views of one another would
    # be refused); a transposed view is made contiguous here.
    plain = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    save_file(plain, str(path), metadata={"format": "pt"})


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _dtype_name(tensors: Mapping[str, torch.Tensor]) -> str:
    floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(floats) == 1:
        return str(next(iter(floats))).removeprefix("torch.")
    return "float32"


def _load_tokenizer(checkpoint_dir: str | Path) -> Any:
    """The tokenizer saved beside the checkpoint, or None when there is none (an export then
    has weights and configs only)."""
    if not tokenizer_dir(checkpoint_dir).is_dir():
        log.warning("no tokenizer beside %s: exporting the model without one", checkpoint_dir)
        return None
    from engine.checkpoint import load_tokenizer_for

    return load_tokenizer_for(checkpoint_dir)


def _write_hf_tokenizer(tokenizer: Any, out: Path, *, base: bool, context: int | None) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json (engine/hf_tokenizer).

    A base model ends a document by starting the next one, so its EOS is <|bos|>; a chat model
    stops at <|assistant_end|> (the writer's default)."""
    write_hf_tokenizer(
        tokenizer, out, eos_token="<|bos|>" if base else None, model_max_length=context
    )


def _special_ids(tokenizer: Any) -> dict[str, Any]:
    """bos/eos/pad ids for the configs: BOS is <|bos|>, generation stops at <|assistant_end|>
    or <|bos|> (what the chat engine stops at); padding reuses BOS (it is always masked)."""
    if tokenizer is None:
        return {}
    bos = tokenizer.get_bos_token_id()
    stops = [bos]
    if "<|assistant_end|>" in tokenizer.special_tokens:
        stops = [tokenizer.encode_special("<|assistant_end|>"), bos]
    return {"bos_token_id": bos, "eos_token_id": stops, "pad_token_id": bos}


def _generation_config(specials: Mapping[str, Any]) -> dict[str, Any]:
    """Greedy by default (what `generate` does unless asked to sample), stopping where chat
    stops."""
    return {**specials, "do_sample": False}


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _clean_text(text: Any, limit: int) -> str:
    """One line of printable text, at most `limit` characters (names are user text)."""
    if not isinstance(text, str):
        return ""
    kept = "".join(" " if unicodedata.category(c).startswith("C") else c for c in text)
    return " ".join(kept.split())[:limit]


def _markdown(text: Any, limit: int = 200) -> str:
    """User text made inert in markdown: one line, markup characters escaped."""
    return re.sub(r"([\\`*_{}\[\]()<>#+!|~])", r"\\\1", _clean_text(text, limit))


# ---- model card ----------------------------------------------------------------------------


def model_card(
    config: Any,
    card: CardInfo,
    hf_config: Mapping[str, Any],
    *,
    remote: bool,
    has_tokenizer: bool,
) -> str:
    """README.md: what the model is, how it was trained and scored, and how to use it."""
    family = family_of(config)
    params = family.count_params(config)["total"]
    title = _markdown(card.title, 120) or f"nanochat-site {family.label} model"
    tags = ["nanochat-site", family.name, "text-generation"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        *[f"- {tag}" for tag in tags],
        "---",
        "",
        f"# {title}",
        "",
        f"A {family.label} language model of {params / 1e6:.1f}M parameters trained with "
        "[nanochat-site](https://github.com/karpathy/nanochat)'s recipe and exported from it.",
        "",
    ]
    facts = [("family", family.label), ("parameters", f"{params:,}")]
    if card.source:
        facts.append(("source", _markdown(card.source, 300)))
    if card.stage:
        facts.append(("stage", _markdown(card.stage, 20)))
    facts.append(("step", str(hf_config["nanochat"]["step"])))
    if card.val_bpb is not None:
        facts.append(("validation bits per byte", f"{card.val_bpb:.4f}"))
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], ""]
    lines += ["## Architecture", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {_markdown(str(v), 80)} |" for k, v in config.to_dict().items()]
    lines.append("")
    if card.training or card.data:
        lines += ["## Training", ""]
        if card.data:
            lines += [f"Data: {_markdown(card.data, 300)}", ""]
        if card.training:
            lines += ["| setting | value |", "|---|---|"]
            lines += [
                f"| {_markdown(k, 60)} | {_markdown(str(v), 60)} |"
                for k, v in card.training.items()
            ]
            lines.append("")
    if card.evals:
        lines += ["## Evaluation", "", "| task | metric | value |", "|---|---|---|"]
        for task, metric, value in card.evals:
            shown = "–" if _finite(value) is None else f"{value:.4f}"
            lines.append(f"| {_markdown(task, 60)} | {_markdown(metric, 60)} | {shown} |")
        lines.append("")
    remote_arg = ", trust_remote_code=True" if remote else ""
    lines += [
        "## Usage",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'folder = "path/to/this/folder"',
        f"model = AutoModelForCausalLM.from_pretrained(folder{remote_arg})",
        "tokenizer = AutoTokenizer.from_pretrained(folder)",
        'messages = [{"role": "user", "content": "Why is the sky blue?"}]',
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ")",
        "with torch.no_grad():",
        "    out = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        'prompt_length = inputs["input_ids"].shape[1]',
        "print(tokenizer.decode(out[0, prompt_length:], skip_special_tokens=True))",
        "```",
        "",
    ]
    if remote:
        lines += [
            "The modeling code is in this folder (`modeling_*.py`): plain PyTorch, written for "
            "transformers 5.x. Generation keeps its own decode state; greedy and sampled "
            "decoding work, beam search does not.",
            "",
        ]
    else:
        lines += ["This is a standard `GPT2LMHeadModel`: no remote code is needed.", ""]
    if not has_tokenizer:
        lines += ["This export has no tokenizer: the checkpoint was saved without one.", ""]
    lines += [
        "The chat format: `<|bos|>`, then each user turn as `<|user_start|>…<|user_end|>` and "
        "each reply as `<|assistant_start|>…<|assistant_end|>`; generation stops at "
        "`<|assistant_end|>`. The tool calls nanochat's chat makes (`<|python_start|>`…) are "
        "not run by `generate`.",
        "",
        "## Back into nanochat-site",
        "",
        "```bash",
        "python -m engine.export import path/to/this/folder --out path/to/checkpoint_dir",
        "python manage.py import_checkpoint path/to/this/folder --owner alice",
        "```",
        "",
    ]
    return "\n".join(lines)
