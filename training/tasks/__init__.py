"""Chat tasks: conversations to fine-tune on and the graders that score a model's answers.

`build_task` / `parse_mixture` in `training.tasks.registry` are the entry points; each task
module also works on its own. Every task has a small offline "builtin" source (shipped or
generated here) and a "hub" source that downloads the real public dataset once.
"""
