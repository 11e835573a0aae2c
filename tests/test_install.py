"""The editable install maps kernels/ to the import name fpsa_kernels."""

from pathlib import Path

from tests.conftest import REPO


def test_fpsa_kernels_is_the_kernels_folder():
    import fpsa_kernels

    assert Path(fpsa_kernels.__file__).resolve().parent == REPO / "kernels"
    assert isinstance(fpsa_kernels.__all__, list)


def test_fpsa_train_is_the_source_tree():
    import fpsa_train

    assert Path(fpsa_train.__file__).resolve().parent == REPO / "fpsa_train"
