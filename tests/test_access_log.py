"""The access line cannot be forged: whatever a client puts in `X-Forwarded-For`, each request's line has the
same seven fields (request id, method, path, status, bytes, milliseconds, address), and the address is a valid
IP address or `-`.

With TRUSTED_PROXY_HOPS=1 the service believes the last `X-Forwarded-For` entry; a client that reaches it
directly (not through the proxy) chooses that entry. The real-process tests are such a client: gunicorn (and
`python app.py`) with TRUSTED_PROXY_HOPS=1 on 127.0.0.1, asked directly with forged headers."""

from __future__ import annotations

import logging
import re
import socket

import pytest

from servers import ServiceProcess, wait_for

FIELDS = re.compile(r"(?P<id>[A-Za-z0-9._-]{1,64}) (?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d{3}) "
                    r"(?P<bytes>\d+|None) (?P<ms>\d+\.\dms) (?P<address>\S+)")
PREFIX = "storyart.access: "

# (request id, X-Forwarded-For as sent, the address the line must name): the last entry is what
# TRUSTED_PROXY_HOPS=1 believes.
FORGED = [
    ("forged-fields", "1.2.3.4 GET /fake 200 1 0.1ms 5.6.7.8", "-"),
    ("forged-fields-in-scope", "fe80::1%eth0 GET /fake 200 1 0.1ms 5.6.7.8", "-"),  # ipaddress takes this one
    ("forged-scope-no-slash", "fe80::1%eth0 GET fake 200 1 0.1ms 5.6.7.8", "-"),  # ... and this one
    ("tab-inside", "1.2.3.4\tGET\t/fake", "-"),
    ("line-breaks-8bit", "1.2.3.4\x85\xa0GET /fake\x9b2J", "-"),  # NEL and CSI as latin-1: str.splitlines splits
    ("very-long", "1.2.3.4 " + "A" * 7000 + " 5.6.7.8", "-"),
    ("long-digits", "1" * 7000, "-"),
    ("list-last-garbage", "203.0.113.7, 198.51.100.1 GET /fake 200", "-"),
    ("list-last-quoted", '203.0.113.7, "198.51.100.1 GET /fake, 200"', "-"),  # ProxyFix unquotes list items
    ("list-last-empty", "203.0.113.7, ", "203.0.113.7"),  # ProxyFix skips empty items
    ("only-commas", ",,,", "127.0.0.1"),  # no item: fewer than the trusted hops, so ProxyFix keeps the peer
    ("address-with-port", "203.0.113.7:8080", "-"),
    ("leading-zeros", "010.1.2.3", "-"),
    ("half-bracket", "[2001:db8::1", "-"),
    ("valid-v4", "203.0.113.7", "203.0.113.7"),
    ("valid-v6", "2001:db8::1", "2001:db8::1"),
    ("valid-v6-bracketed", "[2001:db8::1]", "2001:db8::1"),
    ("valid-v4-mapped", "::ffff:203.0.113.7", "::ffff:203.0.113.7"),
    ("list-last-valid", "garbage GET /fake, 2001:db8::1", "2001:db8::1"),
    ("scoped-interface", "fe80::1%eth0", "fe80::1%eth0"),
]


def send(port: int, request_id: str, forwarded_for: bytes) -> int:
    """One GET /health with these raw `X-Forwarded-For` bytes (no client library in between); the status."""
    head = (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Request-ID: "
            + request_id.encode() + b"\r\nX-Forwarded-For: " + forwarded_for + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def access_lines(log: str) -> list[str]:
    """The message of every access line, split the strictest way (str.splitlines also breaks on \\x0b, \\x0c,
    \\x1c-\\x1e, \\x85, \\u2028...), so a line break smuggled into a field shows as a broken line."""
    return [line.split(PREFIX, 1)[1] for line in log.splitlines() if PREFIX in line]


def check_lines(log: str, expected: dict[str, str]) -> None:
    lines = access_lines(log)
    malformed = [line for line in lines if not FIELDS.fullmatch(line)]
    assert not malformed, malformed  # every access line, forged or not, is exactly the seven fields
    by_id: dict[str, list[dict[str, str]]] = {}
    for line in lines:
        fields = FIELDS.fullmatch(line).groupdict()
        by_id.setdefault(fields["id"], []).append(fields)
    for request_id, address in expected.items():
        assert len(by_id.get(request_id, [])) == 1, (request_id, by_id.get(request_id))
        fields = by_id[request_id][0]
        assert (fields["method"], fields["path"], fields["status"]) == ("GET", "/health", "200"), fields
        assert fields["address"] == address, (request_id, fields["address"])
    assert "fake" not in log.lower(), "text of a forged header reached the log"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gunicorn", "app"])
def test_forged_forwarded_for_cannot_add_fields_to_the_access_line(kind, service) -> None:
    server: ServiceProcess = service(kind, TRUSTED_PROXY_HOPS="1")
    for request_id, forwarded_for, _address in FORGED:
        assert send(server.port, request_id, forwarded_for.encode("latin-1")) == 200, request_id
    expected = {request_id: address for request_id, _forwarded_for, address in FORGED}
    wait_for(lambda: all(f"{PREFIX}{rid} " in server.log() for rid in expected), what="the access lines",
             timeout=10)
    check_lines(server.log(), expected)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gunicorn", "app"])
def test_c0_control_characters_in_forwarded_for_never_reach_the_log(kind, service) -> None:
    """gunicorn refuses a header value with C0 controls (400, from gunicorn itself); the development server
    lets some through to the app, whose line then names `-`."""
    server: ServiceProcess = service(kind, TRUSTED_PROXY_HOPS="1")
    sent = {}
    for n, char in enumerate("\x01\x08\x0b\x0c\x1b\x1c\x1e\x7f"):
        request_id = f"c0-{n}"
        status = send(server.port, request_id, f"1.2.3.4{char}GET /fake 200{char}".encode("latin-1"))
        assert status in (200, 400), (request_id, status)
        if status == 200:
            sent[request_id] = "-"
    assert send(server.port, "c0-after", b"203.0.113.7") == 200
    sent["c0-after"] = "203.0.113.7"
    wait_for(lambda: f"{PREFIX}c0-after " in server.log(), what="the access lines", timeout=10)
    check_lines(server.log(), sent)
    if kind == "gunicorn":
        assert list(sent) == ["c0-after"]  # every C0 value refused before the app
    for char in "\x01\x08\x0b\x0c\x1b\x1c\x1e\x7f":
        assert char not in server.log()


@pytest.mark.slow
def test_without_forwarded_for_the_peer_is_logged(service) -> None:
    server: ServiceProcess = service("gunicorn", TRUSTED_PROXY_HOPS="1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Request-ID: no-xff\r\n\r\n")
        while sock.recv(65536):
            pass
    wait_for(lambda: f"{PREFIX}no-xff " in server.log(), what="the access line", timeout=10)
    check_lines(server.log(), {"no-xff": "127.0.0.1"})


# In-process: values no HTTP server would pass on (line feeds, NUL) still cannot reach the line.
IN_PROCESS = [
    *((f"ip-{rid}", value, address) for rid, value, address in FORGED),
    ("ip-newline", "1.2.3.4\n2026-01-01 INFO storyart.access: x GET /fake 200 1 0.1ms 5.6.7.8", "-"),
    ("ip-newline-after", "203.0.113.7\n", "-"),
    ("ip-nul", "203.0.113.7\x00", "-"),
    ("ip-scope-escape", "fe80::1%\x1b[2J", "-"),
    ("ip-scope-newline", "fe80::1%eth0\nfake", "-"),
    ("ip-unicode-digits", "\u0661.2.3.4", "-"),
]


@pytest.mark.parametrize(("request_id", "forwarded_for", "address"), IN_PROCESS, ids=[c[0] for c in IN_PROCESS])
def test_the_access_line_names_only_a_valid_address(make_app, caplog, request_id, forwarded_for, address) -> None:
    client = make_app(local_store="memory", trusted_proxy_hops=1).test_client()
    with caplog.at_level(logging.INFO, logger="storyart.access"):
        got = client.get("/health", headers={"X-Request-ID": request_id},
                         environ_base={"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": forwarded_for})
    assert got.status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "storyart.access"]
    assert len(lines) == 1 and FIELDS.fullmatch(lines[0]), lines
    assert FIELDS.fullmatch(lines[0])["address"] == address, lines[0]
    assert "fake" not in lines[0]


def test_a_direct_peer_address_is_logged_as_the_server_gives_it(make_app, caplog) -> None:
    """TRUSTED_PROXY_HOPS=0: the peer from the socket, IPv6 and IPv4-mapped included; no address at all is `-`."""
    client = make_app(local_store="memory").test_client()
    with caplog.at_level(logging.INFO, logger="storyart.access"):
        for peer in ("127.0.0.1", "::1", "::ffff:127.0.0.1", ""):
            assert client.get("/health", environ_base={"REMOTE_ADDR": peer,
                                                       "HTTP_X_FORWARDED_FOR": "203.0.113.9"}).status_code == 200
    addresses = [FIELDS.fullmatch(r.getMessage())["address"] for r in caplog.records if r.name == "storyart.access"]
    assert addresses == ["127.0.0.1", "::1", "::ffff:127.0.0.1", "-"]
