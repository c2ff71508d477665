"""Off-site backups (docs/backups.md) against a real S3-compatible server (SeaweedFS, tests/s3server.py) with the
real `flask --app app sessions ...` commands: an upload counts once read back; a store that is down or dies
mid-upload keeps the local copy and the next backup uploads what is missing; a 0-byte, truncated or changed object
is never restored from; rotation per place; and the schedule, one backup per due time across three gunicorn
workers on each of two hosts, and a due time missed while the service was stopped taken once at the next start."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import test_backup
from flask import Flask
from s3server import BUCKET, KillingRelay, S3Server
from test_page import Tab, browser, tab  # noqa: F401 - the history page's browser fixtures

from config import Config, ConfigError
from servers import ROOT, RedisServer, free_port, request, wait_for

FLASK = [sys.executable, "-m", "flask", "--app", "app", "sessions"]
NAME = r"storyart-backup-\d{8}T\d{6}\.\d{3}Z\.zip"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS for the module (its start is the slow part); each test uses its own prefix."""
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.kill()


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The commands' environment: this test's store file and BACKUP_DIR, no Redis unless given, no AWS
    settings of the machine's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BACKUP_", "REDIS_"))}
    return {**env, "LOG_LEVEL": "WARNING", "LOCAL_STORE_PATH": str(tmp_path / "store.sqlite3"),
            "BACKUP_DIR": str(tmp_path / "backups"), **extra}


def sessions_cmd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLASK, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def storage_app(make_app: Callable[..., Flask], env: dict[str, str]) -> Flask:
    """An app on the same store (and Redis) as the commands of `env`."""
    return make_app(local_store_path=Path(env["LOCAL_STORE_PATH"]), redis_url=env.get("REDIS_URL") or None)


def objects(s3: S3Server, prefix: str) -> dict[str, int]:
    listed = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {item["Key"].split("/", 1)[1]: item["Size"] for item in listed}


def local_names(env: dict[str, str]) -> list[str]:
    folder = Path(env["BACKUP_DIR"])
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def big_sessions(app: Flask, session_1mb: bytes, count: int) -> None:
    """`count` different 1 MB sessions (a backup of several hundred KB)."""
    base = orjson.loads(session_1mb)
    for n in range(count):
        body = orjson.dumps({**base, "storyUuid": f"big-{n}", "timestamp": test_backup.FIRST + 100 + n})
        assert app.test_client().post("/api/v1/session/save", data=body, headers=test_backup.JSON).status_code == 200


# ------------------------------------------------------------------------------------------------ settings


def test_s3_settings_are_read_and_checked_without_showing_a_secret(tmp_path: Path) -> None:
    keys = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "very-secret-value"}
    config = Config.from_env({"BACKUP_S3_URL": "s3://my-bucket/storyart/backups/", "BACKUP_S3_ENDPOINT":
                              "https://s3.eu-central-003.backblazeb2.com/", "AWS_REGION": "eu-central-003", **keys},
                             None)
    assert config.backup_s3 is not None and config.backup_s3.url("x.zip") == "s3://my-bucket/storyart/backups/x.zip"
    assert config.backup_s3.endpoint == "https://s3.eu-central-003.backblazeb2.com"
    assert config.backup_s3.region == "eu-central-003" and "very-secret" not in repr(config)
    assert Config.from_env({"BACKUP_S3_URL": "s3://my-bucket", **keys}, None).backup_s3.prefix == ""
    assert Config.from_env({"BACKUP_SCHEDULE": " 15  3 * * * "}, None).backup_schedule == "15 3 * * *"
    no_aws = {"AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
              "AWS_EC2_METADATA_DISABLED": "true"}
    bad = {
        "BACKUP_S3_URL: expected s3://bucket/prefix, got 'https://my-bucket/x'": {"BACKUP_S3_URL": "https://my-bucket/x"},
        "BACKUP_S3_URL: expected s3://bucket/prefix (credentials go in AWS_ACCESS_KEY_ID":
            {"BACKUP_S3_URL": "s3://AKID:very-secret-value@my-bucket/x"},
        "BACKUP_S3_URL: the prefix must be folder names": {"BACKUP_S3_URL": "s3://my-bucket/a/../b"},
        "BACKUP_S3_ENDPOINT: expected http(s)://host[:port] (credentials go":
            {"BACKUP_S3_URL": "s3://my-bucket", "BACKUP_S3_ENDPOINT": "http://me:very-secret-value@minio:9000"},
        "BACKUP_S3_ENDPOINT: expected http(s)://host[:port], got 'minio:9000'":
            {"BACKUP_S3_URL": "s3://my-bucket", "BACKUP_S3_ENDPOINT": "minio:9000"},
        "BACKUP_S3_ENDPOINT: set, but BACKUP_S3_URL is not": {"BACKUP_S3_ENDPOINT": "http://127.0.0.1:9000"},
        "AWS_SECRET_ACCESS_KEY: required with AWS_ACCESS_KEY_ID": {"BACKUP_S3_URL": "s3://b-1",
                                                                   "AWS_ACCESS_KEY_ID": "AKID"},
        "AWS_ACCESS_KEY_ID: required with AWS_SECRET_ACCESS_KEY": {"BACKUP_S3_URL": "s3://b-1",
                                                                   "AWS_SECRET_ACCESS_KEY": "very-secret-value"},
        "BACKUP_SCHEDULE: '61 * * * *' is not a cron expression": {"BACKUP_SCHEDULE": "61 * * * *"},
        "BACKUP_SCHEDULE: '0 0 31 2 *' is not a cron expression that comes due": {"BACKUP_SCHEDULE": "0 0 31 2 *"},
    }
    for expected, env in bad.items():
        with pytest.raises(ConfigError) as caught:
            Config.from_env(env, None)
        assert str(caught.value).startswith(expected) and "very-secret" not in str(caught.value), caught.value
    # No keys anywhere: one line and exit 2 at start-up, from the real process.
    env = {**base_env(tmp_path), **no_aws, "HOME": str(tmp_path), "BACKUP_S3_URL": "s3://my-bucket/x"}
    done = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr == (
        "storyart: configuration error: BACKUP_S3_URL: no AWS credentials found: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or ~/.aws/credentials)\n"), done.stderr
    env["AWS_PROFILE"] = "nobody"
    done = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("storyart: configuration error: AWS_PROFILE: cannot read "
                                                           "the AWS credentials: The config profile (nobody) could")


# ------------------------------------------------------------------------------------- backup and restore


def test_backup_is_verified_off_site_and_restores_from_s3_into_empty_stores(s3, redis_server: RedisServer, redis_db,
                                                                             make_app, tmp_path, session_10kb,
                                                                             session_1mb) -> None:
    env = base_env(tmp_path, REDIS_URL=redis_server.url, **s3.env("restore"))
    saved = test_backup.fill(storage_app(make_app, env), session_10kb, session_1mb)
    done = sessions_cmd(env, "backup")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"Backed up 6 session\(s\) \(2 pinned, 1\.0 MB\) to \S+/({NAME}) \(0\.\d MB\) in \d+\.\d s; "
                        rf"verified off-site at s3://{BUCKET}/restore/({NAME})\.\n", done.stdout), done.stdout
    [name] = local_names(env)
    local = (Path(env["BACKUP_DIR"]) / name).read_bytes()
    digest = hashlib.sha256(local).hexdigest()

    client = s3.client()  # what the store holds: the same bytes, their hash in the metadata and the checksum file
    head = client.head_object(Bucket=BUCKET, Key=f"restore/{name}")
    assert head["ContentLength"] == len(local)
    assert head["Metadata"] == {"sha256": digest, "bytes": str(len(local)), "sessions": "6"}
    assert client.get_object(Bucket=BUCKET, Key=f"restore/{name}")["Body"].read() == local
    sidecar = client.get_object(Bucket=BUCKET, Key=f"restore/{name}.sha256")["Body"].read()
    assert sidecar == f"{digest}  {name}\n".encode()

    listed = sessions_cmd(env, "backups")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:-1]]
    assert [(r[0], r[1], r[2], r[3], r[-1]) for r in rows] == [("local", name, "6", str(len(local)), "yes"),
                                                                 ("s3", name, "6", str(len(local)), "yes")]

    # A new machine: Redis emptied, a new local store, no BACKUP_DIR; the store is all there is.
    redis_db.flushall()
    fresh = {**env, "LOCAL_STORE_PATH": str(tmp_path / "fresh.sqlite3"), "BACKUP_DIR": str(tmp_path / "none")}
    url = f"s3://{BUCKET}/restore/{name}"
    for source in ([url], ["--latest"]):
        back = sessions_cmd(fresh, "restore", *source)
        assert back.returncode == 0, back.stderr
        counts = "6 imported, 0 replaced" if source == [url] else "0 imported, 6 replaced"
        assert back.stdout.splitlines()[-1].startswith(f"Restored 6 of 6 session(s) from {url}: {counts}")
        app = storage_app(make_app, fresh)
        assert {ts: test_backup.storage_of(app).get(ts).body for ts in saved} == saved
        assert {ts: redis_db.get(f"storyart:session:{ts}") for ts in saved} == saved
        assert len(test_backup.pinned_of(app, saved)) == 2
    assert not list(tmp_path.glob("**/storyart-restore-*"))


def test_a_zero_byte_truncated_or_changed_object_is_never_restored_from(s3, make_app, tmp_path, session_10kb,
                                                                        session_1mb) -> None:
    settings = {"backup_s3": s3.settings("damaged"), "backup_dir": tmp_path / "backups"}
    app = make_app(**settings)
    saved = test_backup.fill(app, session_10kb, session_1mb)
    assert test_backup.cli(app, "backup").exit_code == 0
    [good] = [p.name for p in (tmp_path / "backups").iterdir()]
    client = s3.client()
    real = client.get_object(Bucket=BUCKET, Key=f"damaged/{good}")
    body, meta = real["Body"].read(), real["Metadata"]
    sidecar = client.get_object(Bucket=BUCKET, Key=f"damaged/{good}.sha256")["Body"].read()
    zero, cut = "storyart-backup-20980101T000000.000Z.zip", "storyart-backup-20990101T000000.000Z.zip"
    client.put_object(Bucket=BUCKET, Key=f"damaged/{zero}", Body=b"")
    client.put_object(Bucket=BUCKET, Key=f"damaged/{zero}.sha256", Body=sidecar)
    client.put_object(Bucket=BUCKET, Key=f"damaged/{cut}", Body=body[: len(body) // 2], Metadata=meta)
    client.put_object(Bucket=BUCKET, Key=f"damaged/{cut}.sha256", Body=sidecar)

    listed = test_backup.cli(app, "backups").stdout
    assert re.search(rf"^s3 +{zero} +\? +0 .* NO: 0 bytes$", listed, re.M), listed
    assert re.search(rf"^s3 +{cut} +6 +{len(body) // 2} .* NO: {len(body) // 2} bytes, its upload had {len(body)}: "
                     "truncated or replaced$", listed, re.M), listed
    assert re.search(rf"^s3 +{good} +6 .* yes$", listed, re.M), listed

    fresh = make_app(local_store_path=tmp_path / "fresh.sqlite3", **settings)
    for name, why in ((zero, "0 bytes"), (cut, "truncated or replaced")):
        url = f"s3://{BUCKET}/damaged/{name}"
        done = test_backup.cli(fresh, "restore", url)
        assert done.exit_code == 2 and done.stdout == "", done.stdout
        assert re.fullmatch(rf"Error: {url} is not a verified backup \([^\n]*{why}\); it is not restored from\n",
                            done.stderr), done.stderr
    changed = bytearray(body)  # same size, same metadata and checksum file: only the download's hash can tell
    changed[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=f"damaged/{good}", Body=bytes(changed), Metadata=meta)
    url = f"s3://{BUCKET}/damaged/{good}"
    done = test_backup.cli(fresh, "restore", url)
    assert done.exit_code == 2 and done.stderr == (f"Error: {url} arrived as {len(body)} bytes that do not match its "
                                                   "SHA-256 (damaged or changed in the store); it is not restored "
                                                   "from\n"), done.stderr
    assert fresh.test_client().get("/api/v1/session/list").get_json()["total"] == 0

    client.put_object(Bucket=BUCKET, Key=f"damaged/{good}", Body=body, Metadata=meta)  # whole again
    done = test_backup.cli(fresh, "restore", "--latest")  # passes over the two newer, unverified objects
    assert done.exit_code == 0 and done.stdout.splitlines()[-1].startswith(f"Restored 6 of 6 session(s) from {url}")
    assert {ts: test_backup.storage_of(fresh).get(ts).body for ts in saved} == saved


@pytest.mark.slow
def test_a_store_down_or_dying_mid_upload_keeps_the_local_copy_and_the_next_backup_uploads_them(
        tmp_path, make_app, session_1mb) -> None:
    own = S3Server(tmp_path / "s3")  # this test kills its server
    try:
        own.start()
        env = base_env(tmp_path, BACKUP_KEEP="5", **own.env("down"))
        big_sessions(storage_app(make_app, env), session_1mb, 6)
        own.kill()  # before the upload
        done = sessions_cmd(env, "backup")
        [first] = local_names(env)
        assert done.returncode == 1 and done.stdout.startswith("Backed up 6 session(s)"), done.stderr
        assert re.fullmatch(rf"Error: {first} is only in {env['BACKUP_DIR']}, not off-site: cannot list "
                            rf"s3://{BUCKET}/down/: [^\n]+ \(the next backup uploads it again\)\n", done.stderr)

        own.start()
        relay = KillingRelay(own.port, own.kill, after=100_000)  # the server dies 100 KB into the upload
        try:
            size = (Path(env["BACKUP_DIR"]) / first).stat().st_size
            assert size > 300_000
            done = sessions_cmd({**env, "BACKUP_S3_ENDPOINT": relay.endpoint}, "backup")
            assert relay.killed.is_set()
        finally:
            relay.close()
        first_, second = local_names(env)
        assert first_ == first and done.returncode == 1, done.stdout
        assert re.fullmatch(rf"Error: {second} is only in {env['BACKUP_DIR']}, not off-site: the upload of {second} "
                            rf"to s3://{BUCKET}/down/{second} failed: [^\n]+\n", done.stderr), done.stderr

        own.start()
        assert not [key for key in objects(own, "down") if key.endswith(".sha256")]  # nothing counts as off-site
        done = sessions_cmd(env, "backup")
        assert done.returncode == 0, done.stderr
        third = local_names(env)[-1]
        assert f"verified off-site at s3://{BUCKET}/down/{third} (with 2 earlier backup(s))." in done.stdout
        assert local_names(env) == [first, second, third]
        stored = objects(own, "down")
        for name in (first, second, third):
            assert stored[name] == (Path(env["BACKUP_DIR"]) / name).stat().st_size and f"{name}.sha256" in stored
        listed = sessions_cmd(env, "backups").stdout
        assert len(re.findall(r"^s3 .* yes$", listed, re.M)) == 3, listed
    finally:
        own.kill()


def test_rotation_keeps_backup_keep_in_each_place_and_spares_the_newest_verified(s3, make_app, tmp_path,
                                                                                 session_10kb) -> None:
    folder = tmp_path / "backups"
    app = make_app(backup_s3=s3.settings("rotation"), backup_dir=folder, backup_keep=2)
    app.test_client().post("/api/v1/session/save", data=session_10kb, headers=test_backup.JSON)
    for _ in range(3):
        done = test_backup.cli(app, "backup")
        assert done.exit_code == 0, done.output
    assert "; removed 1 older backup(s); removed 1 older backup(s) off-site." in done.stdout
    kept = sorted(p.name for p in folder.iterdir())
    assert len(kept) == 2 and sorted(objects(s3, "rotation")) == sorted([*kept, *(f"{n}.sha256" for n in kept)])

    # Two newer backups that are not verified in either place: the newest verified one is spared all the same.
    junk = ["storyart-backup-20990101T000000.000Z.zip", "storyart-backup-20990101T000001.000Z.zip"]
    for name in junk:
        (folder / name).write_bytes(b"not a backup")
        s3.client().put_object(Bucket=BUCKET, Key=f"rotation/{name}", Body=b"")
    done = test_backup.cli(app, "backup")
    assert done.exit_code == 0, done.output
    newest = [p.name for p in folder.iterdir() if p.name not in junk]
    assert len(newest) == 1 and newest[0] > kept[-1]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*newest, *junk])
    assert sorted(objects(s3, "rotation")) == sorted([*newest, f"{newest[0]}.sha256", *junk])


# ------------------------------------------------------------------------------------------------ schedule


SCHEDULED = re.compile(r"scheduled backup for (\S+): Backed up \d+ session\(s\) .* to (\S+) \(")


def scheduled(log: str) -> list[tuple[str, str]]:
    """(due time, file) of every scheduled backup a service's log reports."""
    return SCHEDULED.findall(log)


@pytest.mark.slow
def test_three_workers_on_two_hosts_take_one_backup_per_due_time(service, own_redis, tmp_path, s3,
                                                                   session_10kb) -> None:
    shared = own_redis()
    hosts = []
    for n in (0, 1):
        env = {"REDIS_URL": shared.url, "SERVICE_HOSTS": "2", "SERVICE_HOST_INDEX": str(n), "WEB_CONCURRENCY": "3",
               "BACKUP_SCHEDULE": "* * * * * */2", "BACKUP_KEEP": "100", "BACKUP_DIR": str(tmp_path / f"backups-{n}"),
               "LOCAL_STORE_PATH": str(tmp_path / f"host-{n}.sqlite3"), **s3.env("schedule")}
        hosts.append(service("gunicorn", **env))
    assert request(hosts[0].port, "POST", "/api/v1/session/save", session_10kb, test_backup.JSON).status == 200

    def taken() -> list[tuple[str, str]]:
        return [item for host in hosts for item in scheduled(host.log())]

    wait_for(lambda: len(taken()) >= 5, what="five scheduled backups", timeout=60)
    for host in hosts:
        host.stop()
    done = taken()
    dues = [due for due, _ in done]
    files = sorted(str(p) for n in (0, 1) for p in (tmp_path / f"backups-{n}").glob("storyart-backup-*.zip"))
    assert len(set(dues)) == len(dues), done  # never two backups for one due time
    assert sorted(file for _, file in done) == files  # and no backup the logs do not show
    seconds = sorted(int(time.mktime(time.strptime(due[:19], "%Y-%m-%dT%H:%M:%S"))) for due in dues)
    assert all(b - a == 2 for a, b in zip(seconds, seconds[1:], strict=False)), dues  # none skipped
    assert all(f"{Path(file).name}.sha256" in objects(s3, "schedule") for file in files)  # each one off-site


@pytest.mark.slow
def test_a_due_time_missed_while_stopped_is_taken_once_at_the_next_start(service, tmp_path, session_10kb) -> None:
    """Due at three seconds of every minute, the first while the service is stopped: the next start takes that
    one once, then the two others, though three gunicorn workers (no Redis: their claims meet in the host's
    SQLite file) all find the first missed and all wake for the others."""
    start = time.time()
    second = int(start + 12) % 60
    seconds = [second, (second + 6) % 60, (second + 8) % 60]
    env = {"BACKUP_SCHEDULE": f"* * * * * {','.join(map(str, sorted(seconds)))}", "REDIS_URL": "",
           "BACKUP_DIR": str(tmp_path / "backups"), "LOCAL_STORE_PATH": str(tmp_path / "store.sqlite3"),
           "WEB_CONCURRENCY": "3"}
    first = service("gunicorn", **env)
    assert request(first.port, "POST", "/api/v1/session/save", session_10kb, test_backup.JSON).status == 200
    health = request(first.port, "GET", "/health").json()
    assert health["lastBackup"] is None and health["nextBackup"].endswith(f":{second:02d}.000Z")
    first.stop()
    assert time.time() < start + 11.5, "the machine was too slow to stop before the due time"
    wait_for(lambda: time.time() > start + 13, what="the due time to pass", timeout=15)
    assert not (tmp_path / "backups").exists()
    again = service("gunicorn", **env)
    wait_for(lambda: len(scheduled(again.log())) >= 1, what="the missed backup")
    assert again.log().count("was missed while the service was not running: taking it now") == 1
    last = request(again.port, "GET", "/health").json()["lastBackup"]
    assert last["verified"] and last["error"] is None and last["sessions"] == 1
    assert last["due"].endswith(f":{second:02d}.000Z") and last["where"] == [scheduled(again.log())[0][1]]
    wait_for(lambda: len(scheduled(again.log())) >= 3, what="the two later backups", timeout=20)
    again.stop()
    taken = scheduled(again.log())
    assert [int(due[17:19]) for due, _ in taken] == seconds, taken
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == sorted(Path(file).name for _, file in taken)


@pytest.mark.slow
def test_the_history_page_shows_the_last_backup_beside_the_backup_button(tab: Tab, service, s3,  # noqa: F811
                                                                        tmp_path, session_10kb) -> None:
    from playwright.sync_api import expect

    env = {"REDIS_URL": "", "BACKUP_SCHEDULE": "* * * * * */2", "BACKUP_DIR": str(tmp_path / "backups"),
           **s3.env("page")}
    for endpoint, shown in ((s3.endpoint, r"Last backup .*: 1 session, verified off-site\. Next: "),
                            (f"http://127.0.0.1:{free_port()}", r"Last backup \(.*\) failed: storyart-backup-\S+ is "
                                                                r"only in \S+, not off-site: cannot list s3://")):
        site = service("app", **{**env, "BACKUP_S3_ENDPOINT": endpoint})
        assert request(site.port, "POST", "/api/v1/session/save", session_10kb, test_backup.JSON).status == 200
        wait_for(lambda site=site: scheduled(site.log()), what="a scheduled backup")
        tab.page.goto(f"http://127.0.0.1:{site.port}/")
        expect(tab.page.locator("#backup-status")).to_have_text(re.compile(shown))
        site.stop()
