"""Loading a saved model for the programs (``demo --model``, ``analyze``): local files only."""

from __future__ import annotations

import os
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_model_and_tokenizer(path: str | os.PathLike, device: Optional[str] = None):
    """A local checkpoint (``save_pretrained`` folder) as (causal LM, tokenizer); nothing is downloaded."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model: {path} is not a directory with a saved model (save_pretrained output)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), tokenizer
