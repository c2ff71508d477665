"""Turn a save request's body into a `Draft`, or into one clear sentence saying what is wrong with it.

Parsing with orjson also enforces what a browser's `JSON.parse` needs to read the session back: it rejects
`NaN`/`Infinity`, lone surrogates, invalid UTF-8 and nesting deeper than 1024; serialization rejects nesting
deeper than 254. Integers beyond 64 bits come back as the same JavaScript number (e.g. `1e+20`).

Before any parse, `check_value_count` bounds the work a body may cause: parsed, every JSON value becomes a
Python object of 50-250 bytes, so a body of tiny containers (`[[0],[0],...]`) costs ~35 times its size in
memory, where a real session costs ~7 times.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import orjson
import xxhash

# Field -> (type, how the error message describes it). Every other field is stored verbatim.
REQUIRED: dict[str, tuple[type, str]] = {
    "scriptText": (str, "a non-empty string"),
    "episodeContext": (str, "a string"),
    "storyUuid": (str, "a string"),
    "analyzedEpisode": (dict, "an object"),
}
MAX_FUTURE_MS = 86_400_000  # a client timestamp may run at most one day ahead of this server's clock
BYTES_PER_VALUE = 16  # a body may hold one JSON value per 16 bytes of MAX_CONTENT_LENGTH (real sessions: ~1 per 35)
MIN_MAX_VALUES = 100_000  # ... and never fewer than this many, whatever MAX_CONTENT_LENGTH (~10 MB at worst)
_NOT_STRUCTURAL = bytes(range(256)).translate(None, b"[{,:")  # `translate` deletes these: the 4 bytes are kept
_NOT_STRUCTURAL_OR_QUOTE = bytes(range(256)).translate(None, b'[{,:"')
_CHUNK = 1 << 18  # the counts work through a body in pieces of this size, so their memory stays small


def new_save_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Draft:
    """A session ready to store: its bytes, summary and save id.

    A validated session, serialized up to its timestamp (`timestamp` None: the service assigns it), its
    summary record (JSON, see `payload.summarize`) that list views and ETags read instead of the body, and the
    id of this one save, by which Redis recognizes a save it applied but could not confirm. A store given the
    same id and bytes again without a timestamp answers with the timestamp it gave them (a retry, e.g. of an
    import, whose id comes from its content): a new save needs a new id."""

    head: bytes | memoryview
    timestamp: int | None
    summary: bytes
    save_id: str = field(default_factory=new_save_id)
    # (timestamp, the bytes under it) as serialized, `head` a view of them: rendering for that timestamp, or
    # staging them in Redis (which rewrites the digits in place), copies nothing.
    serialized: tuple[int, bytes] | None = field(default=None, compare=False, repr=False)

    def render(self, timestamp: int) -> bytes:
        if self.serialized is not None and self.serialized[0] == timestamp:
            return self.serialized[1]
        return b"%b%d}" % (self.head, timestamp)

    def rendered(self, fallback: int) -> tuple[int, bytes]:
        """The session's bytes under some timestamp, and which: as serialized (no copy), else under `fallback`."""
        return self.serialized or (fallback, self.render(fallback))


def head_of(body: bytes, timestamp: int) -> memoryview:
    """Return the part of a stored body that precedes its timestamp.

    The `Draft.head` of a stored body, without copying it: the bytes before the `<timestamp>}` the service
    appends to every session it stores (`Draft.render`). A body that does not end that way (another tool wrote
    it) is all head: what the recorded content hash covers is then all of it."""
    tail = b"%d}" % timestamp
    return memoryview(body)[: -len(tail)] if body.endswith(tail) else memoryview(body)


class PayloadError(ValueError):
    """The body is not a session this service can store; the message is the error text, `status` its code."""

    status = 400


class TooManyValues(PayloadError):
    """The body holds more JSON values than it may.

    The body holds more JSON values than its limit (`value_limit`): refused unparsed, like a body over the
    byte limit."""

    status = 413


def value_limit(max_content_length: int) -> int:
    """The most JSON values a body may hold.

    The most JSON values (as `count_values` counts them) a body may hold: one per `BYTES_PER_VALUE` bytes of
    the body limit, so a body of real sessions as large as the limit fits twice over, and the worst body that
    is accepted costs a worker little more than a real session of that size (475 vs 370 MB at 50 MB)."""
    return max(MIN_MAX_VALUES, max_content_length // BYTES_PER_VALUE)


DEFAULT_MAX_VALUES = value_limit(50 * 1024 * 1024)  # under the default MAX_CONTENT_LENGTH: 3,276,800


def check_value_count(body: bytes, limit: int) -> None:
    """Raise `TooManyValues` when `body` holds more than `limit` JSON values, without parsing it.

    A body of at most `limit` bytes cannot (each counted value is one byte of it): nothing to do, which covers
    every real session up to 3 MB under the default limit. Beyond that, `translate` counts the structural
    bytes, inside strings too: an over-estimate (exact without strings), low enough for real sessions. Only
    when it is above `limit` does `count_values` count outside strings (a session may carry JSON in a string)."""
    if len(body) <= limit:
        return
    pieces = range(0, len(body), _CHUNK)  # in pieces: a bomb of brackets would otherwise be copied whole
    if sum(len(body[i : i + _CHUNK].translate(None, _NOT_STRUCTURAL)) for i in pieces) <= limit:
        return
    if count_values(body, stop_above=limit) > limit:
        raise TooManyValues(f"The request body has more than {limit:,} JSON values, the most accepted (one per "
                            f"{BYTES_PER_VALUE} bytes of MAX_CONTENT_LENGTH); a real session has far fewer.")


def count_values(body: bytes, stop_above: int | None = None, chunk: int = _CHUNK) -> int:
    r"""Count the JSON values in a body without parsing it.

    The `[`, `{`, `,` and `:` outside strings: every container, and every element or member but the first
    of its container (roughly the values plus the keys: 85,000 in a real 3 MB session). Exact for valid JSON;
    for invalid JSON exact up to the first error, where the parser stops as well.

    C-speed passes over pieces of `chunk` bytes, none ending in a backslash (an escape stays whole): with `\\`
    and then `\"` removed, every `"` left opens or closes a string; `translate` keeps only the structural
    bytes and the quotes, adjacent quotes (an empty string, or two strings with nothing structural between)
    drop out, and the runs between quotes alternate outside and inside strings. Past `stop_above` it stops, so
    a body of short strings costs at most about that many runs."""
    count = inside = start = 0
    size = len(body)
    while start < size and (stop_above is None or count <= stop_above):
        end = min(start + chunk, size)
        while end < size and body[end - 1] == 0x5C:  # a backslash: take the character it escapes as well
            end += 1
        piece = body[start:end]
        start = end
        if b"\\\\" in piece:
            piece = piece.replace(b"\\\\", b"")
        if b'\\"' in piece:
            piece = piece.replace(b'\\"', b"")
        kept = piece.translate(None, _NOT_STRUCTURAL_OR_QUOTE)
        if b'""' in kept:
            kept = kept.replace(b'""', b"")
        runs = kept.split(b'"')
        count += len(b"".join(runs[inside::2]))
        inside = (inside + len(runs) - 1) & 1
    return count


def parse_json(body: bytes, max_values: int = DEFAULT_MAX_VALUES) -> Any:
    check_value_count(body, max_values)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise PayloadError(f"The request body is not valid JSON: {error}.") from None


def parse_session(body: bytes, now: int, max_values: int = DEFAULT_MAX_VALUES) -> Draft:
    return draft_from(parse_json(body, max_values), now)


def draft_from(session: Any, now: int) -> Draft:
    """Validate one session object (as `save` and each item of `import` receive it) and serialize it."""
    if not isinstance(session, dict):
        raise PayloadError(f"A session must be a JSON object, not {_json_type(session)}.")
    problems = [_field_problem(session, name, kind, wanted) for name, (kind, wanted) in REQUIRED.items()]
    problems.append(_timestamp_problem(session.get("timestamp"), now))
    problems = [p for p in problems if p]
    if problems:
        raise PayloadError(f"Invalid session data: {'; '.join(problems)}.")
    session = dict(session)  # the caller's object stays as it was
    timestamp = session.pop("timestamp", None)
    session["timestamp"] = placeholder = now if timestamp is None else timestamp  # last, as `render` puts it
    try:
        serialized = orjson.dumps(session)  # the body, once: `head` is a view of it, not a copy
    except orjson.JSONEncodeError:
        raise PayloadError("The session is nested too deeply (at most 254 levels).") from None
    head = memoryview(serialized)[: -len(b"%d}" % placeholder)]
    return Draft(head, timestamp, summarize(session, len(serialized), head), serialized=(placeholder, serialized))


def content_hash(data: bytes | memoryview) -> str:
    """Hash stored bytes for ETags and integrity checks.

    The hash behind ETags and the check that stored bytes are still the ones the service wrote: xxh3-64,
    0.02 ms for 1 MB here (zlib's crc32 took 0.3 ms), so every read can afford it."""
    return xxhash.xxh3_64_hexdigest(data)


def summarize(session: dict[str, Any], size: int, head: bytes | memoryview) -> bytes:
    """The small record list views show instead of the session, and the content hash behind its ETag."""
    episode = session.get("analyzedEpisode")
    episode = episode if isinstance(episode, dict) else {}
    scenes = episode.get("scenes")
    scenes = scenes if isinstance(scenes, list) else []
    beats = sum(len(s["beats"]) for s in scenes if isinstance(s, dict) and isinstance(s.get("beats"), list))
    number, title = episode.get("episodeNumber"), episode.get("title")
    return orjson.dumps({
        "storyUuid": session.get("storyUuid") if isinstance(session.get("storyUuid"), str) else None,
        "episodeNumber": number if isinstance(number, int | float | str) and not isinstance(number, bool) else None,
        "title": title if isinstance(title, str) else None,
        "sceneCount": len(scenes),
        "beatCount": beats,
        "sizeBytes": size,
        "etag": content_hash(head),
    })


def _field_problem(session: dict[str, Any], name: str, kind: type, wanted: str) -> str | None:
    if name not in session:
        return f"{name} is missing"
    value = session[name]
    if not isinstance(value, kind) or (name == "scriptText" and not value):
        return f"{name} must be {wanted}, got {_json_type(value)}"
    return None


def _timestamp_problem(value: Any, now: int) -> str | None:
    """None (absent or null: the service assigns one) or a valid client timestamp pass."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        shown = orjson.dumps(value)[:40].decode(errors="replace")
        return f"timestamp must be a positive integer (ms since epoch), got {shown}"
    if value > now + MAX_FUTURE_MS:
        return "timestamp is more than one day in the future"
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, int | float):
        return "a number"
    return "an array" if isinstance(value, list) else "an object"
