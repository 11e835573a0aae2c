"""The VBench hook says exactly what is missing, and runs only the dimensions whose weights are already here."""

from __future__ import annotations

import sys
import types

from fpsa_train.eval.vbench import CUSTOM_INPUT_DIMENSIONS, vbench_plan


def test_without_the_package_nothing_runs_and_the_reason_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vbench", None)  # import fails as if not installed
    plan = vbench_plan()
    assert not plan["available"] and plan["dimensions"] == []
    assert "the vbench package is not installed" in plan["reason"]


def test_dimensions_whose_weights_are_missing_are_skipped_and_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vbench", types.ModuleType("vbench"))
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path))
    (tmp_path / "clip_model").mkdir()
    (tmp_path / "clip_model" / "ViT-B-32.pt").write_bytes(b"weights")
    plan = vbench_plan()
    assert plan["dimensions"] == ["background_consistency", "temporal_flickering"]  # the latter needs no weights
    assert set(plan["missing"]) == set(CUSTOM_INPUT_DIMENSIONS) - set(plan["dimensions"])
    assert str(tmp_path / "raft_model/models/raft-things.pth") in plan["reason"]
    assert plan["missing"]["aesthetic_quality"] == [str(tmp_path / "clip_model/ViT-L-14.pt"),
                                                    str(tmp_path / "aesthetic_model/emb_reader/"
                                                        "sa_0_4_vit_l_14_linear.pth")]
