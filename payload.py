"""Turn a save request's body into a `Draft`, or into one clear sentence saying what is wrong with it.

Parsing with orjson also enforces what a browser's `JSON.parse` needs to read the session back: it rejects
`NaN`/`Infinity`, lone surrogates, invalid UTF-8 and nesting deeper than 1024; serialization rejects nesting
deeper than 254. Integers beyond 64 bits come back as the same JavaScript number (e.g. `1e+20`).
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


def new_save_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Draft:
    """A validated session, serialized up to its timestamp (`timestamp` None: the service assigns it), its
    summary record (JSON, see `payload.summarize`) that list views and ETags read instead of the body, and the
    id of this one save, by which Redis recognizes a save it applied but could not confirm."""

    head: bytes
    timestamp: int | None
    summary: bytes
    save_id: str = field(default_factory=new_save_id)

    def render(self, timestamp: int) -> bytes:
        return b"%s%d}" % (self.head, timestamp)


def head_of(body: bytes, timestamp: int) -> bytes:
    """The `Draft.head` of a stored body: every stored body ends in `<timestamp>}`."""
    return body[: -len(str(timestamp)) - 1]


class PayloadError(ValueError):
    """The body is not a session this service can store; the message is the 400 error text."""


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise PayloadError(f"The request body is not valid JSON: {error}.") from None


def parse_session(body: bytes, now: int) -> Draft:
    return draft_from(parse_json(body), now)


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
    try:
        serialized = orjson.dumps(session)
    except orjson.JSONEncodeError:
        raise PayloadError("The session is nested too deeply (at most 254 levels).") from None
    head = serialized[:-1] + b',"timestamp":'
    return Draft(head, timestamp, summarize(session, len(head) + len(str(timestamp or now)) + 1, head))


def content_hash(data: bytes | memoryview) -> str:
    """The hash behind ETags and the check that stored bytes are still the ones the service wrote: xxh3-64,
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
