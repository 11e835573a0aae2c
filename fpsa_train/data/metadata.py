"""Read a dataset's metadata file (one row per clip: a video path and its caption) into `Sample`s.

Why several formats and column names: every popular Wan trainer ships its own metadata layout, and users arrive
with whichever one they already have (reference/wan.md §5):

    DiffSynth    metadata.csv      columns `video,prompt` (JSON and JSONL also accepted)
    musubi       *.jsonl           `{"video_path", "caption"}`
    VideoX-Fun   metadata.json     `[{"file_path", "text", "type", "width", "height"}]`
    FastVideo    videos2caption.json  `[{"path", "cap"}]`

So we accept `.csv`, `.jsonl` and `.json`, take the first present of `VIDEO_COLUMNS` and of `CAPTION_COLUMNS`
(header names matched case-insensitively) and ignore every other column. Relative video paths are resolved
against the metadata file's folder, as all four trainers do, so a dataset folder can be moved as a whole.

Rows are not validated here beyond their shape: a missing value is an empty string, and the caller decides what
to skip (an empty caption, a video that does not decode), so one bad row never stops a preprocessing run.
"""

from __future__ import annotations

import csv
import errno
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

VIDEO_COLUMNS = ("video", "path", "file_path", "video_path")
CAPTION_COLUMNS = ("caption", "prompt", "text", "cap")
SUFFIXES = (".csv", ".jsonl", ".json")


@dataclass(frozen=True)
class Sample:
    """One metadata row."""

    index: int
    """Row number in the metadata file: 0-based, data rows only (no header, no blank JSONL lines)."""
    video: Path
    """Absolute path; relative values are resolved against the metadata file's folder. An empty value resolves to
    that folder itself, which `load_clip` reports as "missing"."""
    caption: str
    """As given, not stripped; may be empty (the caller skips such rows with reason "empty_caption")."""


class MetadataError(ValueError):
    """The metadata file cannot be read as a table of (video, caption) rows."""


def read_metadata(path: str | Path) -> list[Sample]:
    """All rows of a `.csv`, `.jsonl` or `.json` metadata file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "metadata file not found", str(path))
    suffix = path.suffix.lower()
    if suffix == ".csv":
        columns, rows = _read_csv(path)
    elif suffix == ".jsonl":
        columns, rows = _read_jsonl(path)
    elif suffix == ".json":
        columns, rows = _read_json(path)
    else:
        raise MetadataError(f"{path}: unknown metadata suffix {path.suffix!r}; accepted: {', '.join(SUFFIXES)}")
    if not rows and suffix != ".csv":
        return []  # an empty JSON list / JSONL file has no columns to check
    video_key = _pick_column(columns, VIDEO_COLUMNS)
    caption_key = _pick_column(columns, CAPTION_COLUMNS)
    if video_key is None or caption_key is None:
        missing = [kind for kind, key in (("video", video_key), ("caption", caption_key)) if key is None]
        raise MetadataError(
            f"{path}: no {' or '.join(missing)} column; found columns {list(columns)}; "
            f"accepted (case-insensitive) video: {list(VIDEO_COLUMNS)}, caption: {list(CAPTION_COLUMNS)}"
        )
    folder = path.parent.absolute()
    return [
        Sample(index=i, video=_resolve(folder, _text(row.get(video_key)).strip()), caption=_text(row.get(caption_key)))
        for i, row in enumerate(rows)
    ]


def _read_csv(path: Path) -> tuple[list[str], list[Mapping]]:
    # utf-8-sig: identical to utf-8 but drops the byte-order mark that spreadsheet exports put before the header.
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise MetadataError(f"{path}: empty CSV file; expected a header row, e.g. 'video,caption'")
        return list(reader.fieldnames), list(reader)


def _read_jsonl(path: Path) -> tuple[list[str], list[Mapping]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetadataError(f"{path}: line {lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise MetadataError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return _union_keys(rows), rows


def _read_json(path: Path) -> tuple[list[str], list[Mapping]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MetadataError(f"{path}: line {e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(data, list):
        raise MetadataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise MetadataError(f"{path}: item {i}: expected a JSON object, got {type(row).__name__}")
    return _union_keys(data), data


def _union_keys(rows: Iterable[Mapping]) -> list[str]:
    """Keys of all rows in order of first appearance (JSON rows need not share one schema)."""
    return list(dict.fromkeys(k for row in rows for k in row))


def _pick_column(columns: Iterable[str | None], accepted: tuple[str, ...]) -> str | None:
    """The actual name of the first accepted column present, matching case-insensitively."""
    by_lower: dict[str, str] = {}
    for name in columns:
        if isinstance(name, str):
            by_lower.setdefault(name.strip().lower(), name)
    return next((by_lower[a] for a in accepted if a in by_lower), None)


def _text(value) -> str:
    return "" if value is None else str(value)


def _resolve(folder: Path, value: str) -> Path:
    video = Path(value).expanduser()
    return Path(os.path.normpath(video if video.is_absolute() else folder / video))
