"""Prompt libraries: the captions a teacher is asked to draw.

A library is a txt file (one caption per line, blank lines skipped), a jsonl file (one object per line with a
`prompt`, `caption` or `text` field and an optional `id`; a bare JSON string also counts), a json file (a list of
prompts, or an object of id → prompt, prompts kept verbatim) or a parquet table (a `prompt`, `caption` or `text`
column and an optional `id` column). Without ids, a prompt's id is its position in the library. `toy` means the
toy world's captions (its training captions unless a stage asks for the held-out ones).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dmd.core.config import ToyConfig

log = logging.getLogger(__name__)

TEXT_FIELDS = ("prompt", "caption", "text")
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


class PromptLibraryError(ValueError):
    """A prompt library that cannot be used; the message names the file and the rows."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    row: int  # where it came from: line number (txt, jsonl) or row index (parquet), for messages


def load_prompt_library(
    source: str, toy: ToyConfig | None = None, setting: str = "generate.prompts", toy_split: str = "train"
) -> list[Prompt]:
    """The prompts of `source` ('toy' or a file), checked: not empty, no blank prompt, no duplicate id. `setting`
    is the key that named `source`, for messages; `toy_split` the toy world's captions 'toy' means."""
    if source == "toy":
        from dmd.toy.world import ToyWorld

        captions = ToyWorld(toy or ToyConfig()).captions(toy_split)
        return _checked("toy world", [Prompt(str(i), c, i) for i, c in enumerate(captions)])
    path = Path(source)
    if not path.is_file():
        raise PromptLibraryError(
            f"{setting}: {path} not found; give a {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]} file, or 'toy'"
        )
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise PromptLibraryError(
            f"{setting}: {path} has suffix '{path.suffix}'; use one of {', '.join(SUFFIXES)}"
        )
    return _checked(str(path), reader(path))


def positional(prompts: list[Prompt]) -> bool:
    """Whether the library gave no ids (each prompt's id is its position)."""
    return all(p.id == str(i) for i, p in enumerate(prompts))


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptLibraryError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save the file as UTF-8"
        ) from None


def _read_txt(path: Path) -> list[Prompt]:
    lines = _read_utf8(path).splitlines()
    rows = [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    return [Prompt(str(i), text, n) for i, (n, text) in enumerate(rows)]


def _read_jsonl(path: Path) -> list[Prompt]:
    prompts = []
    for n, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptLibraryError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict):
            raise PromptLibraryError(f"{path}:{n}: expected an object with a 'prompt' field or a string")
        field = next((f for f in TEXT_FIELDS if f in item), None)
        if field is None:
            raise PromptLibraryError(f"{path}:{n}: no caption; add one of the fields {list(TEXT_FIELDS)}")
        text = item[field]
        if not isinstance(text, str):
            raise PromptLibraryError(f"{path}:{n}: '{field}' must be a string, got {type(text).__name__}")
        pid = item.get("id", len(prompts))
        prompts.append(Prompt(str(pid), text.strip(), n))
    return prompts


def _read_json(path: Path) -> list[Prompt]:
    try:
        data = json.loads(_read_utf8(path))
    except json.JSONDecodeError as e:
        raise PromptLibraryError(f"{path}: not valid JSON ({e})") from None
    items = (
        list(data.items())
        if isinstance(data, dict)
        else list(enumerate(data))
        if isinstance(data, list)
        else []
    )
    if not items or not all(isinstance(text, str) and text for _, text in items):
        raise PromptLibraryError(
            f"{path}: expected a non-empty list of prompts or an object of name → prompt (strings), "
            f'e.g. {{"red": "a red square moving right slowly"}}'
        )
    return [Prompt(str(pid), text, n) for n, (pid, text) in enumerate(items)]


def _read_parquet(path: Path) -> list[Prompt]:
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise PromptLibraryError(f"{path}: not a readable parquet file ({e})") from None
    field = next((f for f in TEXT_FIELDS if f in frame.columns), None)
    if field is None:
        raise PromptLibraryError(
            f"{path}: no caption column; name one of {list(TEXT_FIELDS)} (columns: {list(frame.columns)})"
        )
    ids = frame["id"].tolist() if "id" in frame.columns else list(range(len(frame)))
    prompts = []
    for n, (pid, text) in enumerate(zip(ids, frame[field].tolist())):
        if not isinstance(text, str):
            raise PromptLibraryError(f"{path}: row {n}: '{field}' is {text!r}, not a string")
        prompts.append(Prompt(str(pid), text.strip(), n))
    return prompts


def _checked(source: str, prompts: list[Prompt]) -> list[Prompt]:
    if not prompts:
        raise PromptLibraryError(f"{source}: no prompts; add at least one caption")
    blank = [p.row for p in prompts if not p.text]
    if blank:
        raise PromptLibraryError(f"{source}: empty prompt at row(s) {_rows(blank)}; remove them or add text")
    rows_by_id: dict[str, list[int]] = defaultdict(list)
    for p in prompts:
        rows_by_id[p.id].append(p.row)
    dups = {pid: rows for pid, rows in rows_by_id.items() if len(rows) > 1}
    if dups:
        listed = "; ".join(f"id {pid!r} at rows {_rows(rows)}" for pid, rows in list(dups.items())[:10])
        raise PromptLibraryError(f"{source}: {len(dups)} duplicate id(s): {listed}; make every id unique")
    return prompts


def warn_truncated(
    source: str, prompts: list[Prompt], tokenizer, max_sequence_length: int, negative_prompt: str = ""
) -> list[Prompt]:
    """Warn (with the count and the rows) about prompts longer than the text encoder's window; return them."""
    from dmd.wan.loading import count_truncated

    over = [prompts[i] for i in count_truncated(tokenizer, [p.text for p in prompts], max_sequence_length)]
    if over:
        log.warning(
            "%s: %d of %d prompt(s) exceed model.max_sequence_length=%d tokens and will be truncated: row(s) %s",
            source,
            len(over),
            len(prompts),
            max_sequence_length,
            _rows([p.row for p in over]),
        )
    if negative_prompt and count_truncated(tokenizer, [negative_prompt], max_sequence_length):
        log.warning(
            "the negative prompt exceeds model.max_sequence_length=%d tokens and will be truncated",
            max_sequence_length,
        )
    return over


def _rows(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")
