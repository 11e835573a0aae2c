"""What ptxas says of a kernel compiled for sm_90 on this machine (no GPU needed), for the probes' compile checks."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path


def ptxas_report(ptx: str) -> dict:
    """ptxas -v for sm_90a on a kernel's PTX: exit code, registers, spill bytes, and its warnings (e.g. a wgmma it
    serialised)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        r = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(path), "-o", str(Path(tmp) / "k.cubin")],
                           capture_output=True, text=True)
    text = r.stdout + r.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else None  # noqa: E731
    return dict(ptxas_rc=r.returncode, registers=num(r"Used (\d+) registers"),
                spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"),
                warnings=[line.strip() for line in text.splitlines() if "warning" in line.lower()])
