"""What the exported nanochat-site models share: rotary angles, attention masks, the decode
state and the output type (remote code; see configuration_nanochat_site.py).

Plain PyTorch on purpose: the same numbers as the training code's forward (within float
rounding), on any device, with no kernel package to install. Generation keeps its own state
object (`DecodeState`) rather than a `transformers` Cache: the hybrid's linear layers carry a
convolution window and a recurrent matrix per row, and one small class serves both families.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput


@dataclass
class NanochatSiteOutput(ModelOutput):
    """Logits (fp32), the loss when labels were given, and the decode state (`cache`, the name
    transformers 5 gives it) that generation hands back to `forward`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object = None


class DecodeState:
    """Everything a row needs to continue: per attention layer its keys and values, per linear
    layer its convolution window and recurrent state, and per position whether it is a real
    token (the attention mask) and its rotary position."""

    def __init__(self):
        self.keys = {}
        self.values = {}
        self.conv = {}
        self.recurrent = {}
        self.previous = None  # (B, 1, C): the last position's normed embedding (smear gate)
        self.valid = None  # (B, L) bool
        self.positions = None  # (B, L) long

    def get_seq_length(self, layer_idx=0):
        return 0 if self.valid is None else self.valid.size(1)

    def append_kv(self, layer, k, v):
        """Add this step's (B, T, H, D) keys and values; return every cached one."""
        if layer in self.keys:
            k = torch.cat((self.keys[layer], k), dim=1)
            v = torch.cat((self.values[layer], v), dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def resolve_positions(input_ids, attention_mask, position_ids, state):
    """(valid (B, L) bool, positions (B, L) long) for every key after this step.

    `attention_mask` may cover all L positions (what `generate` passes) or only the T new
    ones; padding is marked 0 and must sit before the real tokens of its row (left padding).
    Positions count real tokens (padding does not advance them) unless given explicitly."""
    batch, seq = input_ids.shape
    past = 0 if state is None else state.get_seq_length()
    device = input_ids.device
    if attention_mask is None:
        new_valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
        valid = new_valid if past == 0 else torch.cat((state.valid, new_valid), dim=1)
    elif attention_mask.dim() != 2:
        raise ValueError("attention_mask must be a 2-D (batch, length) mask of 1s and 0s")
    elif attention_mask.size(1) == past + seq:
        valid = attention_mask.to(device).bool()
    elif attention_mask.size(1) == seq and past:
        valid = torch.cat((state.valid, attention_mask.to(device).bool()), dim=1)
    else:
        raise ValueError(
            f"attention_mask covers {attention_mask.size(1)} positions; expected {past + seq} "
            f"(cached + new) or {seq} (new)"
        )
    if position_ids is not None:
        new_positions = position_ids.to(device).long().expand(batch, seq)
    else:
        counted = (valid.long().cumsum(dim=-1) - 1).clamp(min=0)
        new_positions = counted[:, past:]
    positions = new_positions if past == 0 else torch.cat((state.positions, new_positions), dim=1)
    return valid, positions


def rotary(positions, dim, base, dtype):
    """cos, sin of shape (B, T, 1, dim/2): angle = position * base^(-2i/dim), in fp32 as the
    training code's tables, then cast to `dtype`. The frequencies are rounded as the training
    code rounds them: base^-e at base 10,000 (every model of that base), 1 / base^e otherwise
    (one ulp apart, which moves late positions' angles by ~1e-4 rad)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
    inv_freq = base**-exponents if base == 10_000 else 1.0 / base**exponents
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos()[:, :, None].to(dtype), angles.sin()[:, :, None].to(dtype)


def rotate_halves(x, cos, sin):
    """Rotate (B, T, H, D) by angles (B, T, 1, D/2): channel i pairs with channel i + D/2."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def visible_keys(valid, positions, seq, window=None):
    """Boolean (B, 1, T, L) mask: query t (the last T positions) may see key j when j is a
    real token at or before it and at most `window` positions back. Every query also sees its
    own key, so a padding query never has an empty row (its output is discarded anyway)."""
    length = valid.size(1)
    q_pos = positions[:, length - seq :]
    distance = q_pos[:, :, None] - positions[:, None, :]
    visible = (distance >= 0) & valid[:, None, :]
    if window is not None:
        visible = visible & (distance <= window)
    own = (
        torch.arange(length, device=valid.device)[None, :]
        == torch.arange(length - seq, length, device=valid.device)[:, None]
    )
    return (visible | own[None])[:, None]


def attend(q, k, v, mask):
    """Softmax attention of (B, T, Hq, D) queries on (B, L, Hkv, D) keys/values (grouped-query
    heads), scaled by 1/sqrt(D); returns (B, T, Hq, D)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    repeat = q.size(1) // k.size(1)
    if repeat > 1:
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.transpose(1, 2)


def causal_lm_loss(logits, labels):
    """Next-token cross-entropy, labels shifted inside as `transformers` models do (-100 is
    ignored)."""
    shifted = logits[:, :-1].reshape(-1, logits.size(-1))
    targets = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shifted.float(), targets, ignore_index=-100)
