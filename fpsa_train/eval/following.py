"""Prompt following in the synthetic world: does the video show what its caption states?

The analyzer (`fpsa_train.eval.analyzer`) reads a scene back from pixels (background, and per shape its colour,
shape, direction and speed) and scores it against the scene `parse_caption` reads from the prompt, one bool per
attribute. A prompt outside the world's grammar cannot be checked: it is *not applicable* (counted apart, never as
wrong). A model's accuracy per attribute is the fraction of its applicable videos scored right; `all` is the
fraction with every attribute right.
"""

from __future__ import annotations

import numpy as np

ATTRIBUTES = ("colour", "shape", "direction", "speed", "background")
"""The analyzer's attributes (its `ATTRIBUTES`), for the results' columns when the analyzer cannot be imported."""


def analyzer_unavailable() -> str | None:
    """Why prompt following cannot be scored here (None: it can)."""
    try:
        from fpsa_train.data.synthetic_video import parse_caption  # noqa: F401
        from fpsa_train.eval.analyzer import ATTRIBUTES, analyze, score  # noqa: F401
    except ImportError as err:
        return f"the synthetic world's analyzer cannot be imported ({err})"
    return None


def attributes() -> tuple[str, ...]:
    """The attributes scored: the analyzer's, else the ones it is specified to have."""
    try:
        from fpsa_train.eval.analyzer import ATTRIBUTES as names
    except ImportError:
        return ATTRIBUTES
    return tuple(names)


def follow(prompt: str, video: np.ndarray) -> dict:
    """{applicable, expected, found, scores: {attribute: bool}} for one video, or {applicable: False, reason}."""
    from fpsa_train.data.synthetic_video import parse_caption
    from fpsa_train.eval.analyzer import analyze, score

    try:
        expected = parse_caption(prompt)
    except ValueError as err:
        return {"applicable": False, "reason": f"not a caption of the synthetic world ({err})"}
    found = analyze(video)
    scores = {k: bool(v) for k, v in score(expected, found).items()}
    return {"applicable": True, "expected": expected, "found": found, "scores": scores}


def accuracy(records: list[dict], names: tuple[str, ...]) -> dict:
    """{attribute: fraction right or None, all: ..., applicable: n, not_applicable: n} over `follow` records."""
    scored = [r["scores"] for r in records if r.get("applicable")]
    out: dict = {name: (float(np.mean([s[name] for s in scored if name in s])) if any(name in s for s in scored)
                        else None) for name in names}
    out["all"] = float(np.mean([all(s.values()) for s in scored])) if scored else None
    out["applicable"], out["not_applicable"] = len(scored), len(records) - len(scored)
    return out


def verdict(check: dict) -> str:
    """One line saying whether a video follows its prompt, from a `follow` record, e.g.
    "colour ✓ shape ✓ direction ✗ speed ✓ background ✓ (4/5); the video shows: a red circle moving up slowly on a
    dark blue background"."""
    if not check.get("applicable"):
        return f"not checked: {check.get('reason', 'not applicable')}"
    from fpsa_train.data.synthetic_video import caption

    scores = check["scores"]
    marks = " ".join(f"{name} {'✓' if ok else '✗'}" for name, ok in scores.items())
    found = check["found"]
    try:
        shown = caption(found) if found.get("shapes") else f"no shape on {found.get('background') or 'an unknown'} " \
                                                            "background"
    except (KeyError, TypeError):  # an attribute the analyzer could not name (None)
        shown = "; ".join(", ".join(f"{k} {v}" for k, v in s.items()) for s in found.get("shapes", [])) or "no shape"
    return f"{marks} ({sum(scores.values())}/{len(scores)}); the video shows: {shown}"
