"""A hardened Redis: the service needs no key outside `storyart:*` and no dangerous command, so an ACL user
limited to exactly that runs it (saves, reads, lists, deletes, the write-back and the index rebuild)."""

from __future__ import annotations

import orjson
import pytest
from chaos import session

from servers import request, save_request, wait_for

pytestmark = pytest.mark.slow

ACL_USER = "storyart on >s3cret-for-tests ~storyart:* resetchannels +@all -@dangerous"


def test_an_acl_user_limited_to_storyart_keys_is_enough(service, own_redis) -> None:
    redis_server = own_redis("--user", *ACL_USER.split())
    url = f"redis://storyart:s3cret-for-tests@127.0.0.1:{redis_server.port}/0"
    server = service("app", REDIS_URL=url, REDIS_RETRY_INTERVAL="0.3")
    saved = [save_request(server.port, session(f"acl-{i}")).json() for i in range(3)]
    assert {s["storage"] for s in saved} == {"redis"}
    latest = request(server.port, "GET", "/api/v1/session/latest").json()
    assert latest["storage"] == "redis" and latest["data"]["storyUuid"] == "acl-2"
    listed = request(server.port, "GET", "/api/v1/session/list?view=summary").json()
    assert [s["storyUuid"] for s in listed["sessions"]] == ["acl-2", "acl-1", "acl-0"]
    assert request(server.port, "DELETE", f"/api/v1/session/{saved[0]['timestamp']}").status == 200
    admin = redis_server.client()  # the default user, for what a tool or an accident does
    admin.delete("storyart:sessions:index")
    assert request(server.port, "GET", "/api/v1/session/latest").json()["data"]["storyUuid"] == "acl-2"
    redis_server.kill()
    pending = save_request(server.port, session("pending")).json()
    assert pending["storage"] == "memory"
    redis_server.start("--user", *ACL_USER.split())
    wait_for(lambda: request(server.port, "GET", "/health").json()["localStore"]["sessions"] == 0,
             what="write-back as the ACL user")
    assert orjson.loads(redis_server.client().get(pending["sessionKey"]))["storyUuid"] == "pending"
    health = request(server.port, "GET", "/health").json()
    assert health["redis"] == "connected" and "NOPERM" not in server.log() and "NoPermission" not in server.log()
