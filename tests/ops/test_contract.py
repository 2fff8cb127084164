"""Both fused backends implement sara_kernels.ops.contract: the Triton ops are registered with its
schemas, the C++ ``m.def`` strings (in csrc/ and as the emulated build registers them) match them,
the C++ limits (csrc/routing_js.h) are its limits, and the C++ split rule gives what the contract's does."""

import itertools
import os
import re
import subprocess

import pytest
import torch

from sara_kernels import backends
from sara_kernels.ops import contract
from sara_kernels.ops.triton import autograd as triton_ops

from cuda_emulation.extension import CXX, INCLUDE
from helpers import REPO

CSRC = os.path.join(REPO, "csrc")


def _normal(schema: str) -> str:
    """The schema as torch prints it, without the op's name."""
    return str(torch._C.parse_schema(f"op{schema}")).removeprefix("op")


def _csrc_schemas() -> dict:
    with open(os.path.join(CSRC, "routing_js_ops.cpp")) as f:
        source = f.read()
    schemas = {}
    for literals in re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', source):
        text = "".join(re.findall(r'"([^"]*)"', literals))
        name, rest = text.split("(", 1)
        schemas[name] = _normal("(" + rest)
    return schemas


def _header_constant(name: str) -> int:
    """The value of ``constexpr int <name> = <value>;`` in csrc/routing_js.h."""
    with open(os.path.join(CSRC, "routing_js.h")) as f:
        found = re.findall(rf"\bconstexpr\s+int\s+{name}\s*=\s*(\d+)\s*;", f.read())
    assert len(found) == 1, f"csrc/routing_js.h defines {name} {len(found)} times"
    return int(found[0])


def _expected_cuda_schemas() -> dict:
    return {f"cuda_{name}": _normal(schema)
            for name, schema in (*contract.SCHEMAS.items(), *contract.CUDA_AUTOGRAD_SCHEMAS.items())}


def test_triton_ops_are_registered_with_the_contract_schemas():
    assert triton_ops.sara_loss_fwd.op  # the module registered its ops
    for name, schema in contract.SCHEMAS.items():
        registered = getattr(torch.ops.sara_kernels, name).default._schema
        assert str(registered).split("(", 1)[0] == f"sara_kernels::{name}"
        assert _normal("(" + str(registered).split("(", 1)[1]) == _normal(schema), name


def test_csrc_defines_exactly_the_contract_schemas():
    assert _csrc_schemas() == _expected_cuda_schemas()


def test_csrc_limits_are_the_contract_limits():
    assert _header_constant("kMaxExperts") == contract.MAX_EXPERTS
    assert _header_constant("kMaxSeqs") == contract.MAX_SEQS


def test_emulated_build_registers_the_contract_schemas(emulated_cuda_extension):
    for name, schema in _expected_cuda_schemas().items():
        registered = str(getattr(torch.ops.sara_kernels, name).default._schema)
        assert registered.split("(", 1)[0] == f"sara_kernels::{name}"
        assert _normal("(" + registered.split("(", 1)[1]) == schema, name


GRID = list(itertools.product([1, 7, 1000, 65536, 1 << 22], [1, 3, 64, 4096], [1, 2, 48], [1, 132], [4, 16, 32]))


def test_cpp_split_rule_is_the_contract_rule(tmp_path):
    if CXX is None:
        pytest.skip("no C++ compiler")
    program = tmp_path / "split_rule.cpp"
    program.write_text('#include <cstdio>\n#include "routing_js.h"\nint main() {\n'
                       '  long long n, b, l, sm, rows;\n'
                       '  while (std::scanf("%lld %lld %lld %lld %lld", &n, &b, &l, &sm, &rows) == 5)\n'
                       '    std::printf("%d\\n", sara::split_rule(n, b, l, sm, rows));\n}\n')
    binary = tmp_path / "split_rule"
    subprocess.run([CXX, "-std=c++20", f"-I{CSRC}", f"-I{INCLUDE}", str(program), "-o", str(binary)], check=True,
                   timeout=300)
    lines = "".join(f"{n} {b} {l} {sm} {rows}\n" for n, b, l, sm, rows in GRID)
    out = subprocess.run([str(binary)], input=lines, capture_output=True, text=True, check=True, timeout=60).stdout
    want = [contract.num_splits(*case) for case in GRID]
    assert [int(x) for x in out.split()] == want
    assert len(set(want)) > 3  # the grid reaches the rule's several regimes, not one value


def test_every_listed_backend_has_its_entry_points():
    for name, entry in backends.REGISTRY.items():
        module = entry.module
        for attr in ("available", "runs_on", "require", "sara_loss", "pooled_distribution"):
            assert callable(getattr(module, attr)), (name, attr)
    assert backends.CHOICES == ("auto", *backends.REGISTRY)
