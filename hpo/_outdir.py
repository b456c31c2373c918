"""The one check every command that writes files runs on its output directory, before any work."""

from __future__ import annotations

import os
from pathlib import Path

from hpo._errors import OutputNotWritable


def prepare_out_dir(out_dir: Path) -> None:
    """Create `out_dir` and prove that a file can be written there, so that a bad path costs
    nothing; OutputNotWritable (one line, the reason) if not."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".hpo-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputNotWritable(f"cannot write to output directory {out_dir}: {reason}") from None
