"""fpsa_kernels: Hopper FP8 tile-sparse attention kernels (Triton), imported as `fpsa_kernels`.

The folder is `kernels/` in the repository and is mapped to the import name `fpsa_kernels` by pyproject's
package-dir (a top-level `kernels` would clash with the PyPI package of that name). The kernels themselves
arrive with the kernel issues; nothing is exported yet.
"""

__all__: list[str] = []
