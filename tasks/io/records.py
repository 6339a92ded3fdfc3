"""Small records in the bucket, written and read in one way: JSON documents and JSON-lines logs.

    write_json(store, key, doc)      indented, sorted keys, no NaN, trailing newline
    read_json(store, key)            the document; `DataError` naming the object when unreadable
    write_jsonl(store, key, rows)    one JSON object per line
    read_jsonl(store, key)           the objects; `DataError` naming object and line when not JSON

Every module that keeps a JSON record in the bucket goes through these, so every such file has the
same shape and the same error messages.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from tasks.errors import DataError
from tasks.io.storage import Storage

JSON_TYPE = "application/json"
JSONL_TYPE = "application/jsonl"


def json_bytes(doc: Any) -> bytes:
    """`doc` as the project writes every JSON document: stable bytes for the same content."""
    return (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def write_json(store: Storage, key: str, doc: Any) -> str:
    """Write `doc` at `key` (atomically, as every storage write); returns its URI."""
    return store.write_bytes(key, json_bytes(doc), JSON_TYPE)


def read_json(store: Storage, key: str) -> Any:
    """The JSON document at `key`. `ObjectNotFound` passes through; bad JSON is a `DataError`."""
    raw = store.read_bytes(key)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{store.uri(key)}: not a readable JSON document ({exc})") from exc


def jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


def write_jsonl(store: Storage, key: str, rows: Iterable[dict[str, Any]]) -> str:
    return store.write_bytes(key, jsonl_bytes(rows), JSONL_TYPE)


def read_jsonl(store: Storage, key: str) -> list[dict[str, Any]]:
    """Records of a JSON-lines log; a line that is not a JSON object is an error naming it."""
    records = []
    text = store.read_bytes(key).decode("utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{store.uri(key)}, line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{store.uri(key)}, line {number}: not a JSON object")
        records.append(record)
    return records
