"""Configs of nanochat-site models exported for Hugging Face `transformers` (remote code).

The architecture lives in one dict, `nanochat`, written by the exporter: `model_config` (every
field of the training code's config, exactly as its checkpoints store it), `constants` (the
numbers the training code keeps as module constants: rotary base, logit soft-cap, ...) and
`layers` (per-layer facts derived from the config: attention window, value embedding, layer
kind). The modeling code reads only that dict, so a model change that adds a field is a change
to what the exporter writes and what the modeling code reads, nothing else. The usual
`transformers` attributes (vocab_size, hidden_size, ...) are written beside it for tools that
look for them.
"""

from transformers import PretrainedConfig


class NanochatSiteGPTConfig(PretrainedConfig):
    """The nanochat GPT (value embeddings, residual/x0 scalars, sliding windows, relu^2)."""

    model_type = "nanochat_site_gpt"

    def __init__(self, nanochat=None, **kwargs):
        self.nanochat = dict(nanochat or {})
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class NanochatSiteHybridConfig(PretrainedConfig):
    """The hybrid: gated DeltaNet and gated attention layers, each with a sparse MoE."""

    model_type = "nanochat_site_hybrid"

    def __init__(self, nanochat=None, **kwargs):
        self.nanochat = dict(nanochat or {})
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
