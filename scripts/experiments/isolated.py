"""Run each configuration of a GPU probe in its own process: a launch failure poisons the CUDA context (and every
later configuration in it), and a wrong barrier phase hangs, so one bad configuration must cost only itself."""

from __future__ import annotations

import json
import subprocess
import sys


def run_each(script: str, shape: str, configs: list[dict], timeout: float) -> None:
    """`python script --shape shape --one <config json>` per configuration; print its last JSON line, or the config
    with `failed` (the last stderr line, or a hang past `timeout` seconds)."""
    for cfg in configs:
        try:
            r = subprocess.run([sys.executable, script, "--shape", shape, "--one", json.dumps(cfg)],
                               capture_output=True, text=True, timeout=timeout)
            lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
            tail = r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else [f"exit {r.returncode}"]
            print(lines[-1] if lines else json.dumps({**cfg, "failed": tail[0][:300]}), flush=True)
        except subprocess.TimeoutExpired:
            print(json.dumps({**cfg, "failed": f"no result within {timeout:.0f} s (a hang)"}), flush=True)
