"""What `send`, `tail` and `dlq` take from the command line: event files and topic names.

Each mistake is a UserError naming the file (with line and column for JSON that does not
parse) or the topic (with the names that exist), never a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

from .config import Topics
from .errors import USAGE, UserError

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
SHAPE = "one JSON object, a JSON array of objects, or JSON Lines (one object per line)"
KINDS = {str: "a string", int: "a number", float: "a number", bool: "true or false", list: "an array"}


def topic_names(topics: Topics) -> list[str]:
    """The short names of the daemon's topics, in their order: `handshake`, `tune-request`, ..."""
    return [field.name.replace("_", "-") for field in dataclasses.fields(topics)]


def resolve_topic(name: str, topics: Topics) -> str:
    """The full name of one of the daemon's topics, given by its short name (`tune-request`
    or `tune_request`), as `ings.tune-request`, or by its full name with INGS_TOPIC_PREFIX.

    Raises UserError (USAGE) for any other name, listing the short names: a misspelt topic
    would otherwise be created on the fly and its events read by nothing.
    """
    full = dataclasses.asdict(topics)
    if name in full.values():
        return str(name)
    short = name.removeprefix("ings.").replace("-", "_")
    if short in full:
        return str(full[short])
    known = topic_names(topics)
    close = difflib.get_close_matches(name.removeprefix("ings.").lower(), known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    prefix = topics.handshake.removesuffix("ings.handshake")
    full_form = f"ings.<name>, or {prefix}ings.<name> with INGS_TOPIC_PREFIX" if prefix else "ings.<name>"
    raise UserError(f"unknown topic {name!r}: {hint}use one of {', '.join(known)} (or {full_form})", USAGE)


# The topics the daemon reads: the ones `send` may write (train jobs are the ingest role's).
INPUTS = ("handshake", "interaction", "tune_request", "recall_request", "forget", "feedback")


def input_topic(name: str, topics: Topics) -> str:
    """`resolve_topic` for a topic to send to: only the daemon's inputs. Raises UserError
    (USAGE) for a topic the daemon writes, such as `persona` (an easy slip for `handshake`)."""
    full = resolve_topic(name, topics)
    inputs = {getattr(topics, field): field.replace("_", "-") for field in INPUTS}
    if full not in inputs:
        raise UserError(
            f"{full} is a topic the daemon writes, not one it reads: send to {', '.join(inputs.values())}", USAGE
        )
    return full


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of one file: a JSON object, a JSON array of objects, or JSON Lines (one
    object per line, blank lines skipped). A file named *.jsonl or *.ndjson, or one whose
    first line is JSON on its own, is read as JSON Lines when it is not one JSON document.

    Raises UserError (USAGE) naming the file when it is missing, a directory, unreadable or
    not UTF-8, when its JSON does not parse (with line and column; for JSON Lines, the line
    of the bad record), and when it holds anything but objects.
    """
    text = _read_text(path)
    try:
        whole = _loads(text)
    except (ValueError, RecursionError) as exc:
        if not _looks_like_json_lines(path, text):
            raise UserError(f"{path}: {_what_is_wrong(exc)}; the file must be {SHAPE}", USAGE) from None
        return _read_json_lines(path, text)
    if isinstance(whole, dict):
        return [whole]
    if not isinstance(whole, list):
        raise UserError(f"{path}: holds {_kind(whole)}, not {SHAPE}", USAGE)
    for i, item in enumerate(whole, 1):
        if not isinstance(item, dict):
            raise UserError(f"{path}: item {i} of the array is {_kind(item)}; each event must be a JSON object", USAGE)
    return whole


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; give the path of a JSON or JSON Lines file", USAGE) from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory; give the files in it, e.g. {path}/*.json", USAGE) from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read: {exc.strerror or exc}", USAGE) from None
    try:
        return data.decode("utf-8-sig")  # a byte order mark from a Windows editor is no error
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); save it as UTF-8", USAGE
        ) from None


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, JSON has neither; the daemon would dead-letter them.
    raise ValueError(f"{name} is not allowed (JSON has no NaN or Infinity)")


def _looks_like_json_lines(path: Path, text: str) -> bool:
    if path.suffix.lower() in JSON_LINES_SUFFIXES:
        return True
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        _loads(first)
    except (ValueError, RecursionError):
        return False
    return True


def _read_json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    # Only "\n" ends a line: str.splitlines() would also split at U+2028 and other
    # separators that JSON allows unescaped inside a string.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            event = _loads(line)
        except (ValueError, RecursionError) as exc:
            what = _what_is_wrong(exc, in_line=True)
            raise UserError(f"{path}: line {number}: {what}; each line must be one JSON object", USAGE) from None
        if not isinstance(event, dict):
            raise UserError(f"{path}: line {number} is {_kind(event)}; each line must be one JSON object", USAGE)
        events.append(event)
    return events


def _what_is_wrong(exc: BaseException, in_line: bool = False) -> str:
    if isinstance(exc, json.JSONDecodeError):
        where = f"column {exc.colno}" if in_line else f"line {exc.lineno} column {exc.colno}"
        return f"not valid JSON at {where}: {exc.msg}"
    if isinstance(exc, RecursionError):
        return "not readable JSON: nested too deeply"
    # Python's own advice for a number over 4,300 digits is for programmers, not for this file.
    return f"not valid JSON: {str(exc).split('; use sys.')[0]}"


def _kind(value: Any) -> str:
    return "null" if value is None else KINDS.get(type(value), type(value).__name__)
