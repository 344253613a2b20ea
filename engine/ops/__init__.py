"""Numeric kernels of the hybrid (Qwen3-Next-style) model, in plain PyTorch.

Each operation keeps a plain reference beside its fast forms, one public function per form,
and a dispatcher that picks the fast path from the device and what is installed (never from a
flag the caller must know):

- `delta_rule`: the gated delta rule of the linear-attention layers -- `delta_rule_naive`
  (per-token loop, the reference), `delta_rule_chunked` (WY form, training and prefill),
  `delta_rule_recurrent` (decode), and flash-linear-attention's CUDA kernel when installed.
- `conv1d`: the short causal depthwise convolution (+ SiLU) on q/k/v --
  `causal_conv1d_naive`, `causal_conv1d` (grouped `F.conv1d`, or Dao-AILab's CUDA kernel when
  installed) and `causal_conv1d_step` for decode.

Nothing here imports Django or the model; `engine.kernel_bench` times and cross-checks them.
"""
