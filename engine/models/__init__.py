"""Model families: nanochat's GPT, GPT-2 and a Qwen3-Next-style hybrid, behind one interface.

One module per family (`gpt`, `gpt2`, `hybrid`), each exporting a `FAMILY` (`base.Family`);
`registry` finds a family by the `model` field of a model config or of checkpoint meta (old
checkpoints without it are GPTs). Everything outside this package asks the registry and the
model's own methods (`base.LanguageModel`), never branches on the family.
"""
