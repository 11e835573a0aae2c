"""Compile-only checks, on the CPU, of the selection and planning kernels (kernels/select.py `_topk_keep_kernel`,
kernels/plan.py `_plan_rows_kernel` and `_plan_items_kernel`) for sm_90: what the interpreter does not check (a
constexpr reassigned, a global that is not a constexpr, a gather or scan the backend cannot lower) fails here, and
ptxas -v must report no spills. The numerics are the interpreter tests' (test_select_triton.py,
test_plan_triton.py) and, on the GPU, their `gpu` tests.

The compiles run in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it on CPU hosts before Triton is
imported, and an interpreter-mode Triton does not compile): this file, run as a script, prints one JSON line per
kernel variant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

VARIANTS = {
    # name: (module, kernel, pointer argument types, constexprs, num_warps); the launchers' choices at N = 112 (Wan
    # 480p, 128 lanes), 240 (720p, 256 lanes) and up to 512 tiles
    "topk_window_np128": ("select", "_topk_keep_kernel", {"scores": "*fp32", "window": "*u8", "keep": "*u8"},
                          {"HAS_WINDOW": True, "NP": 128, "BLOCK_W": 16}, 4),
    "topk_np256": ("select", "_topk_keep_kernel", {"scores": "*fp32", "window": "*u8", "keep": "*u8"},
                   {"HAS_WINDOW": False, "NP": 256, "BLOCK_W": 8}, 4),
    "topk_window_np512_bf16": ("select", "_topk_keep_kernel", {"scores": "*bf16", "window": "*u8", "keep": "*u8"},
                               {"HAS_WINDOW": True, "NP": 512, "BLOCK_W": 4}, 4),
    "plan_rows_np128": ("plan", "_plan_rows_kernel",
                        {"keep": "*u8", "off": "*i64", "chunk_arrays": "*i32", "chunk_count": "*i32", "row_ok": "*i8"},
                        {"BLOCK_N": 128, "NP": 128, "LOG_NP": 7, "BLOCK_C": 64}, 4),
    "plan_rows_np512": ("plan", "_plan_rows_kernel",
                        {"keep": "*u8", "off": "*i64", "chunk_arrays": "*i32", "chunk_count": "*i32", "row_ok": "*i8"},
                        {"BLOCK_N": 64, "NP": 512, "LOG_NP": 9, "BLOCK_C": 64}, 4),
    "plan_items_np256": ("plan", "_plan_items_kernel",
                         {"chunk_count": "*i32", "row_ok": "*i8", "off": "*i64", "items": "*i32", "ok": "*i8"},
                         {"BLOCK_M": 64, "NP": 256, "LOG_NP": 8, "ITEM_BITS": 3, "BLOCK_BH": 8, "BLOCK_R": 1024}, 4),
}


def compile_variant(name: str) -> dict:
    """Compile one variant for sm_90 (no GPU needed) and run ptxas -v for sm_90a on its PTX."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, kernel, pointers, constexprs, num_warps = VARIANTS[name]
    fn = getattr(importlib.import_module(f"fpsa_kernels.{module}"), kernel)
    signature = {arg: pointers.get(arg, "constexpr" if arg in constexprs else "i32") for arg in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "experiments"))
    from sm90 import ptxas_report

    return dict(variant=name, **ptxas_report(compiled.asm["ptx"]),
                num_warps=compiled.metadata.num_warps)


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    from .helpers import compile_check_lines  # here: this file also runs as a script, where it is not a package

    infos, _, failure = compile_check_lines(__file__, *VARIANTS)
    out = {info["variant"]: info for info in infos}
    assert set(out) == set(VARIANTS), failure
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiles_for_sm90_without_spills(compiled, name):
    info = compiled[name]
    assert "failed" not in info, f"{name}: {info['failed']}"
    assert info["ptxas_rc"] == 0 and info["num_warps"] == VARIANTS[name][4]
    assert info["spill_stores"] == 0 and info["spill_loads"] == 0
    assert info["registers"] is not None and info["registers"] <= 128, info


if __name__ == "__main__":
    for variant in sys.argv[1:]:
        try:
            print(json.dumps(compile_variant(variant)), flush=True)
        except Exception as err:  # reported per variant, so one failure does not hide the others
            print(json.dumps({"variant": variant, "failed": f"{type(err).__name__}: {err}"[-2000:]}), flush=True)
