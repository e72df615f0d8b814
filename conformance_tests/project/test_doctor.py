"""``python -m topk_core`` (the doctor): argument errors, nothing to check, the footer.

Its run over installed libraries is tested in ``test_packaging.py``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from topk_core import __main__ as doctor


@pytest.mark.parametrize("value", ["", ",", " , "])
def test_doctor_rejects_an_empty_library_list(tmp_path, value):
    # was an IndexError traceback from the table of no rows, exit status 1
    proc = subprocess.run(
        [sys.executable, "-m", "topk_core", "--libraries", value],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "--libraries: no library given" in proc.stderr and repr(value) in proc.stderr


def test_doctor_with_nothing_installed_checks_nothing_and_fails(monkeypatch, capsys):
    # was exit status 0 with an empty "forward + backward =" footer
    monkeypatch.setattr(doctor.importlib.util, "find_spec", lambda name: None)
    assert doctor.main(["--libraries", "cupy,jax"]) == 1
    out, err = capsys.readouterr()
    assert "| cupy" in out and "not installed" in out
    assert "forward + backward" not in out  # no settings of timings that did not happen
    assert "nothing checked: none of the requested libraries (cupy, jax) is installed" in err


def test_doctor_footer_names_every_checked_library():
    # CuPy, when it is the one library checked, was left out: "forward + backward = "
    lines = doctor.footer(1000, 1, ["cupy"])
    assert f"forward + backward = cupy: {doctor.BACKWARD_DEFAULT}" in lines[1]
    lines = doctor.footer(1000, 1, ["numpy", "torch"])
    assert "numpy: dftopk_and_vjp" in lines[1] and "torch: autograd .backward()" in lines[1]


def test_doctor_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit) as info:
        doctor.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0" in text and "1 a check failed" in text and "2 bad arguments" in text
