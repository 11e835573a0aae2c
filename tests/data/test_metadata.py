"""read_metadata: the CSV / JSONL / JSON layouts of popular trainers, column aliases, paths, and error messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fpsa_train.data.metadata import CAPTION_COLUMNS, VIDEO_COLUMNS, MetadataError, Sample, read_metadata


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write `rows` in the format named by `path`'s suffix."""
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
@pytest.mark.parametrize("video_col, caption_col", list(zip(VIDEO_COLUMNS, CAPTION_COLUMNS)))
def test_formats_and_aliases(tmp_path, suffix, video_col, caption_col):
    absolute = tmp_path / "elsewhere" / "b.mp4"
    rows = [
        {video_col: "clips/a.mp4", caption_col: "a cat, jumping", "width": 832},
        {video_col: str(absolute), caption_col: "ünïcode «quotes»", "width": 480},
    ]
    meta = write_rows(tmp_path / f"metadata{suffix}", rows)
    assert read_metadata(meta) == [
        Sample(0, tmp_path / "clips" / "a.mp4", "a cat, jumping"),
        Sample(1, absolute, "ünïcode «quotes»"),
    ]


def test_relative_paths_resolve_against_the_metadata_folder(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write_rows(tmp_path / "data" / "m.jsonl", [{"video_path": "../v/x.mp4", "caption": "c"}])
    monkeypatch.chdir(tmp_path / "data")
    (sample,) = read_metadata("m.jsonl")  # a relative metadata path, too
    assert sample.video == tmp_path / "v" / "x.mp4"
    assert sample.video.is_absolute()


def test_header_match_is_case_insensitive_and_first_alias_wins(tmp_path):
    meta = tmp_path / "m.csv"
    meta.write_text("File_Path,Video,TEXT,Prompt\nf.mp4,v.mp4,t,p\n", encoding="utf-8")
    assert read_metadata(meta) == [Sample(0, tmp_path / "v.mp4", "p")]


def test_missing_values_are_empty_strings(tmp_path):
    csv_meta = tmp_path / "m.csv"
    csv_meta.write_text("video,caption\na.mp4\nb.mp4,\n", encoding="utf-8")  # a short row and an empty field
    assert [s.caption for s in read_metadata(csv_meta)] == ["", ""]
    json_meta = write_rows(tmp_path / "m.json", [{"path": "a.mp4", "cap": None}, {"path": "b.mp4"}])
    assert [s.caption for s in read_metadata(json_meta)] == ["", ""]


def test_jsonl_blank_lines_are_ignored_and_indices_count_rows(tmp_path):
    meta = tmp_path / "m.jsonl"
    meta.write_text('\n{"video": "a.mp4", "prompt": "A"}\n   \n{"video": "b.mp4", "prompt": "B"}\n\n', encoding="utf-8")
    assert [(s.index, s.video.name, s.caption) for s in read_metadata(meta)] == [(0, "a.mp4", "A"), (1, "b.mp4", "B")]


def test_csv_with_byte_order_mark(tmp_path):
    meta = tmp_path / "m.csv"
    meta.write_bytes("\ufeffvideo,prompt\na.mp4,hi\n".encode())
    assert read_metadata(meta) == [Sample(0, tmp_path / "a.mp4", "hi")]


def test_missing_column_names_found_and_accepted(tmp_path):
    meta = write_rows(tmp_path / "m.csv", [{"clip": "a.mp4", "caption": "c", "fps": 24}])
    with pytest.raises(MetadataError) as e:
        read_metadata(meta)
    msg = str(e.value)
    assert str(meta) in msg and "no video column" in msg
    assert "'clip'" in msg and "'fps'" in msg  # what it found
    assert all(repr(name) in msg for name in VIDEO_COLUMNS + CAPTION_COLUMNS)  # what it accepts


def test_missing_caption_column(tmp_path):
    meta = write_rows(tmp_path / "m.json", [{"file_path": "a.mp4", "type": "video"}])
    with pytest.raises(MetadataError, match="no caption column"):
        read_metadata(meta)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("m.jsonl", '{"video": "a.mp4", "caption": "ok"}\n\n{"video": "b.mp4", "caption": \n',
     r"m\.jsonl: line 3: malformed JSON"),
    ("m.json", '[\n {"video": "a.mp4", "caption": "ok"},\n {"video": }\n]\n', r"m\.json: line 3: malformed JSON"),
    ("m.json", '{"video": "a.mp4", "caption": "c"}', "expected a JSON list"),
    ("m.tsv", "video\tcaption\n", r"\.csv, \.jsonl, \.json"),  # an unknown suffix lists the accepted ones
], ids=["bad-jsonl-line", "bad-json", "json-not-a-list", "unknown-suffix"])
def test_malformed_metadata_is_named(tmp_path, name, text, message):
    meta = tmp_path / name
    meta.write_text(text, encoding="utf-8")
    with pytest.raises(MetadataError, match=message):
        read_metadata(meta)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_metadata(tmp_path / "nope.csv")


def test_empty_files(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n", encoding="utf-8")
    assert read_metadata(tmp_path / "m.jsonl") == []
    (tmp_path / "h.csv").write_text("video,caption\n", encoding="utf-8")
    assert read_metadata(tmp_path / "h.csv") == []
    (tmp_path / "e.csv").write_text("", encoding="utf-8")
    with pytest.raises(MetadataError, match="header"):
        read_metadata(tmp_path / "e.csv")
