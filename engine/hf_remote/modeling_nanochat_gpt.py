"""The nanochat GPT for `transformers` (remote code written by nanochat-site's exporter).

`transformers` ships a NanoChat class, but it is a different model: no value embeddings, no
residual/x0 scalars, no sliding windows and the opposite rotary direction. This file is the
training code's forward (engine/models/gpt.py) in plain PyTorch:

    x = rmsnorm(wte(ids)); x0 = x
    per layer i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0
                 x = x + attn(rmsnorm(x))   # q/k rotary then rmsnorm, GQA, window, value emb.
                 x = x + mlp(rmsnorm(x))    # relu(x)^2
    logits = softcap * tanh(lm_head(rmsnorm(x))[:vocab] / softcap)

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
KNOWN_FIELDS = {
    "sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
    "window_pattern", "model",
}  # fmt: skip


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
        if ve is not None:
            # One gate per kv head in (0, 2), read from the first channels of the input.
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_channels]))
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
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks, state)
        if state is not None:
            state.valid, state.positions = valid, positions
        logits = self.lm_head(_rms_norm(x))[..., : arch.vocab_size].float()
        cap = arch.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return NanochatSiteOutput(loss=loss, logits=logits, cache=state)
