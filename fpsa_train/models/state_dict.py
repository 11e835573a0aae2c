"""Key renames between the original Wan checkpoint format and diffusers' `WanTransformer3DModel`.

Our `WanModel` keeps the original module names, so its state dict *is* the original format; the published
`-Diffusers` repos and everything built on diffusers use other names. This module is the one seam where the two
meet: loading auto-detects and converts to ours, export converts ours to whichever the consumer wants. Keeping it
a pure rename of keys (values passed through untouched, no copies) means a 14B conversion costs nothing, and
keeping the mapping as one table of prefix pairs means the two directions cannot drift apart.

Keys the table does not know pass through unchanged, so a strict load afterwards reports them as unexpected
instead of them vanishing here. T2V only: the I2V image keys (`img_emb`, `k_img`, ...) are such unknown keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

V = TypeVar("V")

KEY_FORMATS = ("original", "diffusers")

# (original, diffusers) prefixes of top-level modules. A pair matches a key equal to the prefix or starting
# with the prefix plus "." (so "head.head" never matches "head.header").
TOP_LEVEL_PAIRS: tuple[tuple[str, str], ...] = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
)

# (original, diffusers) prefixes inside `blocks.N.`. The norm2/norm3 swap is deliberate (reference/wan.md §3):
# the original runs norm1, norm3 (cross-attention, affine), norm2 (ffn); diffusers numbers them in that order.
BLOCK_PAIRS: tuple[tuple[str, str], ...] = (
    ("modulation", "scale_shift_table"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("norm1", "norm1"),
    ("norm3", "norm2"),
    ("norm2", "norm3"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
)

# Wrappers other tools put around the DiT's keys (ComfyUI, LDM-style and Lightning checkpoints), longest first.
WRAPPER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

_BLOCK_KEY = re.compile(r"^(blocks\.\d+\.)(.*)$")

# Prefixes only one of the two formats has; used to tell them apart.
_MARKERS = {
    "original": ("text_embedding.", "time_embedding.", "time_projection.", "head.head.", "head.modulation"),
    "diffusers": ("condition_embedder.", "proj_out.", "scale_shift_table"),
}
_BLOCK_MARKERS = {
    "original": ("self_attn.", "cross_attn.", "modulation"),
    "diffusers": ("attn1.", "attn2.", "scale_shift_table"),
}


def _rename(key: str, pairs: Iterable[tuple[str, str]]) -> str:
    """Replace the longest matching source prefix of `key` by its target; unknown keys come back unchanged."""
    best = None
    for src, dst in pairs:
        if (key == src or key.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, dst)
    return key if best is None else best[1] + key[len(best[0]):]


# Both directions from the one table: target format → (top-level pairs, per-block pairs) as (source, target).
_DIRECTIONS = {
    "diffusers": (TOP_LEVEL_PAIRS, BLOCK_PAIRS),
    "original": (tuple((d, o) for o, d in TOP_LEVEL_PAIRS), tuple((d, o) for o, d in BLOCK_PAIRS)),
}


def _rename_key(key: str, to: str) -> str:
    top, block = _DIRECTIONS[to]
    m = _BLOCK_KEY.match(key)  # blocks.N.<rest>: rename <rest> with the per-block pairs
    return m.group(1) + _rename(m.group(2), block) if m else _rename(key, top)


def _rename_all(sd: Mapping[str, V], to: str) -> dict[str, V]:
    out: dict[str, V] = {}
    for key, value in sd.items():
        new = _rename_key(key, to)
        if new in out:
            raise ValueError(f"keys collide after renaming to the {to} format: two keys become {new!r}")
        out[new] = value
    return out


def to_diffusers(sd: Mapping[str, V]) -> dict[str, V]:
    """Original Wan keys → diffusers `WanTransformer3DModel` keys; values passed through as they are."""
    return _rename_all(sd, "diffusers")


def from_diffusers(sd: Mapping[str, V]) -> dict[str, V]:
    """Diffusers `WanTransformer3DModel` keys → original Wan keys (our `WanModel`); values passed through."""
    return _rename_all(sd, "original")


def wrapper_prefix(keys: Iterable[str]) -> str:
    """The entry of `WRAPPER_PREFIXES` that *every* key starts with, or "" (a partial prefix is left alone)."""
    keys = list(keys)
    for prefix in WRAPPER_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def strip_wrapper_prefix(sd: Mapping[str, V]) -> dict[str, V]:
    """Drop a wrapper prefix (`model.diffusion_model.`, `diffusion_model.`, `model.`) shared by every key."""
    n = len(wrapper_prefix(sd))
    return {k[n:]: v for k, v in sd.items()}


def detect_key_format(keys: Iterable[str]) -> str:
    """The key format of a state dict, "original" or "diffusers", from prefixes only one format has.

    A wrapper prefix shared by every key (see `WRAPPER_PREFIXES`) is ignored.

    Raises ValueError when neither format is recognisable, or both are present (a mixed state dict).
    """
    keys = list(keys)
    n = len(wrapper_prefix(keys))
    found = {fmt: 0 for fmt in KEY_FORMATS}
    for key in keys:
        key = key[n:]
        m = _BLOCK_KEY.match(key)
        rest, markers = (m.group(2), _BLOCK_MARKERS) if m else (key, _MARKERS)
        for fmt in KEY_FORMATS:
            found[fmt] += any(rest == p or rest.startswith(p) for p in markers[fmt])
    if found["original"] and found["diffusers"]:
        raise ValueError(f"state dict mixes original Wan keys ({found['original']}) and diffusers keys "
                         f"({found['diffusers']}); e.g. {keys[:4]}")
    if not (found["original"] or found["diffusers"]):
        raise ValueError(f"cannot tell the key format of this state dict ({len(keys)} keys, e.g. {keys[:5]}): "
                         f"expected original Wan keys (blocks.N.self_attn.q.weight, head.head.weight) or "
                         f"diffusers WanTransformer3DModel keys (blocks.N.attn1.to_q.weight, proj_out.weight)")
    return "original" if found["original"] else "diffusers"


def convert_state_dict(sd: Mapping[str, V], key_format: str, source_format: str = "auto") -> dict[str, V]:
    """Strip a wrapper prefix, detect the source format (unless given) and rename to `key_format`."""
    if key_format not in KEY_FORMATS:
        raise ValueError(f"key_format={key_format!r}: expected one of {KEY_FORMATS}")
    if source_format not in (*KEY_FORMATS, "auto"):
        raise ValueError(f"source_format={source_format!r}: expected 'auto' or one of {KEY_FORMATS}")
    sd = strip_wrapper_prefix(sd)
    source = detect_key_format(sd) if source_format == "auto" else source_format
    if source == key_format:
        return dict(sd)
    return to_diffusers(sd) if key_format == "diffusers" else from_diffusers(sd)
