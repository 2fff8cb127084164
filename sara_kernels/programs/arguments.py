"""Options shared by the ``train``, ``priors`` and ``analyze`` commands, parsed by ``HfArgumentParser``.

Each command is a tuple of dataclasses (the model, the data, its own options; ``train`` adds
:class:`~sara_kernels.hf.SARATrainingArguments`), so every option is defined once and a command
reads either flags (``--anchor_column en`` or ``--anchor-column en``) or a single YAML/JSON file
holding the same names, as transformers' own example scripts do.

Only ``HfArgumentParser`` is imported here: ``-h`` and a usage error need nothing else, and the
library (torch, ``datasets``, the model classes) is imported where a value is checked or loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from transformers import HfArgumentParser

from .. import backends

DTYPES = ("auto", "float32", "bfloat16", "float16")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def check_positive(value, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _one_of(value, choices, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass
class ModelArguments:
    """The model to load, with ``from_pretrained``'s own option names."""

    required: ClassVar[bool] = True  # False where a command has a model of its own (the demo's tiny one)

    model: Optional[str] = field(
        default=None, metadata={"help": "Local checkpoint folder (save_pretrained output); required."}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": "Weights dtype ('auto': the checkpoint's). For mixed-precision training load "
                          "float32 and pass --bf16."},
    )
    device_map: Optional[str] = field(
        default=None,
        metadata={"help": "from_pretrained's device_map ('auto' spreads a large model over the GPUs); "
                          "default: the whole model on one device."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the modelling code shipped in the checkpoint folder."}
    )

    def __post_init__(self):
        if not self.model and self.required:
            raise ValueError("model: give the checkpoint folder (--model PATH)")
        _one_of(self.dtype, DTYPES, "dtype")

    def load(self, device: Optional[str] = None):
        """(model, tokenizer) from the local folder, on ``device`` unless ``device_map`` places it; a model
        without MoE routers is refused here, before any work."""
        from ..hf import find_routers
        from .models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(
            self.model, device, dtype=self.dtype, device_map=self.device_map, trust_remote_code=self.trust_remote_code
        )
        try:
            find_routers(model)
        except ValueError:
            # The library's message names its routers= argument, which the command line does not have.
            raise ValueError(
                f"model: {self.model} holds a {type(model).__name__} without MoE routers that record router_logits "
                "(a dense model, or MoE code transformers does not record); the command line works on transformers "
                "Mixture-of-Experts models such as Qwen3MoeForCausalLM"
            ) from None
        return model, tokenizer


@dataclass
class DataArguments:
    """Where the pairs are and which columns hold them (see :func:`sara_kernels.hf.load_pairs`)."""

    required: ClassVar[bool] = True  # False where a command has data of its own (the demo's corpus)

    data: list[str] = field(
        default_factory=list,
        metadata={"help": "Pair files (json/jsonl, csv, tsv, parquet, arrow; compressed too) or a save_to_disk "
                          "folder; required."},
    )
    data_format: Optional[str] = field(
        default=None,
        metadata={"help": "json, csv, tsv, parquet or arrow (load_pairs' names); default: from the file extension."},
    )
    data_split: str = field(default="train", metadata={"help": "Split of a DatasetDict folder."})
    anchor_column: str = field(
        default="anchor", metadata={"help": "Column of the anchor side (text or chat messages); 'a.b' for a nested field."}
    )
    target_column: str = field(default="target", metadata={"help": "Column of the target side (its translation)."})
    lang_column: Optional[str] = field(default=None, metadata={"help": "Column of language tags; default: 'lang' if present."})
    anchor_lang: Optional[str] = field(
        default=None, metadata={"help": "Anchor language code in {'translation': {code: text}} rows."}
    )
    target_lang: Optional[str] = field(default=None, metadata={"help": "Target language code in the translation layout."})
    translation_column: str = field(default="translation", metadata={"help": "Column of the translation layout."})

    def __post_init__(self):
        if isinstance(self.data, (str, os.PathLike)):  # a single file in a config file
            self.data = [os.fspath(self.data)]
        if not self.data and self.required:
            raise ValueError("data: give the pair file(s) or folder (--data PATH [PATH ...])")

    def load(self, files: Optional[list] = None):
        """The pairs of ``files`` (default: ``data``) as a validated ``datasets.Dataset``."""
        from ..hf.data import load_pairs

        return load_pairs(
            files or self.data, data_format=self.data_format, split=self.data_split,
            anchor_column=self.anchor_column, target_column=self.target_column, lang_column=self.lang_column,
            anchor_lang=self.anchor_lang, target_lang=self.target_lang, translation_column=self.translation_column,
        )


@dataclass
class SaraArguments:
    """Which layers SARA reads, how far each side is read and the backend (``priors``, ``analyze``, ``demo``)."""

    layers: str = field(default="all", metadata={"help": "MoE layers: 'all', 'middle' or comma-separated decoder indices and inclusive ranges ('0,4,7-34')."})
    max_length: Optional[int] = field(default=None, metadata={"help": "Truncate each side to this many tokens."})
    backend: Literal[backends.CHOICES] = field(default="auto", metadata={"help": backends.HELP})

    def __post_init__(self):
        from ..layer_selection import resolve_layers_spec

        self.layers = resolve_layers_spec(self.layers, "layers")
        backends.check_backend(self.backend)
        check_positive(self.max_length, "max_length")


@dataclass
class RoutingArguments(SaraArguments):
    """How routing is measured (``priors``, ``analyze``)."""

    score: Optional[Literal["softmax", "sigmoid"]] = field(default=None, metadata={"help": "Default: the model family's."})
    temperature: float = field(default=1.0, metadata={"help": "τ dividing the router logits."})
    batch_size: int = field(default=8, metadata={"help": "Texts per forward."})

    def __post_init__(self):
        super().__post_init__()
        if self.score is not None:
            _one_of(self.score, ("softmax", "sigmoid"), "score")
        check_positive(self.batch_size, "batch_size")


@dataclass
class ProgressArguments:
    """Progress bars, the same option on every command."""

    no_progress: bool = field(
        default=False, metadata={"help": "No progress bars (there are none when stderr is not a terminal)."}
    )

    @property
    def enabled(self) -> bool:
        return not self.no_progress and sys.stderr.isatty()

    def apply(self) -> None:
        """Without bars, also silence those of transformers (loading weights) and datasets (reading files):
        in a log file each redraw of a bar is one more carriage-return line."""
        if self.enabled:
            return
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()


class CommandParser(HfArgumentParser):
    """``HfArgumentParser`` whose usage errors are raised (as ``argparse.ArgumentError``), not printed with
    the whole usage: the command line reports them in one line."""

    def error(self, message):
        raise argparse.ArgumentError(None, message)


def parse_command(dataclass_types, argv: list, prog: str, description: str) -> tuple:
    """Instances of ``dataclass_types`` from flags, or from one YAML/JSON file given alone; a
    :class:`ProgressArguments` among them is applied."""
    parsed = _parse(dataclass_types, argv, prog, description)
    for options in parsed:
        if isinstance(options, ProgressArguments):
            options.apply()
    return parsed


def _parse(dataclass_types, argv: list, prog: str, description: str) -> tuple:
    parser = CommandParser(dataclass_types, prog=prog, description=description)
    if len(argv) == 1 and argv[0].lower().endswith(CONFIG_SUFFIXES):
        path = argv[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        if path.lower().endswith(".json"):
            import json

            try:
                return parser.parse_json_file(path)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        import yaml

        try:
            with open(path) as f:
                config = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a mapping of option names to values, got {type(config).__name__}")
        _check_yaml_floats(config, dataclass_types, path)
        return parser.parse_dict(config)
    _, unknown = parser.parse_known_args(argv)  # before the dataclasses check their values
    if unknown:
        raise argparse.ArgumentError(None, f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(parser.parse_args_into_dataclasses(args=argv))


def _check_yaml_floats(config: dict, dataclass_types, path: str) -> None:
    """A float option given a string (YAML 1.1 reads ``1e-5``, without a dot, as text) is one clear error,
    not a TypeError deep in the trainer."""
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            value = config.get(f.name)
            allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
            if isinstance(value, str) and float in allowed and str not in allowed:
                try:
                    number = float(value)
                except ValueError:
                    continue  # not a number at all: the parser reports it
                raise ValueError(
                    f"{path}: {f.name}: YAML reads {value} as a string, not a number; write it with a dot and a "
                    f"signed exponent: '{f.name}: {number:.1e}'"
                )
