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


def test_installed_versions_are_the_locked_ones():
    """scripts/install.sh installs under constraints.txt: every locked package that is installed has the locked version
    (a venv built before the lock changed is rebuilt by make, since the stamp depends on constraints.txt)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    checked, wrong = 0, []
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line or line[0] in "# ":
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue  # a line for another Python or platform
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            continue  # constraints only pin what gets installed (e.g. CUDA libraries on a CPU host)
        checked += 1
        if installed not in req.specifier:
            wrong.append(f"{req.name} {installed} (locked {req.specifier})")
    assert checked > 50, f"only {checked} locked packages are installed: is the lock read?"
    assert not wrong, "installed versions differ from constraints.txt: " + ", ".join(wrong)


def test_the_lock_pins_every_dependency_exactly():
    lines = [ln for ln in (REPO / "constraints.txt").read_text().splitlines() if ln and ln[0] not in "# "]
    assert lines and all("==" in ln for ln in lines), [ln for ln in lines if "==" not in ln]
    names = {ln.split("==")[0].lower() for ln in lines}
    for direct in ("lightning", "hydra-core", "av", "numpy", "diffusers", "transformers", "deepspeed", "pytest"):
        assert direct in names, direct
    assert "torch" not in names  # chosen per host by scripts/install.sh
