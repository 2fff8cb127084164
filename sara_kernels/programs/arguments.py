"""Options shared by the ``train``, ``priors`` and ``analyze`` commands, parsed by ``HfArgumentParser``.

Each command is a tuple of dataclasses (the model, the data, its own options; ``train`` adds
:class:`~sara_kernels.hf.SARATrainingArguments`), so every option is defined once and a command
reads either flags (``--anchor_column en`` or ``--anchor-column en``) or a single YAML/JSON file
holding the same names, as transformers' own example scripts do.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from transformers import HfArgumentParser

from .._inputs import BACKENDS
from ..layer_selection import resolve_layers_spec
from ..hf.data import DATA_FORMATS, load_pairs
from .models import load_model_and_tokenizer

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
        if not self.model:
            raise ValueError("model: give the checkpoint folder (--model PATH)")
        _one_of(self.dtype, DTYPES, "dtype")

    def load(self, device: Optional[str] = None):
        """(model, tokenizer) from the local folder, on ``device`` unless ``device_map`` places it."""
        return load_model_and_tokenizer(
            self.model, device, dtype=self.dtype, device_map=self.device_map, trust_remote_code=self.trust_remote_code
        )


@dataclass
class DataArguments:
    """Where the pairs are and which columns hold them (see :func:`sara_kernels.hf.load_pairs`)."""

    data: list[str] = field(
        default_factory=list,
        metadata={"help": "Pair files (json/jsonl, csv, tsv, parquet, arrow; compressed too) or a save_to_disk "
                          "folder; required."},
    )
    data_format: Optional[str] = field(
        default=None, metadata={"help": f"One of {sorted(DATA_FORMATS)}; default: from the file extension."}
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
        if not self.data:
            raise ValueError("data: give the pair file(s) or folder (--data PATH [PATH ...])")

    def load(self, files: Optional[list] = None):
        """The pairs of ``files`` (default: ``data``) as a validated ``datasets.Dataset``."""
        return load_pairs(
            files or self.data, data_format=self.data_format, split=self.data_split,
            anchor_column=self.anchor_column, target_column=self.target_column, lang_column=self.lang_column,
            anchor_lang=self.anchor_lang, target_lang=self.target_lang, translation_column=self.translation_column,
        )


@dataclass
class RoutingArguments:
    """How routing is measured (``priors``, ``analyze``)."""

    layers: str = field(default="all", metadata={"help": "MoE layers: 'all', 'middle' or comma-separated decoder indices."})
    score: Optional[Literal["softmax", "sigmoid"]] = field(default=None, metadata={"help": "Default: the model family's."})
    temperature: float = field(default=1.0, metadata={"help": "τ dividing the router logits."})
    max_length: Optional[int] = field(default=None, metadata={"help": "Truncate each side to this many tokens."})
    batch_size: int = field(default=8, metadata={"help": "Texts per forward."})
    backend: Literal["auto", "triton", "cuda", "reference"] = field(
        default="auto", metadata={"help": "auto = the fused backend measured faster on CUDA (Triton until the C++ extension is measured), reference otherwise; cuda = the C++ extension."}
    )
    no_progress: bool = field(default=False, metadata={"help": "No progress bars."})

    def __post_init__(self):
        self.layers = resolve_layers_spec(self.layers, "layers")
        if self.score is not None:
            _one_of(self.score, ("softmax", "sigmoid"), "score")
        _one_of(self.backend, BACKENDS, "backend")
        check_positive(self.max_length, "max_length")
        check_positive(self.batch_size, "batch_size")


class CommandParser(HfArgumentParser):
    """``HfArgumentParser`` whose usage errors are raised (as ``argparse.ArgumentError``), not printed with
    the whole usage: the command line reports them in one line."""

    def error(self, message):
        raise argparse.ArgumentError(None, message)


def parse_command(dataclass_types, argv: list, prog: str, description: str) -> tuple:
    """Instances of ``dataclass_types`` from flags, or from one YAML/JSON file given alone."""
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
            return parser.parse_yaml_file(path)
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
    _, unknown = parser.parse_known_args(argv)  # before the dataclasses check their values
    if unknown:
        raise argparse.ArgumentError(None, f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(parser.parse_args_into_dataclasses(args=argv))
