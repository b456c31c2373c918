"""storage knows nothing of hpo or the CLI (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys


def test_storage_imports_neither_hpo_nor_typer_nor_torch():
    code = (
        "import sys, storage; "
        "print(sorted(m for m in ('hpo', 'typer', 'torch', 'pipeline') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
