"""scripts/bench_e2e_report.py: the end-to-end tables take each speedup from its own run and name what is missing."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO

SPEC = importlib.util.spec_from_file_location("bench_e2e_report", REPO / "scripts" / "bench_e2e_report.py")
report = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(report)


def run(model: str, compile: bool, fp8: bool, dense: float, means: dict[str, float]) -> dict:
    regimes = lambda ms: {"middle": {"ms": ms, "speedup_vs_dense": dense / ms, "rel_diff_vs_dense": 0.01,  # noqa: E731
                                     "sampling_steps_of_50": 50, "first_step_seconds": 1.0}}
    return {"model": model, "compile": compile, "fp8_linears": fp8, "dense_ms": dense, "date": "2026-12-02",
            "schedules": {name: {"schedule_mean_ms": ms, "schedule_mean_speedup_vs_dense": dense / ms,
                                 "regimes": regimes(ms)} for name, ms in means.items()}}


def test_tables_use_each_runs_own_baseline_and_list_the_missing_configurations(tmp_path):
    runs = [run("wan1_3b", False, False, 1000.0, {"default": 800.0, "sparse": 500.0}),
            run("wan1_3b", True, True, 1100.0, {"default": 550.0, "sparse": 275.0}),
            run("wan14b", True, False, 20000.0, {"sparse": 8000.0})]
    text = report.markdown(runs, "2026-12-02")
    assert "| sparse | compiled + FP8 linears | 1100 | 275 | **4.00×**" in text  # 1100 / 275, not 1000 / 275
    assert "| default | eager | 1000 | 800 | **1.25×**" in text
    assert "| sparse | compiled | 20000 | 8000 | **2.50×**" in text
    one_b, fourteen_b = text.split("## Wan-14B")
    assert "Not measured: default FP8 linears, default compiled, sparse FP8 linears, sparse compiled." in one_b
    assert "default eager" in fourteen_b.split("Not measured:")[1] and "sparse eager" in fourteen_b
    report.plot(runs, tmp_path / "e2e.png")
    assert (tmp_path / "e2e.png").stat().st_size > 10_000


def test_a_gluon_run_is_its_own_row_outside_the_matrix(tmp_path):
    """A `-gluon` stage (bench_deploy.py --gluon, kernel_forward gluon) is labelled as such, after the matrix's
    rows, and is never listed as missing."""
    runs = [run("wan1_3b", True, False, 1000.0, {"sparse": 400.0}),
            {**run("wan1_3b", True, False, 1000.0, {"sparse": 380.0}), "kernel_forward": "gluon"}]
    text = report.markdown(runs, "2026-12-02")
    assert text.index("| sparse | compiled | 1000 | 400 |") < text.index("| sparse | compiled + Gluon forward | 1000 "
                                                                       "| 380 |")
    assert "Gluon" not in text.split("Not measured:")[1]
    report.plot(runs, tmp_path / "e2e.png")
