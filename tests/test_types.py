"""The three packages type-check clean: ``python -m mypy`` (settings in mypy.ini) reports no error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MYPY_TIMEOUT = 240.0  # a cold cache takes a few seconds; a warm one under one


@pytest.mark.timeout(MYPY_TIMEOUT + 30)
def test_mypy_reports_no_error():
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=MYPY_TIMEOUT)
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0 and "error:" not in output, output
