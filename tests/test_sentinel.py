"""Redis Sentinel (docs/high-availability.md): the service finds the master through three real Sentinels,
never keeps a save that only the master holds (`REDIS_WAIT_REPLICAS`), follows a switchover without a restart
(a `READONLY` reply sends saves to the local store until the new master is known, then they are written back),
and the start-up checks of the master work through the Sentinels. The data nodes run with an ACL user limited to
`storyart:*`, the Sentinels with a password. The failover under load is `tests/test_failover.py`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from chaos import session

from config import Config, ConfigError
from servers import ROOT, SentinelGroup, request, save_request, wait_for
from stores.base import StorageBusy
from stores.redis import RedisStore

ACL_USER = "storyart on >node-secret ~storyart:* resetchannels +@all -@dangerous"
SENTINEL_PASSWORD = "sentinel-secret"


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """One master, one replica, three Sentinels, shared by this module's tests (each asks who is master)."""
    started = SentinelGroup(tmp_path_factory.mktemp("sentinel"), node_flags=("--user", *ACL_USER.split()),
                            sentinel_password=SENTINEL_PASSWORD).start()
    yield started
    started.kill_all()


def sentinel_env(group: SentinelGroup, **extra: str) -> dict[str, str]:
    return {"REDIS_SENTINELS": group.addresses, "REDIS_SENTINEL_MASTER": group.name,
            "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD, "REDIS_URL": "redis://storyart:node-secret@/0",
            "REDIS_RETRY_INTERVAL": "0.3", "REDIS_CONNECT_TIMEOUT": "0.5", **extra}


def health(port: int) -> dict:
    return request(port, "GET", "/health").json()


def saved_bytes(port: int, timestamp: int) -> bytes:
    """The session as the API returns it (the `data` member, spliced in verbatim)."""
    body = request(port, "GET", f"/api/v1/session/{timestamp}").body
    return body[len(b'{"success":true,"data":'): body.rindex(b',"storage":')]


@pytest.mark.slow
def test_saves_go_to_the_master_the_sentinels_name_and_a_replica_has_each_before_it_is_acknowledged(
        group, service) -> None:
    master = group.master()
    replica = next(node for node in group.nodes if node is not master)
    master.client().flushall()
    server = service("app", **sentinel_env(group))
    assert health(server.port)["redisMaster"] == f"127.0.0.1:{master.port}"
    ready = request(server.port, "GET", "/health/ready").json()
    assert ready["ready"] and ready["redisMaster"] == f"127.0.0.1:{master.port}"
    saved = [save_request(server.port, session(f"s-{i}")).json() for i in range(3)]
    assert {s["storage"] for s in saved} == {"redis"}
    for answer in saved:  # WAIT: on the replica already when the answer came
        assert replica.client().get(answer["sessionKey"]) == master.client().get(answer["sessionKey"]) is not None
    listed = request(server.port, "GET", "/api/v1/session/list?view=summary").json()
    assert [s["storyUuid"] for s in listed["sessions"]] == ["s-2", "s-1", "s-0"]
    assert request(server.port, "DELETE", f"/api/v1/session/{saved[0]['timestamp']}").status == 200
    assert replica.client().get(saved[0]["sessionKey"]) is None  # the delete was confirmed the same way


@pytest.mark.slow
def test_a_switchover_sends_saves_to_the_local_store_until_the_new_master_takes_them(group, service) -> None:
    old = group.master()
    old.client().flushall()
    server = service("app", **sentinel_env(group))
    acknowledged = [save_request(server.port, session("before")).json()]
    assert acknowledged[0]["storage"] == "redis"
    group.sentinels[0].client().sentinel_failover(group.name)
    new = group.promoted(old)
    old.client().replicaof("127.0.0.1", new.port)  # what the Sentinels send it too, after 8-10 s
    where = []

    def saves_reach(node) -> bool:
        answer = save_request(server.port, session(f"during-{len(acknowledged)}"))
        assert answer.status == 200, answer.body  # never a 5xx: the local store takes what Redis cannot
        acknowledged.append(answer.json())
        where.append(answer.json()["storage"])
        return where[-1] == "redis" and health(server.port)["redisMaster"] == f"127.0.0.1:{node.port}"

    wait_for(lambda: saves_reach(new), what="saves to reach the new master")
    assert where[0] == "memory" and "The previous master is now a slave" in server.log()  # its READONLY
    wait_for(lambda: health(server.port)["localStore"]["sessions"] == 0, what="the write-back")
    wait_for(lambda: SentinelGroup.online(old, new), what="the old master to replicate the new one")
    for answer in acknowledged:  # on the new master itself, byte for byte what the API answers
        stored = new.client().get(answer["sessionKey"])
        assert stored == saved_bytes(server.port, answer["timestamp"]), answer
    assert new.client().zcard("storyart:sessions:index") == len(acknowledged)  # each once
    assert health(server.port) | {"redis": "connected"} == health(server.port)


@pytest.mark.slow
def test_without_a_replica_online_saves_go_on_to_the_master_and_health_says_they_are_not_replicated(
        group, service) -> None:
    master = group.master()
    replica = next(node for node in group.nodes if node is not master)
    master.client().flushall()
    server = service("app", **sentinel_env(group))
    assert health(server.port)["replicated"] is True
    replica.kill()
    answers = [save_request(server.port, session(f"alone-{i}")).json() for i in range(3)]
    assert {answer["storage"] for answer in answers} == {"redis"}  # on the master that answers, not held back
    state = health(server.port)
    assert (state["status"], state["redis"], state["storage"], state["replicated"]) == \
        ("healthy", "connected", "redis", False)
    assert any("saves are not replicated (0 of 1 replica(s)" in warning for warning in state["warnings"]), state
    assert request(server.port, "GET", "/health/ready").status == 200
    assert "Redis saves are not replicated" in server.log() and "takes no saves" not in server.log()
    replica.restart(*group.node_flags, "--replicaof", "127.0.0.1", str(master.port))
    wait_for(lambda: health(server.port)["replicated"], what="saves to be replicated again")
    assert "warnings" not in health(server.port) and "Redis saves are replicated again" in server.log()
    for answer in answers:  # the replica's sync brought what the master saved alone
        key = answer["sessionKey"]
        assert replica.client().get(key) == master.client().get(key) == saved_bytes(server.port, answer["timestamp"])
    confirmed = save_request(server.port, session("confirmed")).json()  # and each save waits for it again
    assert replica.client().get(confirmed["sessionKey"]) is not None


@pytest.fixture
def lone_group(tmp_path) -> Iterator[SentinelGroup]:
    """A group of this test's own: its master is killed for good."""
    started = SentinelGroup(tmp_path / "sentinel", node_flags=("--user", *ACL_USER.split()),
                            sentinel_password=SENTINEL_PASSWORD).start()
    yield started
    started.kill_all()


@pytest.mark.slow
@pytest.mark.parametrize("required", [False, True], ids=["default", "replicas-required"])
def test_a_master_killed_for_good_leaves_saves_on_the_promoted_replica_unless_replicas_are_required(
        lone_group, required, service) -> None:
    """Losing one of two data nodes: by default saves go to the promoted replica within seconds, not replicated
    and saying so; with REDIS_REQUIRE_REPLICAS=1 they wait in the local store for a replica that never comes."""
    group = lone_group
    env = sentinel_env(group, WEB_CONCURRENCY="2", **({"REDIS_REQUIRE_REPLICAS": "1"} if required else {}))
    server = service("gunicorn", **env)
    acknowledged = [save_request(server.port, session("before")).json()]
    assert acknowledged[0]["storage"] == "redis"
    old = group.master()
    old.kill()  # -9, and it stays down: no replica is left
    killed = time.monotonic()
    new = group.promoted(old)
    promoted = time.monotonic()
    where: list[str] = []

    def settled(storage: str) -> bool:
        """Whether the last six saves (across both workers) all went to `storage`; never a 5xx meanwhile."""
        answer = save_request(server.port, session(f"after-{len(acknowledged)}"))
        assert answer.status == 200, answer.body
        acknowledged.append(answer.json())
        where.append(answer.json()["storage"])
        return where[-6:] == [storage] * 6

    wait_for(lambda: settled("memory" if required else "redis"), what="saves to settle", timeout=20)
    settled_at = time.monotonic()
    print(f"promoted {promoted - killed:.2f} s after the kill; saves settled on {where[-1]} "
          f"{settled_at - killed:.2f} s after it ({len(where)} saves)")
    state = health(server.port)
    assert state["redisMaster"] == f"127.0.0.1:{new.port}" and state["replicated"] is False
    if required:
        assert (state["status"], state["redis"], state["storage"]) == ("degraded", "refusing writes", "memory")
        assert "(NotReplicated: 0 of 1 replica(s)" in server.log() and "saves are not replicated" not in server.log()
        return
    assert settled_at - promoted < 10  # within seconds of the promotion
    assert (state["status"], state["redis"], state["storage"]) == ("healthy", "connected", "redis")
    assert "Redis saves are not replicated (0 of 1 replica(s)" in server.log()
    wait_for(lambda: health(server.port)["localStore"]["sessions"] == 0, what="the write-back")
    for answer in acknowledged:  # on the new master itself, byte for byte what the API answers, each once
        assert new.client().get(answer["sessionKey"]) == saved_bytes(server.port, answer["timestamp"]), answer
    assert new.client().zcard("storyart:sessions:index") == len(acknowledged)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["app", "gunicorn"])
def test_a_master_that_can_drop_sessions_stops_start_up_through_the_sentinels(group, kind, tmp_path) -> None:
    master = group.master()
    master.client().config_set("maxmemory-policy", "allkeys-lru")
    try:
        env = {**os.environ, **sentinel_env(group), "REDIS_URL": "", "LOCAL_STORE_PATH": str(tmp_path / "s.sqlite3"),
               "REDIS_API_PORT": "1"}  # the default user on the data nodes: it may read INFO and CONFIG
        args = ["app.py"] if kind == "app" else ["-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"]
        done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    finally:
        master.client().config_set("maxmemory-policy", "noeviction")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("storyart: configuration error: REDIS_SENTINELS: this Redis cannot keep sessions")
    assert "allkeys-lru" in lines[0]


@pytest.mark.slow
def test_a_master_name_the_sentinels_do_not_know_counts_as_redis_down(group, service) -> None:
    server = service("app", **sentinel_env(group, REDIS_SENTINEL_MASTER="no-such-master"))
    ready = request(server.port, "GET", "/health/ready")
    assert ready.status == 503 and ready.json()["redisMaster"] is None
    assert save_request(server.port, session("nowhere")).json()["storage"] == "memory"
    assert "No master found for 'no-such-master'" in server.log()


@pytest.mark.slow
def test_a_request_waits_for_a_busy_sentinel_pool_and_then_gets_busy_not_a_redis_error(group) -> None:
    """Through the Sentinels, as without them: a request waits REDIS_POOL_TIMEOUT for a free connection, then
    gets `StorageBusy` (a 503 for it alone), which no caller takes for a Redis that is down."""
    env = sentinel_env(group, REDIS_MAX_CONNECTIONS="1", REDIS_POOL_TIMEOUT="0.2")
    store = RedisStore.from_config(Config.from_env(env, None))
    try:
        store.latest()  # the one connection, free again after the request
        held = store.client.connection_pool.get_connection()
        started = time.monotonic()
        with pytest.raises(StorageBusy, match=r"its 1 Redis connection\(s\) .* stayed in use for 0.2 s"):
            store.latest()
        assert time.monotonic() - started >= 0.2
        store.client.connection_pool.release(held)
        store.latest()
    finally:
        store.close()


SENTINELS = "127.0.0.1:26379,[::1]:26380,sentinel.internal:26381"


def test_sentinel_settings_are_read() -> None:
    config = Config.from_env({"REDIS_SENTINELS": f" {SENTINELS} ", "REDIS_SENTINEL_MASTER": "storyart",
                              "REDIS_SENTINEL_USERNAME": "watcher", "REDIS_SENTINEL_PASSWORD": "p w",
                              "REDIS_URL": "rediss://storyart:secret@/2"}, None)
    assert config.redis_sentinels == (("127.0.0.1", 26379), ("::1", 26380), ("sentinel.internal", 26381))
    assert (config.redis_sentinel_master, config.redis_sentinel_username) == ("storyart", "watcher")
    assert config.redis_sentinel_password == "p w" and "p w" not in repr(config)
    assert config.redis_configured and config.redis_setting == "REDIS_SENTINELS"
    assert config.redis_wait_replicas == 1  # with Sentinel, a save waits for one replica unless told otherwise
    assert not config.redis_require_replicas  # ... and is kept without it, unless the operator says otherwise
    assert Config.from_env({"REDIS_SENTINELS": SENTINELS, "REDIS_SENTINEL_MASTER": "m",
                            "REDIS_REQUIRE_REPLICAS": "1"}, None).redis_require_replicas
    assert Config.from_env({"REDIS_SENTINELS": SENTINELS, "REDIS_SENTINEL_MASTER": "m"}, None).redis_url is None
    assert Config.from_env({"REDIS_URL": "redis://h:1/0"}, None).redis_wait_replicas == 0


@pytest.mark.parametrize(("env", "message"), [
    ({"REDIS_SENTINELS": "127.0.0.1"}, "REDIS_SENTINELS: expected host:port"),
    ({"REDIS_SENTINELS": "127.0.0.1:0"}, "REDIS_SENTINELS: expected host:port"),
    ({"REDIS_SENTINELS": "::1:26379"}, "REDIS_SENTINELS: expected host:port"),
    ({"REDIS_SENTINELS": "bad host:1"}, "REDIS_SENTINELS: expected host:port"),
    ({"REDIS_SENTINELS": "a:1,a:1"}, "REDIS_SENTINELS: 'a:1' is listed twice"),
    ({"REDIS_SENTINELS": "a:1"}, "REDIS_SENTINEL_MASTER: required with REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "a:1", "REDIS_SENTINEL_MASTER": "two words"}, "REDIS_SENTINEL_MASTER: must be one word"),
    ({"REDIS_SENTINEL_MASTER": "storyart"}, "REDIS_SENTINEL_MASTER: set, but REDIS_SENTINELS is not"),
    ({"REDIS_SENTINEL_PASSWORD": "x"}, "REDIS_SENTINEL_PASSWORD: set, but REDIS_SENTINELS is not"),
    ({"REDIS_SENTINELS": "a:1", "REDIS_SENTINEL_MASTER": "m", "REDIS_URL": "redis://10.0.0.5:6379/0"},
     "REDIS_URL: names a host, but with REDIS_SENTINELS the Sentinels name the master"),
    ({"REDIS_SENTINELS": "a:1", "REDIS_SENTINEL_MASTER": "m", "REDIS_URL": "unix:///run/redis.sock"},
     "REDIS_URL: names a host"),
    ({"REDIS_SENTINELS": "a:1", "REDIS_SENTINEL_MASTER": "m", "REDIS_HOST": "cache"},
     "REDIS_HOST: contradicts REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "a:1", "REDIS_SENTINEL_MASTER": "m", "REDIS_WAIT_REPLICAS": "-1"},
     "REDIS_WAIT_REPLICAS: must be between 0 and 16"),
    ({"REDIS_URL": "redis://h:1/0?ssl_ca_cert=/x"}, "REDIS_URL: unknown option 'ssl_ca_cert'"),
    ({"REDIS_SENTINELS": "a:1", "REDIS_SENTINEL_MASTER": "m", "REDIS_REQUIRE_REPLICAS": "yes please"},
     "REDIS_REQUIRE_REPLICAS: expected 1 or 0"),
    ({"REDIS_SENTINELS": "a:1", "REDIS_SENTINEL_MASTER": "m", "REDIS_WAIT_REPLICAS": "0",
      "REDIS_REQUIRE_REPLICAS": "1"}, "REDIS_REQUIRE_REPLICAS: set, but REDIS_WAIT_REPLICAS is 0"),
    ({"REDIS_URL": "redis://h:1/0", "REDIS_REQUIRE_REPLICAS": "1"},
     "REDIS_REQUIRE_REPLICAS: set, but REDIS_WAIT_REPLICAS is 0"),
])
def test_a_bad_sentinel_setting_is_one_line_naming_it(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env(env, dotenv_path=None)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value), raised.value
