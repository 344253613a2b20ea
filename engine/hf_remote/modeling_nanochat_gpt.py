"""The nanochat GPT for `transformers` (remote code written by nanochat-site's exporter).

`transformers` ships a NanoChat class, but it is a different model: no value embeddings, no
residual/x0 scalars, no sliding windows and the opposite rotary direction. This file is the
training code's forward (engine/models/gpt.py) in plain PyTorch:

    e = rmsnorm(wte(ids))
    x = e + smear_lambda * sigmoid(smear_gate(e[:24])) * e[previous position]   # if smear
    x0 = x
    per layer i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0
                 x = x + attn(rmsnorm(x))   # q/k rotary, rmsnorm * qk_scale, GQA, window,
                                            # value embedding gated in (0, ve_gate_range)
                 x = x + mlp(rmsnorm(x))    # relu(x)^2
                 kept = x after layer n_layer // 2                              # if backout
    x = x - backout_lambda * kept                                               # if backout
    logits = softcap * tanh(lm_head(rmsnorm(x))[:vocab] / softcap)

The smear gate needs each token's previous one: a row's first real token (after left padding
too) has none and is left alone, and across cached decoding steps the decode state keeps the
last position's normed embedding. A config lacking a field (exported before it existed) gets
the value that reproduces the model of then (`LEGACY`), as the training code does.

Norms have no weights and use the dtype's epsilon (`F.rms_norm` without eps), like training.
Parameter names are the training code's, so the safetensors file is its state dict as is (the
lm_head keeps its padded rows; logits are cut to the vocabulary).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel

from .configuration_nanochat_site import NanochatSiteGPTConfig
from .nanochat_site_common import (
    DecodeState,
    NanochatSiteOutput,
    attend,
    causal_lm_loss,
    resolve_positions,
    rotary,
    rotate_halves,
    visible_keys,
)

# The config fields this code implements. A model exported by a newer training code with
# fields it does not know is refused rather than run with the wrong math.
# The init fields (wte_init_std ... x0_lambda_last) only say how the training code starts a
# model; loading overwrites every weight, so they change nothing here. The window fields are
# already in the per-layer `window` list, rotary_base and ve_gate_channels in `constants`.
KNOWN_FIELDS = {
    "sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
    "window_pattern", "model", "rotary_base", "qk_scale", "ve_gate_channels", "ve_gate_range",
    "short_window_divisor", "short_window_multiple", "smear", "backout", "wte_init_std",
    "value_embed_init", "c_fc_init_scale", "gate_init_max", "resid_lambda_first",
    "resid_lambda_last", "x0_lambda_first", "x0_lambda_last",
}  # fmt: skip
# What a field the config lacks meant before it existed (engine/models/gpt.py LEGACY_FIELDS).
LEGACY = {"qk_scale": 1.0, "ve_gate_range": 2.0, "smear": False, "backout": False}
# The smear gate's input width and backout's start value, for exports that predate them.
SMEAR_GATE_CHANNELS = 24
BACKOUT_LAMBDA_INIT = 0.2


class _Arch:
    """The architecture read from the config's `nanochat` dict (see the config's docstring)."""

    def __init__(self, nanochat):
        fields = nanochat.get("model_config") or {}
        unknown = sorted(set(fields) - KNOWN_FIELDS)
        if unknown:
            raise ValueError(
                f"this modeling code does not implement the config fields {unknown}: "
                "re-export the model with the nanochat-site version that trained it"
            )
        self.vocab_size = fields["vocab_size"]
        self.n_layer = fields["n_layer"]
        self.n_head = fields["n_head"]
        self.n_kv_head = fields["n_kv_head"]
        self.n_embd = fields["n_embd"]
        self.head_dim = self.n_embd // self.n_head
        self.kv_dim = self.n_kv_head * self.head_dim
        constants = nanochat["constants"]
        self.rotary_base = constants["rotary_base"]
        self.logit_softcap = constants["logit_softcap"]
        self.ve_gate_channels = constants["ve_gate_channels"]
        self.smear_gate_channels = constants.get("smear_gate_channels", SMEAR_GATE_CHANNELS)
        settings = {**LEGACY, **{k: v for k, v in fields.items() if k in LEGACY}}
        self.qk_scale = float(settings["qk_scale"])
        self.ve_gate_range = float(settings["ve_gate_range"])
        self.smear = bool(settings["smear"])
        self.backout = bool(settings["backout"])
        # The layer whose output backout subtracts (the middle one).
        self.backout_layer = self.n_layer // 2
        self.padded_vocab_size = nanochat["padded_vocab_size"]
        layers = nanochat["layers"]
        self.windows = list(layers["window"])
        self.value_embedding = list(layers["value_embedding"])
        if len(self.windows) != self.n_layer or len(self.value_embedding) != self.n_layer:
            raise ValueError("the config's per-layer lists must have n_layer entries")


def _rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


class NanochatSiteAttention(nn.Module):
    def __init__(self, arch, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = arch.n_head, arch.n_kv_head, arch.head_dim
        self.window = arch.windows[layer_idx]
        self.ve_channels = arch.ve_gate_channels
        self.ve_range = arch.ve_gate_range
        self.qk_scale = arch.qk_scale
        self.c_q = nn.Linear(arch.n_embd, arch.n_head * arch.head_dim, bias=False)
        self.c_k = nn.Linear(arch.n_embd, arch.kv_dim, bias=False)
        self.c_v = nn.Linear(arch.n_embd, arch.kv_dim, bias=False)
        self.c_proj = nn.Linear(arch.n_embd, arch.n_embd, bias=False)
        self.ve_gate = (
            nn.Linear(arch.ve_gate_channels, arch.n_kv_head, bias=False)
            if arch.value_embedding[layer_idx]
            else None
        )

    def forward(self, x, ve, cos, sin, masks, state):
        batch, seq, _ = x.shape
        q = self.c_q(x).view(batch, seq, self.n_head, self.head_dim)
        k = self.c_k(x).view(batch, seq, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(batch, seq, self.n_kv_head, self.head_dim)
        q = _rms_norm(rotate_halves(q, cos, sin))
        k = _rms_norm(rotate_halves(k, cos, sin))
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        if ve is not None:
            # One gate per kv head in (0, ve_range), read from the first channels of the input.
            gate = self.ve_range * torch.sigmoid(self.ve_gate(x[..., : self.ve_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(batch, seq, self.n_kv_head, self.head_dim)
        if state is not None:
            k, v = state.append_kv(self.layer_idx, k, v)
        y = attend(q, k, v, masks[self.window])
        return self.c_proj(y.reshape(batch, seq, -1))


class NanochatSiteMLP(nn.Module):
    def __init__(self, arch):
        super().__init__()
        self.c_fc = nn.Linear(arch.n_embd, 4 * arch.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * arch.n_embd, arch.n_embd, bias=False)

    def forward(self, x):
        h = torch.relu(self.c_fc(x))
        return self.c_proj(h * h)


class NanochatSiteBlock(nn.Module):
    def __init__(self, arch, layer_idx):
        super().__init__()
        self.attn = NanochatSiteAttention(arch, layer_idx)
        self.mlp = NanochatSiteMLP(arch)

    def forward(self, x, ve, cos, sin, masks, state):
        x = x + self.attn(_rms_norm(x), ve, cos, sin, masks, state)
        return x + self.mlp(_rms_norm(x))


class NanochatSiteGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatSiteGPTConfig
    base_model_prefix = "nanochat_site"
    main_input_name = "input_ids"
    _no_split_modules = ["NanochatSiteBlock"]
    # The decode state is this model's own object (no cropping or beam reordering).
    _is_stateful = True

    def __init__(self, config):
        super().__init__(config)
        arch = _Arch(config.nanochat)
        self.arch = arch
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(arch.vocab_size, arch.n_embd),
                "h": nn.ModuleList(NanochatSiteBlock(arch, i) for i in range(arch.n_layer)),
            }
        )
        self.lm_head = nn.Linear(arch.n_embd, arch.padded_vocab_size, bias=False)
        self.value_embeds = nn.ModuleDict(
            {
                str(i): nn.Embedding(arch.vocab_size, arch.kv_dim)
                for i in range(arch.n_layer)
                if arch.value_embedding[i]
            }
        )
        self.resid_lambdas = nn.Parameter(torch.ones(arch.n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((arch.n_layer,), 0.1))
        if arch.smear:
            self.smear_gate = nn.Linear(arch.smear_gate_channels, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if arch.backout:
            self.backout_lambda = nn.Parameter(torch.full((1,), BACKOUT_LAMBDA_INIT))
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls):
        # generate() must not make a DynamicCache: forward returns its own DecodeState.
        return False

    def _init_weights(self, module):
        """Only for a model built from a config (loading overwrites every weight)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=1 / math.sqrt(module.in_features))
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        use_cache=None,
        labels=None,
        inputs_embeds=None,
        return_dict=None,
        **kwargs,
    ):
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("this model takes input_ids (value embeddings are looked up by id)")
        state = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = not self.training
        if state is None and use_cache:
            state = DecodeState()
        arch = self.arch
        seq = input_ids.size(1)
        valid, positions = resolve_positions(input_ids, attention_mask, position_ids, state)
        x = _rms_norm(self.transformer.wte(input_ids))
        cos, sin = rotary(positions[:, -seq:], arch.head_dim, arch.rotary_base, x.dtype)
        masks = {w: visible_keys(valid, positions, seq, w) for w in set(arch.windows)}
        embedded = x
        if arch.smear:
            x = self._smear(x, valid, state)
        x0 = x
        kept = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks, state)
            if arch.backout and i == arch.backout_layer:
                kept = x
        if kept is not None:
            x = x - self.backout_lambda * kept
        if state is not None:
            state.valid, state.positions = valid, positions
            if arch.smear:
                state.previous = embedded[:, -1:]
        logits = self.lm_head(_rms_norm(x))[..., : arch.vocab_size].float()
        cap = arch.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return NanochatSiteOutput(loss=loss, logits=logits, cache=state)

    def _smear(self, x, valid, state):
        """Add to each token lambda * sigmoid(gate(its first channels)) times the previous
        position's normed embedding, where that position is a real token: a row's first token
        (at the start or after its left padding) is left alone. The previous position of this
        step's first token is the decode state's `previous` (the last step's last embedding)."""
        batch, seq, _ = x.shape
        past = valid.size(1) - seq
        if past and state is not None and getattr(state, "previous", None) is not None:
            first = state.previous.to(x.dtype)
        else:
            first = torch.zeros_like(x[:, :1])
        previous = torch.cat((first, x[:, :-1]), dim=1)
        # Whether each new position's predecessor is a real token (none before position 0).
        before = torch.zeros(batch, 1, dtype=torch.bool, device=valid.device)
        held = torch.cat((before, valid[:, :-1]), dim=1)[:, past:, None]
        channels = self.arch.smear_gate_channels
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :channels]))
        return x + gate * previous * held
