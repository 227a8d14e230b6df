"""`make` refuses an interpreter older than the dependencies need (Python 3.11), in one line, before installing."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in interpreter: runs the real one with sys.version_info set to the version under test.
PATCH = "import sys; sys.version_info = ({major}, {minor}, 0); code = sys.argv[-1]; sys.argv = ['-c']; exec(code)"
FAKE_PYTHON = '#!/bin/sh\nexec {real} -c "' + PATCH + '" "$@"\n'


def make_venv_with(tmp_path, minor: int) -> subprocess.CompletedProcess:
    fake = tmp_path / f"python3.{minor}"
    fake.write_text(FAKE_PYTHON.format(real=sys.executable, major=3, minor=minor))
    fake.chmod(0o755)
    venv = tmp_path / f"venv{minor}"
    cmd = ["make", "-s", f"PYTHON={fake}", f"VENV={venv}", f"{venv}/bin/activate"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_python_3_10_is_refused_in_one_line_before_anything_installs(tmp_path):
    result = make_venv_with(tmp_path, 10)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if not line.startswith("make")]
    fake = tmp_path / "python3.10"
    assert lines == [f"latentdiff needs Python >= 3.11, but {fake} is 3.10: run make with PYTHON=python3.11 (or newer)"]
    assert not (tmp_path / "venv10").exists()


def test_the_check_passes_python_3_11():
    check = subprocess.run(
        ["make", "-s", "-n", "PYTHON=python3", "VENV=/nonexistent/v", "/nonexistent/v/bin/activate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    command = check.stdout.splitlines()[0]  # the check as make would run it
    assert command.startswith("python3 -c ")
    ok = subprocess.run(["sh", "-c", command.replace("python3", sys.executable, 1)], capture_output=True, text=True)
    assert sys.version_info >= (3, 11) and ok.returncode == 0, ok.stderr
