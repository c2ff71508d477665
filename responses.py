"""How answers are written: orjson for Flask's JSON, the one error shape, and sessions spliced in as bytes.

Stored sessions are spliced into their envelopes as bytes: a 1 MB session is never parsed or serialized again on its way
out.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from flask import Response, request
from flask.json.provider import JSONProvider

from stores.base import DEFAULT_KEYS, Keys, Stored

LAST_ISO_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


class OrjsonProvider(JSONProvider):
    """Flask's JSON through orjson: several times faster than the standard library on 1 MB sessions."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(orjson.dumps(obj), mimetype="application/json")


def json_response(payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status, headers, mimetype="application/json")


def error_body(message: str) -> bytes:
    """Build the one error shape of every answer (docs/contract.md §1).

    It is also written by the development server's and gunicorn's own parsers when they refuse a request before the app
    sees it.
    """
    return orjson.dumps({"success": False, "error": message})


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status, headers, mimetype="application/json")


def session_response(found: Stored, partial: bool = False) -> Response:
    """Splice the stored bytes into the envelope: no parse, no re-serialization of a 1 MB session.

    The ETag names the timestamp, the store and the content hash of these very bytes (the storage layer has
    checked them against the summary, which records it), so polling with `If-None-Match` costs a 304 and no
    body, and any rewrite of the bytes changes it."""
    etag = f"{found.timestamp}-{found.storage}-{orjson.loads(found.summary)['etag']}"
    if request.if_none_match.contains_weak(etag):
        response = Response(status=304)
    else:
        body = b'{"success":true,"data":%s,"storage":"%s"%s}' % (
            found.body, found.storage.encode(), b',"partial":true' if partial else b"")
        response = Response(body, mimetype="application/json")
    response.set_etag(etag)
    response.headers["Cache-Control"] = "no-cache"
    return response


def list_item(found: Stored, keys: Keys = DEFAULT_KEYS) -> bytes:
    """The stored session object plus its `sessionKey` (in `keys`' space), spliced in before the closing brace."""
    return b'%s,"sessionKey":"%s"}' % (found.body.rstrip()[:-1], keys.session_key(found.timestamp).encode())


def summary_item(found: Stored, keys: Keys = DEFAULT_KEYS) -> bytes:
    """A summary record (whose body is the summary JSON) with its identity, ISO time and store."""
    return orjson.dumps({"timestamp": found.timestamp, "sessionKey": keys.session_key(found.timestamp),
                         **orjson.loads(found.body), "savedAt": saved_at(found.timestamp),
                         "storage": found.storage, "pinned": found.pinned})


def saved_at(timestamp: int) -> str | None:
    """Write the timestamp as ISO 8601 UTC, or None past the year 9999.

    Years past 9999 are what ISO's (and Python's) four-digit years cannot write: another tool may have stored a session
    under any number of ms, and one such session must not cut the list short.
    """
    if timestamp > LAST_ISO_MS:
        return None
    seconds, ms = divmod(timestamp, 1000)  # whole numbers: through a float, ms past 2**43 (2248) may be one off
    when = datetime.fromtimestamp(seconds, UTC).replace(microsecond=ms * 1000)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
