"""Every ```python block of README.md runs as printed, and so does every ```bash block that runs a
command of the package (``python -m sara_kernels ...``).

Convention (for whoever writes README snippets):

* The blocks of one ``## `` section run in document order in one fresh namespace, in their own
  Python process (CPU only, Hugging Face Hub offline, current directory a temporary folder), so
  a section's first block sets up what the later ones use (a tiny random model, a tokenizer,
  ``pairs``: see the start of the Hugging Face section). Blocks in list items may be indented.
* A block that cannot run here (a signature listing, code that needs several processes or a
  GPU) is marked by an HTML comment on the line right before its opening fence, with the
  reason: ``<!-- not-run: needs one process per rank -->``. Keep these rare; a marker without
  a reason, or one that is not followed by a ```python block, fails the test.

* The command-line blocks run in document order in one temporary folder holding what they name:
  ``./my-moe`` (a tiny MoE saved with ``save_pretrained``), ``opus.jsonl`` (pairs in the
  ``{"translation": {"en": ..., "sw": ...}}`` layout) and ``pairs.jsonl`` (``anchor``/``target``
  pairs); ``python`` is this interpreter, CPU only, offline. The changes made to them: step
  counts (``--max_steps N``, ``--steps N``, ``max_steps: N``) become 2, and ``bash scripts/sara.sh``
  (which sets up ``.venv``, then runs ``python -m sara_kernels``) runs as ``python -m sara_kernels``. A block that needs what a
  test cannot give (several processes, a GPU) takes the same not-run marker.

A failing block is reported with its README line numbers (tracebacks point into README.md).
A section that imports an optional integration this environment lacks (the ``trl``, ``peft`` or
``megatron`` or ``torchtitan`` extra, as in a venv with only ``sara-kernels[hf]``) is skipped with the extra to install; CI
installs the ``test`` extra, which has them all.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION_TIMEOUT_S = 600

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^`\s]*)\s*$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(?P<reason>.*?)-->\s*$")
_SECTION = re.compile(r"^## (?P<title>.+?)\s*$")
_OPTIONAL_IMPORT = re.compile(r"^\s*(?:from|import)\s+(?P<module>trl|peft|megatron|torchtitan)\b", re.M)


@dataclass(frozen=True)
class Block:
    section: str
    first_line: int  # 1-based README line of the block's first code line
    code: str
    not_run_reason: str | None
    lang: str = "python"


RUN_LANGS = ("python", "bash")


def parse_readme(text: str) -> list[Block]:
    """The ```python and ```bash blocks of ``text`` with their section, position and not-run marker."""
    lines = text.splitlines()
    blocks, section, i = [], "(before the first section)", 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence is None:
            heading = _SECTION.match(line)
            if heading:
                section = heading.group("title")
            i += 1
            continue
        indent, lang = fence.group("indent"), fence.group("lang")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"README.md:{i + 1}: code fence is never closed")
        marker = _NOT_RUN.match(lines[i - 1]) if i > 0 else None
        if marker is not None and lang not in RUN_LANGS:
            raise AssertionError(f"README.md:{i}: not-run marker before a ```{lang} block (only python and bash run)")
        if lang in RUN_LANGS:
            body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1 : end]]
            reason = marker.group("reason").strip() if marker else None
            if marker is not None and not reason:
                raise AssertionError(f"README.md:{i}: not-run marker without a reason")
            blocks.append(Block(section, i + 2, textwrap.dedent("\n".join(body)), reason, lang))
        i = end + 1
    for number, line in enumerate(lines, 1):
        if _NOT_RUN.match(line) and not (number < len(lines) and _FENCE.match(lines[number])):
            raise AssertionError(f"README.md:{number}: not-run marker is not right before a code fence")
    return blocks


# Runs one section's blocks in order in one namespace; compiled with leading blank lines so that
# tracebacks name the README line.
_RUNNER = """
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for block in blocks:
    source = "\\n" * (block["first_line"] - 1) + block["code"]
    try:
        exec(compile(source, "README.md", "exec"), namespace)
    except BaseException:
        end = block["first_line"] + block["code"].count("\\n")
        print(f"README block at lines {block['first_line']}-{end} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
"""


BLOCKS = parse_readme(README.read_text())


def _sections() -> dict[str, list[Block]]:
    out: dict[str, list[Block]] = {}
    for block in BLOCKS:
        if block.lang == "python":
            out.setdefault(block.section, []).append(block)
    return out


SECTIONS = _sections()


def test_readme_has_runnable_snippets():
    runnable = [b for blocks in SECTIONS.values() for b in blocks if b.not_run_reason is None]
    assert len(runnable) >= 5, "the README's python snippets were not found (parser or README changed?)"


@pytest.mark.parametrize("section", [s for s, bs in SECTIONS.items() if any(b.not_run_reason is None for b in bs)])
def test_readme_section_runs(section, tmp_path):
    blocks = [
        {"first_line": b.first_line, "code": b.code} for b in SECTIONS[section] if b.not_run_reason is None
    ]
    missing = sorted({m.group("module") for b in blocks for m in _OPTIONAL_IMPORT.finditer(b["code"])
                      if importlib.util.find_spec(m.group("module")) is None})
    if missing:
        pytest.skip(f"the section imports {missing}: pip install 'sara-kernels[{','.join(missing)}]'")
    blocks_file = tmp_path / "blocks.json"
    blocks_file.write_text(json.dumps(blocks))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(blocks_file)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=SECTION_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"README section {section!r}:\n{proc.stderr[-6000:]}", pytrace=False)


def test_parser_applies_the_convention():
    text = textwrap.dedent(
        """\
        ## A
        ```python
        x = 1
        ```
        <!-- not-run: needs a GPU -->
        ```python
        y = 2
        ```
        ## B
        - item:

          ```python
          if True:
              z = 3
          ```
        ```bash
        echo not python
        ```
        """
    )
    blocks = parse_readme(text)
    assert [(b.section, b.first_line, b.not_run_reason) for b in blocks] == [
        ("A", 3, None), ("A", 7, "needs a GPU"), ("B", 13, None), ("B", 17, None)
    ]
    assert blocks[2].code == "if True:\n    z = 3"
    assert [b.lang for b in blocks] == ["python", "python", "python", "bash"]
    with pytest.raises(AssertionError, match="without a reason"):
        parse_readme("<!-- not-run: -->\n```python\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="only python and bash run"):
        parse_readme("<!-- not-run: no -->\n```text\nx\n```\n")
    with pytest.raises(AssertionError, match="not right before"):
        parse_readme("<!-- not-run: stale -->\n\ntext\n")
    with pytest.raises(AssertionError, match="never closed"):
        parse_readme("```python\nx = 1\n")


# ---- the command-line blocks ------------------------------------------------------------------

_HEREDOC = re.compile(r"<<-?\s*'?\"?(?P<word>\w+)")


def commands(code: str) -> list[str]:
    """The command lines of a shell block: no comments, continuation lines or here-document bodies."""
    out, continued, heredoc_end = [], False, None
    for line in code.splitlines():
        if heredoc_end is not None:
            heredoc_end = None if line.strip() == heredoc_end else heredoc_end
            continue
        if not continued and line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
            heredoc = _HEREDOC.search(line)
            heredoc_end = heredoc.group("word") if heredoc else None
        continued = line.rstrip().endswith("\\")
    return out


SARA_SH = "bash scripts/sara.sh "  # sets up .venv, then runs `python -m sara_kernels` with its arguments
PACKAGE_COMMANDS = ("python -m sara_kernels ", SARA_SH)


def is_command_block(block: Block) -> bool:
    """A bash block of the package's commands (and files they read written by ``cat > FILE <<END``)."""
    lines = commands(block.code)
    return (block.lang == "bash" and block.not_run_reason is None and any(l.startswith(PACKAGE_COMMANDS) for l in lines)
            and all(l.startswith((*PACKAGE_COMMANDS, "cat > ")) for l in lines))


COMMAND_BLOCKS = [b for b in BLOCKS if is_command_block(b)]
_STEPS = (
    (re.compile(r"(--(?:max_steps|steps)[ =])\d+"), r"\g<1>2"),
    (re.compile(r"^(\s*max_steps:\s*)\d+\s*$", re.M), r"\g<1>2"),
)


def shortened(code: str) -> str:
    """``code`` with every step count set to 2, and ``scripts/sara.sh`` run as what it runs once the
    ``.venv`` is set up (the test's interpreter is): the only changes made to a README command."""
    code = re.sub(rf"^(\s*){re.escape(SARA_SH)}", r"\g<1>python -m sara_kernels ", code, flags=re.M)
    for pattern, replacement in _STEPS:
        code = pattern.sub(replacement, code)
    return code


def test_command_blocks_are_recognised():
    block = Block("s", 1, "# a comment\npython -m sara_kernels train --a \\\n    --b\ncat > c.yaml <<'YAML'\nx: pip\nYAML\n"
                         "python -m sara_kernels train c.yaml", None, "bash")
    assert commands(block.code) == ["python -m sara_kernels train --a \\", "cat > c.yaml <<'YAML'", "python -m sara_kernels train c.yaml"]
    assert is_command_block(block)
    assert not is_command_block(Block("s", 1, "pip install -e .\npython -m sara_kernels selftest", None, "bash"))
    assert is_command_block(Block("s", 1, "bash scripts/sara.sh demo --model m", None, "bash"))
    assert not is_command_block(Block("s", 1, "bash scripts/sara.sh demo\nbash scripts/test.sh", None, "bash"))
    assert not is_command_block(Block("s", 1, "python -m sara_kernels demo", "needs a GPU", "bash"))


def test_shortened_changes_only_step_counts():
    code = "python -m sara_kernels train --max_steps 1000 --sara_max_length 64\nmax_steps: 300\nbash scripts/sara.sh demo --steps=200"
    assert shortened(code) == ("python -m sara_kernels train --max_steps 2 --sara_max_length 64\nmax_steps: 2\n"
                               "python -m sara_kernels demo --steps=2")


@pytest.fixture
def command_folder(tmp_path):
    """The folder the command blocks run in: ./my-moe, opus.jsonl, pairs.jsonl; ``python`` on PATH."""
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    from hf_train_helpers import TOKENIZER, pairs, tiny_moe

    from sara_kernels.hf import save_pairs

    work = tmp_path / "cwd"
    work.mkdir()
    tiny_moe(seed=1).save_pretrained(work / "my-moe")
    TOKENIZER.save_pretrained(work / "my-moe")
    examples = pairs(16, seed=2)
    save_pairs(examples, work / "pairs.jsonl")
    (work / "opus.jsonl").write_text(
        "".join(json.dumps({"translation": {"en": p["anchor"], "sw": p["target"]}}) + "\n" for p in examples))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return work, bin_dir


def test_readme_command_blocks_run(command_folder):
    assert any(re.search(r"python -m sara_kernels train\b", b.code) for b in COMMAND_BLOCKS), (
        "no README block runs `python -m sara_kernels train` (parser or README changed?)")
    work, bin_dir = command_folder
    repo = str(README.parent)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(work.parent / "hf_datasets_cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    for block in COMMAND_BLOCKS:
        end = block.first_line + block.code.count("\n")
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", shortened(block.code)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=SECTION_TIMEOUT_S)
        assert proc.returncode == 0, f"README command block at lines {block.first_line}-{end} failed:\n{proc.stderr[-6000:]}"
        # stderr is not a terminal here: no progress bar may redraw itself into it
        assert "\r" not in proc.stderr, f"README block at lines {block.first_line}-{end} drew progress bars into a pipe"
