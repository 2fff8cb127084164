"""Loading a saved model for the programs (``demo --model``, ``analyze``, ``priors``, ``train``): local files only."""

from __future__ import annotations

import json
import os
from typing import Optional



def load_model_and_tokenizer(
    path: str | os.PathLike,
    device: Optional[str] = None,
    *,
    dtype: Optional[str] = None,
    device_map: Optional[str] = None,
    trust_remote_code: bool = False,
):
    """A local checkpoint (``save_pretrained`` folder) as (causal LM, tokenizer); nothing is downloaded.

    ``dtype``, ``device_map`` and ``trust_remote_code`` go to ``from_pretrained`` (a ``device_map``
    given as a JSON object is parsed); without a ``device_map`` the model is moved to ``device``
    (default: ``cuda`` when available, else the CPU).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model: {path} is not a directory with a saved model (save_pretrained output)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, **options)
    if dtype is not None:
        options["dtype"] = dtype
    if device_map is not None:
        options["device_map"] = _parse_device_map(device_map)
    model = AutoModelForCausalLM.from_pretrained(path, **options)
    if device_map is not None:
        return model, tokenizer
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), tokenizer


def _parse_device_map(text: str):
    """A device_map name ('auto', 'cpu', 'cuda:0', ...) or a JSON object {module name: device}."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"device_map: not a valid JSON object ({e})") from None
