"""Fuzz the API from its own /openapi.json with schemathesis: no request may produce a 5xx."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import API_KEY

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.mark.skipif(not SCHEMATHESIS.exists() and not shutil.which("schemathesis"), reason="pip install schemathesis")
def test_fuzzing_finds_no_server_errors(stack, tmp_path):
    gw = stack["gateway"]
    exe = str(SCHEMATHESIS) if SCHEMATHESIS.exists() else "schemathesis"
    examples = os.environ.get("X2V_FUZZ_EXAMPLES", "40")
    result = subprocess.run(
        [exe, "run", f"http://{gw.addr}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", examples, "-H", f"Authorization: Bearer {API_KEY}", "--request-timeout", "60"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert summary and int(summary.group(1)) > 0 and summary.group(1) == summary.group(2), result.stdout[-3000:]
    assert re.search(r"Tested: ([1-9]\d*)", result.stdout), result.stdout[-3000:]
