"""``python -m sara_kernels bench``: the command at tiny size on the CPU (what it times there, what
it writes, what it says), the router shapes read from config files and the built-in table, the
one-line errors, and a -h that does not import torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import REPO  # noqa: E402
from hf_train_helpers import one_thread  # noqa: E402

from sara_kernels import backends  # noqa: E402
from sara_kernels.programs.bench_archs import ARCHS, arch_from_config  # noqa: E402
from sara_kernels.programs.cli import main  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _config_file(tmp_path, config, name="config.json") -> str:
    path = tmp_path / name
    config.to_json_file(str(path)) if hasattr(config, "to_json_file") else path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture
def tiny_qwen3_moe(tmp_path):
    """3 decoder layers, the middle one dense: 2 routers of 6 experts (not a power of two)."""
    config = transformers.Qwen3MoeConfig(num_hidden_layers=3, mlp_only_layers=[1], num_experts=6, num_experts_per_tok=2,
                                         hidden_size=32, moe_intermediate_size=16, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16, vocab_size=64)
    folder = tmp_path / "tiny"
    folder.mkdir()
    _config_file(folder, config)
    return str(folder)


def test_tiny_run_on_the_cpu_times_the_reference_only_and_writes_json_and_png(tiny_qwen3_moe, tmp_path, capsys):
    """On a CPU the interpreted Triton kernels (TRITON_INTERPRET=1 here, tests/conftest.py) are not
    timed, the output says the numbers are CPU numbers, and no progress bar is drawn off a terminal."""
    out = tmp_path / "out"
    assert main(["bench", "--model", tiny_qwen3_moe, "--layers", "1", "--tokens", "16", "--device", "cpu",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "these are CPU numbers" in printed.out and "not a measurement" in printed.out
    assert printed.err == ""
    result = json.loads((out / "bench.json").read_text())
    arch = result["meta"]["arch"]
    assert (arch["layers"], arch["experts"], arch["top_k"], arch["score"], arch["hidden"]) == (2, 6, 2, "softmax", 32)
    assert set(result["meta"]["not_timed"]) == set(backends.FUSED)
    assert all("not a measurement" in why for why in result["meta"]["not_timed"].values())
    op = result["op"]
    assert {(r["contender"], r["pass_name"]) for r in op} == {("reference", p) for p in ("fwd", "bwd", "fwd+bwd")}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 and r["layers"] == 2 and r["experts"] == 6 for r in op)
    step = result["step"]
    assert [r["variant"] for r in step] == ["none", "reference"]
    assert all(r["step_ms"] > 0 for r in step) and step[1]["op_alone_ms"] > 0
    assert result["meta"]["step_model"]["layers"] == 1
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reference" in (out / "bench.md").read_text()


@pytest.mark.parametrize("config_class, arch", [
    ("DeepseekV3Config", "deepseek-v3"), ("MixtralConfig", "mixtral-8x7b"), ("PhimoeConfig", "phi-3.5-moe"),
    ("GptOssConfig", "gpt-oss-120b"), ("Qwen3NextConfig", "qwen3-next-80b-a3b"),
])
def test_the_table_agrees_with_transformers_configs_of_the_same_models(tmp_path, config_class, arch):
    """These config classes' defaults are the named model's (their docstrings say so): reading one
    back gives the table's row, dense layers (DeepSeek-V3's first 3) and the sigmoid included."""
    read = arch_from_config(_config_file(tmp_path, getattr(transformers, config_class)()))
    row = ARCHS[arch]
    fields = ("layers", "experts", "top_k", "score", "hidden", "expert_width")
    assert [getattr(read, f) for f in fields] == [getattr(row, f) for f in fields]


@pytest.mark.parametrize("config, layers, experts, top_k, score", [
    (dict(model_type="qwen3_moe", num_hidden_layers=8, decoder_sparse_step=2, mlp_only_layers=[5], num_experts=60,
          num_experts_per_tok=4, hidden_size=64, moe_intermediate_size=32), 3, 60, 4, "softmax"),  # 1, 3, 7
    (dict(model_type="jamba", num_hidden_layers=8, expert_layer_period=2, expert_layer_offset=1, num_experts=16,
          num_experts_per_tok=2, hidden_size=64, intermediate_size=128), 4, 16, 2, "softmax"),
    (dict(model_type="llama4", text_config=dict(model_type="llama4_text", num_hidden_layers=6, moe_layers=[1, 3, 5],
          num_local_experts=16, num_experts_per_tok=1, hidden_size=64, intermediate_size=128)), 3, 16, 1, "sigmoid"),
    (dict(model_type="dbrx", n_layers=4, d_model=64,
          ffn_config=dict(moe_num_experts=16, moe_top_k=4, ffn_hidden_size=128)), 4, 16, 4, "softmax"),
    (dict(model_type="deepseek_v3", num_hidden_layers=5, first_k_dense_replace=1, n_routed_experts=7,
          num_experts_per_tok=2, hidden_size=64, moe_intermediate_size=32, scoring_func="sigmoid"), 4, 7, 2,
     "sigmoid"),
])
def test_the_router_fields_of_each_family_are_read(tmp_path, config, layers, experts, top_k, score):
    read = arch_from_config(_config_file(tmp_path, config))
    assert (read.layers, read.experts, read.top_k, read.score, read.hidden) == (layers, experts, top_k, score, 64)


def _one_line_error(capsys, argv) -> tuple:
    status = main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m sara_kernels bench: error: "), err
    return status, err


def test_mistakes_are_one_line_naming_what_would_work(tmp_path, capsys):
    dense = _config_file(tmp_path, transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32), "dense.json")
    out = ["--out", str(tmp_path / "never")]
    status, err = _one_line_error(capsys, ["bench", "--arch", "mixtral", *out])
    assert status == 1 and "--arch" in err and "mixtral-8x7b" in err and "--model PATH" in err
    status, err = _one_line_error(capsys, ["bench", "--model", dense, *out])
    assert status == 1 and "no MoE routers" in err and "--arch NAME" in err
    no_top_k = _config_file(tmp_path, dict(model_type="x", num_hidden_layers=2, num_experts=8, hidden_size=32,
                                           intermediate_size=64), "no_top_k.json")
    status, err = _one_line_error(capsys, ["bench", "--model", no_top_k, *out])
    assert status == 1 and "num_experts_per_tok" in err and "--arch NAME" in err
    status, err = _one_line_error(capsys, ["bench", "--model", str(tmp_path / "missing"), *out])
    assert status == 1 and "config.json" in err
    status, err = _one_line_error(capsys, ["bench", "--arch", "olmoe-1b-7b", "--tokens", "1000", *out])
    assert status == 1 and "use 512 or 1024" in err
    status, err = _one_line_error(capsys, ["bench", "--arch", "olmoe-1b-7b", "--backends", "nonesuch", *out])
    assert status == 2 and "invalid choice" in err and "reference" in err
    for fused in backends.FUSED:  # on a CPU, whether or not the interpreter or an emulated build would run it
        status, err = _one_line_error(capsys, ["bench", "--arch", "olmoe-1b-7b", "--device", "cpu", "--backends", fused,
                                               *out])
        assert status == 1 and f"--backends: {fused} cannot be timed" in err and "timed here: reference" in err
    if not torch.cuda.is_available():
        status, err = _one_line_error(capsys, ["bench", "--arch", "olmoe-1b-7b", "--device", "cuda", *out])
        assert status == 1 and "no CUDA device" in err and "--device cpu" in err
    assert not (tmp_path / "never").exists()


def test_help_does_not_import_torch(tmp_path):
    code = ("import runpy, sys\nsys.argv = ['sara_kernels', 'bench', '-h']\n"
            "try:\n    runpy.run_module('sara_kernels', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--arch" in proc.stdout and "deepseek-v3" in proc.stdout and "--model" in proc.stdout
    assert proc.stdout.rstrip().endswith("TORCH False"), proc.stdout[-500:]
