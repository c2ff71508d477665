"""Backups (docs/backups.md): every session goes into one ZIP file and comes back byte for byte, pinned ones
pinned, in Redis mode and on the SQLite store; rotation; a tampered or foreign file is reported, never a
traceback; the CLI runs as a real `flask --app app sessions ...` process; the download restores too."""

from __future__ import annotations

import hashlib
import io
import os
import pty
import re
import signal
import subprocess
import sys
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import redis
from flask import Flask

import backup
import servers
from servers import ROOT, RedisServer
from storage import SessionStorage
from stores import memory as store_memory

JSON = {"Content-Type": "application/json"}
FIRST = 1_700_000_000_000
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")  # the service's log format


def storage_of(app: Flask) -> SessionStorage:
    return app.extensions["storyart"]


def fill(app: Flask, session_10kb: bytes, session_1mb: bytes) -> dict[int, bytes]:
    """Six sessions (client and service timestamps, odd text, one of 1 MB), two of them pinned: their stored
    bytes by timestamp."""
    client = app.test_client()
    base = orjson.loads(session_10kb)
    bodies = [{**base, "timestamp": FIRST + i, "storyUuid": f"story-{i}"} for i in range(3)]
    odd = orjson.dumps({**base, "scriptText": "INT. 東京 — NIGHT 🚨\n“quoted”"})
    bodies.append(odd[:-1] + b',"big":100000000000000000000}')  # beyond 64 bits; an assigned timestamp
    bodies.append({**orjson.loads(session_1mb), "timestamp": FIRST + 10})
    bodies.append({**base, "timestamp": FIRST + 11, "empty": {}, "list": [1.5, None, True]})
    stamps = []
    for body in bodies:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        saved = client.post("/api/v1/session/save", data=data, headers=JSON)
        assert saved.status_code == 200, saved.data
        stamps.append(saved.get_json()["timestamp"])
    for pinned in (stamps[1], stamps[4]):
        assert storage_of(app).pin(pinned, True)
    return {ts: storage_of(app).get(ts).body for ts in stamps}


def pinned_of(app: Flask, stamps) -> set[int]:
    return {ts for ts in stamps if storage_of(app).get(ts).pinned}


def cli(app: Flask, *args: str):
    return app.test_cli_runner().invoke(args=["sessions", *args])


@pytest.fixture(params=["redis", "sqlite"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def app_in(mode: str, make_app: Callable[..., Flask], request: pytest.FixtureRequest, store: Path, **settings) -> Flask:
    if mode == "redis":
        settings["redis_url"] = request.getfixturevalue("redis_server").url
    return make_app(local_store_path=store, **settings)


def test_backup_to_empty_stores_and_restore_gives_every_session_back(mode, make_app, request, tmp_path,
                                                                      session_10kb, session_1mb) -> None:
    app = app_in(mode, make_app, request, tmp_path / "before.sqlite3", backup_dir=tmp_path / "backups")
    if mode == "redis":
        request.getfixturevalue("redis_db")
    saved = fill(app, session_10kb, session_1mb)
    done = cli(app, "backup")
    assert done.exit_code == 0, done.output
    assert re.fullmatch(r"Backed up 6 session\(s\) \(2 pinned, 1\.0 MB\) to \S+storyart-backup-\d{8}T\d{6}\.\d{3}Z"
                        r"\.zip \(0\.\d MB\) in \d+\.\d s\.\n", done.stdout), done.stdout
    [made] = (tmp_path / "backups").iterdir()

    with zipfile.ZipFile(made) as archive:  # what a person opening it finds
        assert archive.testzip() is None
        manifest = orjson.loads(archive.read("manifest.json"))
        assert sorted(archive.namelist()) == sorted(["manifest.json", *(f"sessions/{ts}.json" for ts in saved)])
        for entry in manifest["sessions"]:
            body = archive.read(entry["file"])
            assert body == saved[entry["timestamp"]]
            assert entry["sha256"] == hashlib.sha256(body).hexdigest() and entry["bytes"] == len(body)
    assert (manifest["format"], manifest["count"], manifest["pinned"]) == ("storyart-backup", 6, 2)
    assert manifest["bytes"] == sum(map(len, saved.values()))

    if mode == "redis":
        request.getfixturevalue("redis_server").client().flushall()
    fresh = app_in(mode, make_app, request, tmp_path / "after.sqlite3")  # an empty local store as well
    assert fresh.test_client().get("/api/v1/session/list").get_json()["total"] == 0
    back = cli(fresh, "restore", str(made))
    assert back.exit_code == 0, back.output
    assert back.stdout.splitlines()[-1].startswith(f"Restored 6 of 6 session(s) from {made}: 6 imported, 0 replaced")
    for ts, body in saved.items():
        assert storage_of(fresh).get(ts).body == body
        if mode == "redis":
            assert request.getfixturevalue("redis_server").client().get(f"storyart:session:{ts}") == body
    assert pinned_of(fresh, saved) == pinned_of(app, saved) and len(pinned_of(fresh, saved)) == 2

    again = cli(fresh, "restore", str(made))  # restoring over the same sessions replaces them, unchanged
    assert again.exit_code == 0 and "0 imported, 6 replaced, 0 rejected" in again.stdout
    assert {ts: storage_of(fresh).get(ts).body for ts in saved} == saved


def test_rotation_keeps_the_newest_backups_and_nothing_else_is_touched(make_app, tmp_path, session_10kb) -> None:
    folder = tmp_path / "backups"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "storyart-backup-by-hand.zip").write_bytes(b"not named by the service")
    app = make_app(backup_dir=folder, backup_keep=2)
    app.test_client().post("/api/v1/session/save", data=session_10kb, headers=JSON)
    made = []
    for _ in range(4):
        done = cli(app, "backup")
        assert done.exit_code == 0, done.output
        made.append(Path(done.stdout.split(" to ")[1].split(" (")[0]))
    assert "removed 1 older backup(s)" in done.stdout
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["notes.txt", "storyart-backup-by-hand.zip", made[2].name, made[3].name])
    elsewhere = cli(app, "backup", str(tmp_path / "mine.zip"))  # an explicit PATH rotates nothing
    assert elsewhere.exit_code == 0 and (tmp_path / "mine.zip").is_file() and len(list(folder.iterdir())) == 4


def rewritten(source: Path, target: Path, change: Callable[[str, bytes], bytes]) -> None:
    """A copy of the backup whose members went through `change(name, data)` (the manifest untouched)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, change(info.filename, old.read(info.filename)))


def test_a_tampered_or_damaged_session_is_rejected_and_the_rest_restored(make_app, tmp_path, session_10kb,
                                                                          session_1mb) -> None:
    app = make_app(local_store_path=tmp_path / "before.sqlite3")
    saved = fill(app, session_10kb, session_1mb)
    good = tmp_path / "good.zip"
    assert cli(app, "backup", str(good)).exit_code == 0
    victim = FIRST + 2
    tampered = tmp_path / "tampered.zip"
    rewritten(good, tampered, lambda name, data: data.replace(b"story-2", b"story-X") if str(victim) in name else data)

    fresh = make_app(local_store_path=tmp_path / "after.sqlite3")
    done = cli(fresh, "restore", str(tampered))
    assert done.exit_code == 1
    assert f"  {victim}  rejected: sessions/{victim}.json does not match its SHA-256 in the manifest" in done.stdout
    assert "5 imported, 0 replaced, 1 rejected" in done.stdout
    assert storage_of(fresh).get(victim) is None
    assert all(storage_of(fresh).get(ts).body == body for ts, body in saved.items() if ts != victim)

    damaged = bytearray(good.read_bytes())  # a flipped byte inside the 1 MB session's compressed data
    with zipfile.ZipFile(good) as archive:
        info = archive.getinfo(f"sessions/{FIRST + 10}.json")
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    damaged[middle] ^= 0xFF
    (tmp_path / "damaged.zip").write_bytes(bytes(damaged))
    done = cli(make_app(local_store_path=tmp_path / "third.sqlite3"), "restore", str(tmp_path / "damaged.zip"))
    assert done.exit_code == 1 and f"  {FIRST + 10}  rejected: sessions/{FIRST + 10}.json " in done.stdout
    assert "5 imported, 0 replaced, 1 rejected" in done.stdout


def manifest_zip(path: Path, manifest: object) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("manifest.json", orjson.dumps(manifest))
    return path


def patched_zip(path: Path, offset: int, value: int) -> Path:
    """The ZIP at `path` with the 2 bytes at `offset` (from each header's start, local and central) set to
    `value`: general-purpose flags at 6 and 8, the compression method at 8 and 10."""
    data = bytearray(path.read_bytes())
    local, central = offset, offset + 2  # a central header has the version made by in front
    for signature, at in ((b"PK\x03\x04", local), (b"PK\x01\x02", central)):
        start = data.find(signature)
        data[start + at : start + at + 2] = value.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path


def test_a_file_that_is_not_a_backup_is_one_line_and_status_2(make_app, tmp_path) -> None:
    (tmp_path / "text.zip").write_text("hello")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    entry = {"timestamp": 1, "file": "../../etc/passwd", "bytes": 1, "sha256": "0" * 64, "pinned": False}
    cases = {
        tmp_path / "missing.zip": "No such file or directory",
        tmp_path: "Is a directory",
        tmp_path / "text.zip": "not a ZIP file",
        tmp_path / "other.zip": "it has no manifest.json",
        manifest_zip(tmp_path / "format.zip", {"format": "something-else"}): "is not a storyart-backup manifest",
        manifest_zip(tmp_path / "version.zip", {"format": "storyart-backup", "version": 9}): "of version 9",
        manifest_zip(tmp_path / "entries.zip", {"format": "storyart-backup", "version": 1, "sessions": [entry]}):
            "lists sessions it cannot describe",
        patched_zip(manifest_zip(tmp_path / "encrypted.zip", {}), 6, 1): "password required",
        patched_zip(manifest_zip(tmp_path / "method.zip", {}), 8, 99): "compression method is not supported",
    }
    app = make_app()
    for path, reason in cases.items():
        done = cli(app, "restore", str(path))
        assert done.exit_code == 2, (path, done.output)
        assert done.stdout == "" and done.stderr.count("\n") == 1, done.output
        assert done.stderr.startswith(f"Error: {path}") and reason in done.stderr, done.stderr


def test_an_unwritable_backup_dir_is_one_line_and_leaves_nothing(make_app, tmp_path, session_10kb) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    app = make_app(backup_dir=blocker / "backups")  # a folder under a file: refused for root as well
    app.test_client().post("/api/v1/session/save", data=session_10kb, headers=JSON)
    done = cli(app, "backup")
    assert done.exit_code == 1 and done.stdout == ""
    assert done.stderr == f"Error: no backup written: cannot write a backup in {blocker / 'backups'}: Not a directory\n"
    assert not list(tmp_path.rglob("*.zip")) and not list(tmp_path.rglob("*.partial"))


def test_the_cli_as_a_real_process_with_progress_only_on_a_terminal(redis_server: RedisServer, redis_db,
                                                                    tmp_path, session_10kb) -> None:
    """`flask --app app sessions backup` with its stderr on a pseudo-terminal shows progress; `restore` with a
    pipe does not, and both print their summary line."""
    env = {**os.environ, "REDIS_URL": redis_server.url, "LOCAL_STORE_PATH": str(tmp_path / "cli.sqlite3"),
           "BACKUP_DIR": str(tmp_path / "backups"), "LOG_LEVEL": "WARNING"}
    for ts in range(FIRST, FIRST + 3):  # as another StoryArt tool writes them
        redis_db.set(f"storyart:session:{ts}", orjson.dumps({**orjson.loads(session_10kb), "timestamp": ts}))
    flask = [sys.executable, "-m", "flask", "--app", "app", "sessions"]
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run([*flask, "backup"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=terminal,
                              timeout=60)
        os.close(terminal)
        shown = _read_all(controller)
    finally:
        os.close(controller)
    assert done.returncode == 0, shown
    assert b"backed up 3/3 sessions, 0.0 MB, about 0 s left" in shown
    assert done.stdout.decode().startswith("Backed up 3 session(s) (0 pinned, 0.0 MB) to ")
    [made] = (tmp_path / "backups").iterdir()
    stored = {ts: redis_db.get(f"storyart:session:{ts}") for ts in range(FIRST, FIRST + 3)}
    redis_db.flushall()
    done = subprocess.run([*flask, "restore", str(made)], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0 and b"\r" not in done.stderr and b"restored " not in done.stderr, done.stderr
    assert done.stdout.decode().splitlines()[-1].startswith(f"Restored 3 of 3 session(s) from {made}: 3 imported")
    assert {ts: redis_db.get(f"storyart:session:{ts}") for ts in stored} == stored
    done = subprocess.run([*flask, "restore", str(tmp_path / "nothing.zip")], cwd=ROOT, env=env, capture_output=True,
                          timeout=60)
    assert done.returncode == 2 and done.stdout == b"" and b"Traceback" not in done.stderr
    errors = [line for line in done.stderr.decode().splitlines() if not LOG_LINE.match(line)]
    assert errors == [f"Error: {tmp_path / 'nothing.zip'} is not a StoryArt backup (No such file or directory)"]


def _read_all(descriptor: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(descriptor, 65536)
        except OSError:  # the terminal's other end is closed: everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("kind", ["redis", "sqlite", "memory"])
def test_the_download_is_the_same_backup_and_restores(kind, make_app, request, tmp_path, session_10kb,
                                                      session_1mb) -> None:
    settings = {"local_store": kind} if kind != "redis" else {"redis_url": request.getfixturevalue("redis_server").url}
    if kind == "redis":
        request.getfixturevalue("redis_db")
    app = make_app(local_store_path=tmp_path / "before.sqlite3", **settings)
    saved = fill(app, session_10kb, session_1mb)
    got = app.test_client().get("/api/v1/backup")
    assert got.status_code == 200 and got.mimetype == "application/zip"
    assert re.fullmatch(r'attachment; filename="storyart-backup-\d{8}T\d{6}\.\d{3}Z\.zip"',
                        got.headers["Content-Disposition"])
    downloaded = tmp_path / "downloaded.zip"
    downloaded.write_bytes(got.data)

    if kind == "redis":
        request.getfixturevalue("redis_server").client().flushall()
    store_memory.MEMORY.clear()
    fresh = make_app(local_store_path=tmp_path / "after.sqlite3", **settings)
    report = backup.restore(storage_of(fresh), downloaded, 50 * 1024 * 1024)
    assert report.counts() == {"imported": 6, "replaced": 0, "rejected": 0}
    assert {ts: storage_of(fresh).get(ts).body for ts in saved} == saved
    assert len(pinned_of(fresh, saved)) == 2


def test_a_backup_streams_a_few_sessions_at_a_time(make_app, tmp_path, session_1mb) -> None:
    """20 sessions of 1 MB: writing their backup allocates a few MB at its peak, not the 20 MB they hold."""
    app = make_app()
    client = app.test_client()
    base = orjson.loads(session_1mb)
    for i in range(20):
        client.post("/api/v1/session/save", data=orjson.dumps({**base, "timestamp": FIRST + i}), headers=JSON)
    tracemalloc.start()
    try:
        written = backup.stream(storage_of(app))
        size = sum(len(chunk) for chunk in written.chunks)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert written.count == 20 and written.bytes == 20 * len(orjson.dumps({**base, "timestamp": FIRST}))
    assert size < written.bytes / 2  # deflated
    assert peak < 8 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_the_command_refuses_a_store_it_cannot_reach(make_app, tmp_path) -> None:
    done = cli(make_app(local_store="memory"), "backup", str(tmp_path / "x.zip"))
    assert done.exit_code == 1 and done.stderr.startswith("Error: LOCAL_STORE=memory keeps sessions inside")
    assert not (tmp_path / "x.zip").exists()


def test_a_backup_read_in_memory_is_what_the_file_holds(make_app, tmp_path, session_10kb) -> None:
    """`stream` and `write_file` give the same bytes (one code path), and the manifest comes last."""
    app = make_app()
    app.test_client().post("/api/v1/session/save", data=session_10kb, headers=JSON)
    written = backup.write_file(storage_of(app), tmp_path / "one.zip")
    streamed = b"".join(backup.stream(storage_of(app)).chunks)
    with zipfile.ZipFile(tmp_path / "one.zip") as a, zipfile.ZipFile(io.BytesIO(streamed)) as b:
        assert a.namelist() == b.namelist() and a.namelist()[-1] == "manifest.json"
        assert [a.read(n) for n in a.namelist()[:-1]] == [b.read(n) for n in b.namelist()[:-1]]
    assert written.count == 1 and not list(tmp_path.glob(".*partial"))


def test_no_backup_or_restore_while_redis_is_unreachable(make_app, tmp_path) -> None:
    """A backup would miss what Redis holds, a restore could not pin: one line each, nothing written (the
    download's 503 is in tests/test_openapi.py)."""
    app = make_app(redis_url="redis://127.0.0.1:1/0", redis_connect_timeout=0.2, backup_dir=tmp_path / "backups")
    done = cli(app, "backup")
    assert done.exit_code == 1
    assert done.stderr == ("Error: no backup written: Redis is unreachable, so a backup would miss the sessions it "
                           "holds\n")
    assert list((tmp_path / "backups").iterdir()) == []
    manifest_zip(tmp_path / "empty.zip", {"format": "storyart-backup", "version": 1, "sessions": []})
    done = cli(app, "restore", str(tmp_path / "empty.zip"))
    assert done.exit_code == 1
    assert done.stderr == ("Error: nothing restored: Redis is configured but unreachable; restore when it answers "
                           "again\n")


def test_timestamps_beyond_zip_dates_are_backed_up(make_app, redis_server, redis_db, tmp_path) -> None:
    """Another tool may write any number of ms under a session key: the backup still holds it, dated 2107."""
    far = 5_000_000_000_000  # the year 2128
    body = orjson.dumps({"scriptText": "x", "episodeContext": "{}", "storyUuid": "u", "analyzedEpisode": {},
                         "timestamp": far})
    redis_db.set(f"storyart:session:{far}", body)
    redis_db.zadd("storyart:sessions:index", {f"storyart:session:{far}": far})
    app = make_app(redis_url=redis_server.url)
    written = backup.write_file(storage_of(app), tmp_path / "far.zip")
    with zipfile.ZipFile(tmp_path / "far.zip") as archive:
        assert archive.read(f"sessions/{far}.json") == body and written.count == 1
        assert archive.getinfo(f"sessions/{far}.json").date_time[0] == 2107


@pytest.mark.slow
def test_a_restore_or_import_into_a_capped_store_refuses_what_does_not_fit_and_evicts_nothing(
        tmp_path, session_10kb, service) -> None:
    """No Redis, LOCAL_STORE_MAX_SESSIONS=5, two sessions in the store, a backup of 8: the restore stores three,
    rejects five naming the cap, exits 1, and both earlier sessions are still there; an import over HTTP the
    same (it used to evict the oldest sessions and report every item `imported`)."""
    base = {**{k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}, "LOG_LEVEL": "WARNING",
            "BACKUP_DIR": str(tmp_path / "backups")}
    flask = [sys.executable, "-m", "flask", "--app", "app", "sessions"]
    source = {**base, "LOCAL_STORE_PATH": str(tmp_path / "source.sqlite3")}
    app_source = service("app", REDIS_URL="", LOCAL_STORE_PATH=source["LOCAL_STORE_PATH"])
    items = [{**orjson.loads(session_10kb), "timestamp": FIRST + n} for n in range(8)]
    imported = servers.request(app_source.port, "POST", "/api/v1/session/import", orjson.dumps(items),
                               {"Content-Type": "application/json"})
    assert imported.status == 200 and imported.json()["imported"] == 8, imported.body
    app_source.stop()
    assert subprocess.run([*flask, "backup"], cwd=ROOT, env=source, capture_output=True, timeout=60).returncode == 0
    [made] = (tmp_path / "backups").iterdir()

    capped = {**base, "LOCAL_STORE_PATH": str(tmp_path / "capped.sqlite3"), "LOCAL_STORE_MAX_SESSIONS": "5"}
    target = service("app", REDIS_URL="", LOCAL_STORE_PATH=capped["LOCAL_STORE_PATH"], LOCAL_STORE_MAX_SESSIONS="5")
    earlier = [{**orjson.loads(session_10kb), "timestamp": FIRST - 10 - n} for n in range(2)]
    for item in earlier:
        assert servers.save_request(target.port, orjson.dumps(item)).status == 200
    done = subprocess.run([*flask, "restore", str(made)], cwd=ROOT, env=capped, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert sum(" imported (memory)" in line for line in lines) == 3
    assert sum("rejected: the local store is at its caps (LOCAL_STORE_MAX_SESSIONS=5" in line for line in lines) == 5
    assert lines[-1].startswith(f"Restored 3 of 8 session(s) from {made}: 3 imported, 0 replaced, 5 rejected")

    def listed() -> set[int]:
        listing = servers.request(target.port, "GET", "/api/v1/session/list?limit=100").json()
        return {session["timestamp"] for session in listing["sessions"]}

    kept = listed()
    assert len(kept) == 5 and {item["timestamp"] for item in earlier} <= kept
    more = [{**orjson.loads(session_10kb), "timestamp": FIRST + 100 + n} for n in range(2)]
    answer = servers.request(target.port, "POST", "/api/v1/session/import", orjson.dumps(more),
                             {"Content-Type": "application/json"}).json()
    assert (answer["imported"], answer["rejected"]) == (0, 2) and "at its caps" in answer["results"][0]["error"]
    assert listed() == kept


def pending_and_in_redis(app: Flask, server: RedisServer, body: bytes, pending: int, in_redis: int) -> list[int]:
    """`pending` sessions saved while Redis was away, then `in_redis` older ones saved to Redis once it answers
    again, before any write-back (the app's background retry waits an hour): every timestamp. `server` is the
    test's own: the shared one may load a snapshot another test saved when it restarts."""
    client, base = app.test_client(), orjson.loads(body)

    def saved(timestamp: int) -> str:
        got = client.post("/api/v1/session/save", data=orjson.dumps({**base, "timestamp": timestamp}), headers=JSON)
        assert got.status_code == 200, got.data
        return got.get_json()["storage"]

    server.kill()
    assert {saved(FIRST + in_redis + i) for i in range(pending)} == {"memory"}
    server.start()
    assert storage_of(app).check(when_down=True).value == "connected"
    assert {saved(FIRST + i) for i in range(in_redis)} == {"redis"}
    assert storage_of(app).local.count()[0] == pending
    return list(range(FIRST, FIRST + in_redis + pending))


def backed_up(archive_bytes: bytes | Path) -> list[int]:
    """The timestamps a backup's manifest lists, checked against its members."""
    with zipfile.ZipFile(archive_bytes if isinstance(archive_bytes, Path) else io.BytesIO(archive_bytes)) as archive:
        manifest = orjson.loads(archive.read("manifest.json"))
        assert sorted(archive.namelist()) == sorted(["manifest.json", *(e["file"] for e in manifest["sessions"])])
    assert manifest["count"] == len(manifest["sessions"])
    return sorted(entry["timestamp"] for entry in manifest["sessions"])


@pytest.mark.slow
def test_the_command_run_while_the_write_back_runs_backs_up_every_session(make_app, own_redis, tmp_path,
                                                                          session_10kb) -> None:
    """5 sessions in Redis and 20 pending (300 KB each). `flask sessions backup` lists them and is held still
    (SIGSTOP) as soon as it asks Redis for its list; the write-back then moves every pending session to Redis, and
    the backup goes on: it holds all 25 (before, it exited 0 without the pending ones it had not read yet)."""
    padded = orjson.dumps({**orjson.loads(session_10kb), "pad": "x" * 290_000})
    server = own_redis()
    app = make_app(redis_url=server.url, redis_retry_interval=3600)
    everything = pending_and_in_redis(app, server, padded, pending=20, in_redis=5)
    env = {**os.environ, "REDIS_URL": server.url, "LOCAL_STORE_PATH": str(tmp_path / "sessions.sqlite3"),
           "REDIS_RETRY_INTERVAL": "3600", "LOG_LEVEL": "WARNING"}
    watcher = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=60)
    with watcher.monitor() as monitor:
        command = subprocess.Popen([sys.executable, "-m", "flask", "--app", "app", "sessions", "backup",
                                    str(tmp_path / "during.zip")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        try:
            while not monitor.next_command()["command"].startswith("EVALSHA"):  # its list: the local one is made
                pass
            command.send_signal(signal.SIGSTOP)
            assert storage_of(app).write_back() == 20
        finally:
            command.send_signal(signal.SIGCONT)
            out, err = command.communicate(timeout=120)
    watcher.close()
    assert command.returncode == 0, err
    assert out.decode().startswith("Backed up 25 session(s) (0 pinned, 7.5 MB)"), out
    assert backed_up(tmp_path / "during.zip") == everything


def test_a_download_read_while_the_write_back_runs_holds_every_session(make_app, own_redis, session_10kb) -> None:
    """GET /api/v1/backup, its first session sent while 10 are pending; the write-back then moves them all
    to Redis before the rest is read: the file holds all 13 (it held 7 before)."""
    server = own_redis()
    app = make_app(redis_url=server.url, redis_retry_interval=3600)
    everything = pending_and_in_redis(app, server, session_10kb, pending=10, in_redis=3)
    got = app.test_client().get("/api/v1/backup", buffered=False)
    chunks = iter(got.response)
    first = next(chunks)
    assert storage_of(app).write_back() == 10
    assert backed_up(first + b"".join(chunks)) == everything
    got.close()


@pytest.mark.slow
def test_a_restore_that_loses_redis_midway_reports_each_session_as_it_was(make_app, own_redis, tmp_path,
                                                                           session_10kb) -> None:
    """12 sessions backed up, then every other one deleted; Redis (AOF, every write synced) is killed after the
    restore's 6th session, so the other 6 go to the local store: 6 imported and 6 replaced, each as it was (the
    replaced ones restored after the kill were reported imported before); once Redis is back and the write-back
    ran, every session is in Redis byte for byte."""
    durable = ("--appendonly", "yes", "--appendfsync", "always")
    server = own_redis(*durable)
    app = make_app(redis_url=server.url, redis_retry_interval=3600)
    storage = storage_of(app)
    client, base = app.test_client(), orjson.loads(session_10kb)
    stamps = [FIRST + i for i in range(12)]
    for ts in stamps:
        assert client.post("/api/v1/session/save", data=orjson.dumps({**base, "timestamp": ts}),
                           headers=JSON).status_code == 200
    saved = {ts: storage.get(ts).body for ts in stamps}
    backup.write_file(storage, tmp_path / "all.zip")
    for ts in stamps[1::2]:
        assert storage.delete(ts)

    def kill_redis_midway(step: backup.Step) -> None:
        if step.done == 6:
            server.kill()

    report = backup.restore(storage, tmp_path / "all.zip", 50 * 1024 * 1024, kill_redis_midway)
    assert [r["storage"] for r in report.results] == ["redis"] * 6 + ["memory"] * 6
    assert {r["timestamp"]: r["status"] for r in report.results} == \
        {ts: "imported" if ts in stamps[1::2] else "replaced" for ts in stamps}
    assert report.counts() == {"imported": 6, "replaced": 6, "rejected": 0}
    server.start(*durable)
    assert storage.recover() == 6
    assert {ts: server.client().get(f"storyart:session:{ts}") for ts in stamps} == saved
