"""Forms of the dashboard: a new run of any kind, a new dataset.

The fields come from the program's FlagSet (the same declarations argparse reads), so a flag
added to a training program shows up here with its type, bounds and help. The forms only
collect values; runs.services validates them and decides, and its field-named errors are put
back next to the fields they name.
"""

from __future__ import annotations

from typing import Any

from django import forms

from engine.models import registry
from runs import probes, selectors, services
from runs import tags as tags_module
from runs.artifacts import dataset_source_flags
from runs.models import ArtifactStatus, Checkpoint, Dataset, Tokenizer
from runs.predictions import memory_prediction
from runs.programs import Program
from training.flags import ConfigError, Flag

TRISTATE = (("", "preset / default"), ("true", "on"), ("false", "off"))


def flag_field(flag: Flag) -> forms.Field:
    """An optional form field for a flag: left empty, the preset or default applies."""
    common = {"required": False, "help_text": flag.help, "label": flag.name}
    if flag.type is bool:
        return forms.TypedChoiceField(
            choices=TRISTATE, coerce=lambda v: v == "true", empty_value=None, **common
        )
    if flag.choices:
        choices = [("", f"default ({flag.default})")] + [(c, c) for c in flag.choices]
        return forms.TypedChoiceField(choices=choices, coerce=flag.type, empty_value=None, **common)
    attrs = {"placeholder": "auto" if flag.default == flag.auto else str(flag.default)}
    if flag.auto is not None:
        # "auto" or a number: the flag's own rules (training.flags) decide, in the services.
        return forms.CharField(widget=forms.TextInput(attrs=attrs), max_length=12, **common)
    # The flag's declared range becomes the input's min/max (the browser shows and checks it).
    bounds = {"min_value": flag.min, "max_value": flag.max}
    if flag.type is int:
        return forms.IntegerField(widget=forms.NumberInput(attrs=attrs), **bounds, **common)
    if flag.type is float:
        attrs["step"] = "any"
        return forms.FloatField(widget=forms.NumberInput(attrs=attrs), **bounds, **common)
    return forms.CharField(
        widget=forms.TextInput(attrs=attrs), max_length=flag.max_length, **common
    )


def is_family_flag(flag: Flag) -> bool:
    """The `model` flag of base_train and the pipeline: a choice of model family."""
    names = {c for c in flag.choices or () if c}
    return flag.name == "model" and bool(names) and names <= set(registry.NAMES)


def family_picker(flag: Flag) -> forms.Field:
    """The model family picker: one radio button per family, each by its label; the first
    leaves it to the preset (or, for a pipeline, to its base preset)."""
    if "" in flag.choices:
        empty = "the base preset's"
    else:
        empty = f"the preset's (default {selectors.family_label(flag.default)})"
    labels = dict(selectors.families())
    choices = [("", empty)] + [(c, labels[c]) for c in flag.choices if c]
    return forms.TypedChoiceField(
        choices=choices, coerce=str, empty_value=None, required=False, initial="",
        widget=forms.RadioSelect(attrs={"class": "family-choice"}), label="model family",
        help_text=flag.help,
    )  # fmt: skip


def family_readers() -> dict[str, list[str]]:
    """{flag name: the families that read it} for the flags only some families read
    (engine/models: each family's `flags`); a flag every family reads is not listed."""
    readers: dict[str, list[str]] = {}
    for name in registry.NAMES:
        for flag in registry.family(name).flags:
            readers.setdefault(flag, []).append(name)
    return {flag: names for flag, names in readers.items() if len(names) < len(registry.NAMES)}


def _ready(queryset):
    return queryset.filter(status=ArtifactStatus.READY)


class FieldErrorsMixin:
    """Put a services.ConfigError's field-named messages next to the matching fields."""

    def field_for(self, key: str) -> str:
        return key.removeprefix("config.")

    def add_service_errors(self, error: ConfigError) -> None:
        for key, message in error.errors.items():
            name = self.field_for(key)
            if name in self.fields:
                self.add_error(name, message)
            else:
                self.add_error(None, f"{key}: {message}")


class RunForm(FieldErrorsMixin, forms.Form):
    """New run of one program kind: name, preset, inputs, processes, then one field per flag."""

    name = forms.CharField(max_length=200, required=False)
    preset = forms.ChoiceField(required=False)

    def __init__(self, program: Program, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.program = program
        if program.kind in probes.KINDS:
            self.fields["probe_prompts"] = probe_prompts_field()
        self.fields["preset"].choices = [("", "none (defaults)")] + [
            (p, _preset_label(program, p)) for p in program.flags.presets()
        ]
        if "dataset" in program.inputs:
            self.fields["dataset"] = forms.ModelChoiceField(_ready(Dataset.objects.all()))
        if "tokenizer" in program.inputs:
            self.fields["tokenizer"] = forms.ModelChoiceField(_ready(Tokenizer.objects.all()))
        if "parent_checkpoint" in program.inputs:
            self.fields["parent_checkpoint"] = forms.ModelChoiceField(
                Checkpoint.objects.select_related("run"), label="parent checkpoint"
            )
        if program.distributed:
            self.fields["nproc_per_node"] = forms.IntegerField(
                min_value=1, max_value=services.MAX_NPROC, initial=1, label="processes per node"
            )
        self.flag_names = []
        self.family_name: str | None = None  # the family picker's field, when the kind has one
        self.family_default = ""  # the family when neither the picker nor the preset says
        for flag in program.user_flags():
            if is_family_flag(flag):
                self.fields[flag.name] = family_picker(flag)
                self.family_name, self.family_default = flag.name, flag.default
            else:
                self.fields[flag.name] = flag_field(flag)
            self.flag_names.append(flag.name)

    @property
    def family_field(self):
        return self[self.family_name] if self.family_name else None

    def flag_fields(self):
        """The settings fields below the family picker."""
        return [self[name] for name in self.flag_names if name != self.family_name]

    def settings(self) -> list[tuple[Any, str]]:
        """[(field, "gpt2 hybrid")]: each settings field with the families that read it ('' when
        every family does), so the page shows only the chosen family's own fields."""
        readers = family_readers() if self.family_name else {}
        return [(field, " ".join(readers.get(field.name, ()))) for field in self.flag_fields()]

    def input_fields(self):
        names = ("dataset", "tokenizer", "parent_checkpoint", "nproc_per_node")
        return [self[n] for n in names if n in self.fields]

    def overrides(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {n: data[n] for n in self.flag_names if data.get(n) not in (None, "")}

    def memory(self) -> dict[str, Any] | None:
        """The predicted memory per GPU of the config as filled in (runs.predictions), or
        None when it is not a training kind, the model is not known yet or the settings do
        not validate (their errors are then added to the form)."""
        data = self.cleaned_data
        try:
            config = self.program.validate(data.get("preset") or "", self.overrides())
        except ConfigError as error:
            self.add_service_errors(error)
            return None
        return memory_prediction(
            self.program.kind, config, tokenizer=data.get("tokenizer"),
            parent_checkpoint=data.get("parent_checkpoint"),
            nproc_per_node=data.get("nproc_per_node") or 1,
        )  # fmt: skip

    def submit(self, user):
        """Queue the run, or add the services' errors to the form and return None."""
        data = self.cleaned_data
        try:
            return services.submit_run(
                user,
                self.program.kind,
                preset=data.get("preset") or "",
                config=self.overrides(),
                dataset=data.get("dataset"),
                tokenizer=data.get("tokenizer"),
                parent_checkpoint=data.get("parent_checkpoint"),
                nproc_per_node=data.get("nproc_per_node") or 1,
                name=data.get("name") or "",
                probe_prompts=data.get("probe_prompts"),
            )
        except ConfigError as error:
            self.add_service_errors(error)
            return None


def probe_prompts_field() -> forms.CharField:
    """One prompt per line; runs.probes checks the bounds (the run page's form uses it too)."""
    return forms.CharField(
        required=False, label="probe prompts",
        widget=forms.Textarea(attrs={"rows": 3, "placeholder": "The capital of France is"}),
        max_length=probes.MAX_PROMPTS * (probes.MAX_PROMPT_CHARS + 2),
        help_text=f"one per line, at most {probes.MAX_PROMPTS}: every checkpoint of the run "
        "answers them, and the run page shows the answers step by step",
    )  # fmt: skip


class ProbePromptsForm(FieldErrorsMixin, forms.Form):
    """The run page's form: the owner changes a run's probe prompts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["probe_prompts"] = probe_prompts_field()


class RunNotesForm(FieldErrorsMixin, forms.Form):
    """The run page's form: the owner changes a run's tags (comma-separated) and its note.
    Only the shape is checked here; runs/tags.py decides what a tag may be."""

    tags = forms.CharField(
        required=False,
        help_text=f"comma-separated, at most {tags_module.MAX_TAGS}, e.g. baseline, sweep:lr",
        widget=forms.TextInput(attrs={"placeholder": "baseline, sweep:lr"}),
    )
    note = forms.CharField(
        required=False,
        strip=False,
        max_length=tags_module.NOTE_MAX_LENGTH,
        help_text="markdown; shown as written (no HTML)",
        widget=forms.Textarea(attrs={"rows": 6}),
    )


def _preset_label(program: Program, preset: str) -> str:
    """'gpt2-small (GPT-2)' for a preset that picks a model family, else the preset's name."""
    model = program.flags.load_config_file(preset).get("model")
    return f"{preset} ({selectors.family_label(model)})" if model in registry.NAMES else preset


class DatasetForm(FieldErrorsMixin, forms.Form):
    """New dataset from the built-in corpus, a download, uploaded files or a server path."""

    name = forms.SlugField(max_length=100)
    source = forms.ChoiceField(choices=[(s, s) for s in services.DATASET_SOURCES])
    files = forms.FileField(
        required=False,
        widget=forms.ClearableFileInput(attrs={"allow_multiple_selected": True}),
        help_text="for source 'upload': .txt, .jsonl or .parquet files",
    )
    path = forms.CharField(required=False, help_text="for source 'path' (staff only)")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.option_names: dict[str, list[str]] = {}
        for source, flags in dataset_source_flags().items():
            names = []
            for flag in flags:
                key = f"{source}__{flag.name}"
                self.fields[key] = flag_field(flag)
                self.fields[key].label = flag.name
                names.append(key)
            self.option_names[source] = names

    def option_groups(self):
        return [(s, [self[n] for n in names]) for s, names in self.option_names.items()]

    def field_for(self, key: str) -> str:
        if key.startswith("options."):
            return f"{self.cleaned_data.get('source', '')}__{key.removeprefix('options.')}"
        return key

    def submit(self, user, uploads):
        data = self.cleaned_data
        source = data["source"]
        options = {
            key.split("__", 1)[1]: data[key]
            for key in self.option_names.get(source, [])
            if data.get(key) not in (None, "")
        }
        try:
            return services.create_dataset(
                user, data["name"], source, options, uploads=uploads, path=data.get("path") or None
            )
        except ConfigError as error:
            self.add_service_errors(error)
            return None
