"""Every Python example of the README runs, as a user would paste it.

The ```` ```python ```` blocks are grouped by the section (``##`` or ``###``
heading) they stand in, and a group runs as one script in a fresh process
(its later blocks build on its earlier ones: "Choosing ``tau``" reuses the
NumPy quickstart's ``x``), from a file (``torch.multiprocessing.spawn`` needs
one), with the environment of a plain user: no ``XLA_FLAGS``, no x64, no Keras
backend chosen.  What the comments say an example shows is checked too: the
output of ``print(...)  # 4000`` and the value of ``loss(...)  # 0.391`` (to the
decimals written).  A group that imports a library this machine lacks is skipped
(CuPy without a GPU).  The multi-process examples use 127.0.0.1 only; every
process is ended by the test, whatever happens.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from topk_core.conformance.libs import BUILTIN_LIBS

README = Path(__file__).resolve().parents[2] / "README.md"
TIMEOUT_S = 300

#: environment variables the test run sets that a user's shell would not
_NOT_A_USERS = ("XLA_FLAGS", "JAX_ENABLE_X64", "KERAS_BACKEND", "JAX_PLATFORMS")


def _groups() -> dict[str, list[str]]:
    """``{section heading: [its python blocks, in order]}``."""
    if not README.is_file():
        return {}
    text = README.read_text(encoding="utf-8")
    groups: dict[str, list[str]] = {}
    section = "top"
    fence = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
    heading = re.compile(r"^(#{2,3}) (.+)$", re.M)
    pos = 0
    for block in fence.finditer(text):
        for h in heading.finditer(text, pos, block.start()):
            section = h.group(2).strip()
        pos = block.end()
        groups.setdefault(section, []).append(block.group(1))
    return groups


GROUPS = _groups()


def _top_level_modules(code: str) -> set[str]:
    names = re.findall(r"^(?:import|from) ([A-Za-z_]\w*)", code, re.M)
    return set(names)


def _shown_values(code: str) -> str:
    """``loss(x)  # 0.391: ...`` (a value shown as in a REPL) printed to its decimals."""

    def show(found: re.Match) -> str:
        expr, value = found.group(1), found.group(2)
        decimals = len(value.split(".")[1])
        return f'print(f"{{float({expr}):.{decimals}f}}")  # {value}'

    return re.sub(r"^([A-Za-z_][\w.]*\(.*\))\s+#\s*(-?\d+\.\d+)(?=:|$)", show, code, flags=re.M)


def _printed(code: str) -> list[str]:
    """What the example's comments say its ``print(...)`` lines show, as regexes.

    ``print(x)  # 4000: 1000 per row`` shows ``4000`` (the text after a value and a
    colon explains it); ``...`` and ``<learned>`` stand for whatever is printed there.
    """
    wanted = []
    for line in code.splitlines():
        found = re.match(r"\s*print\(.*\)\s+#\s*(.+)$", line)
        if not found:
            continue
        text = found.group(1).strip()
        value = re.match(r"^(\S+): ", text)
        if value:
            text = value.group(1)
        parts = re.split(r"(\.\.\.|<\w+>)", text)
        wanted.append("".join(".*" if i % 2 else re.escape(part) for i, part in enumerate(parts)))
    return wanted


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_readme_has_the_examples():
    """The parsing finds the quickstarts (a README edit that breaks a fence shows here)."""
    if not README.is_file():
        pytest.skip("no README.md beside the checkout (an installed suite)")
    names = " | ".join(GROUPS)
    for section in ("NumPy", "PyTorch", "JAX", "CuPy", "Keras 3", "Dask: chunks are the shards"):
        assert any(name.startswith(section) for name in GROUPS), (section, names)
    assert sum(len(blocks) for blocks in GROUPS.values()) >= 12


@pytest.mark.parametrize("section", list(GROUPS))
def test_readme_example_runs(section, tmp_path):
    code = _shown_values("\n\n".join(GROUPS[section]))
    missing = sorted(m for m in _top_level_modules(code) if importlib.util.find_spec(m) is None)
    if missing:
        pytest.skip(f"the example imports {', '.join(missing)}, not installed here")
    if "cupy" in _top_level_modules(code):
        reason = BUILTIN_LIBS["cupy"].unavailable()
        if reason is not None:
            pytest.skip(f"CuPy example: {reason}")
    # the torch.distributed example's fixed port: a free one here, so that nothing else
    # listening on this machine (another checkout's run) can collide with it
    code = re.sub(r"tcp://127\.0\.0\.1:\d+", f"tcp://127.0.0.1:{_free_port()}", code)
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in _NOT_A_USERS}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: spawned workers end with it
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        err += f"\nran past {TIMEOUT_S} s"
    finally:
        _kill_group(proc.pid)  # anything its workers left behind
    assert proc.returncode == 0, f"{section}:\n{out[-2000:]}\n{err[-4000:]}"
    lines = [line.strip() for line in out.splitlines()]
    for pattern in _printed(code):
        assert any(re.fullmatch(pattern, line) for line in lines), (section, pattern, out)
