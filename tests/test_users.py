"""The users file (users.py) and its CLI: real files, real second processes, real concurrent writers."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import users as users_cli
from config import ConfigError
from servers import ROOT, wait_for
from users import DEFAULT, NAME, Users

CLI = [sys.executable, "-c", "from cli import users; users()"]


def run_cli(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The users CLI in a process of its own, in `folder` (its `.env` is the service's), as an operator runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("USERS_FILE", None)
    return subprocess.run([*CLI, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=60)


def test_a_missing_or_empty_file_means_no_users(tmp_path: Path) -> None:
    people = Users.open(tmp_path / "none" / "users.json")
    assert not people.any() and people.all() == [] and people.by_token("x" * 43) is None
    (tmp_path / "empty.json").write_text("")
    assert not Users.open(tmp_path / "empty.json").any()


def test_a_token_names_its_user_and_the_file_keeps_only_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "instance" / "users.json"
    people = Users.open(path)
    alice, token = people.add("Alice", max_sessions=5)
    assert (alice.name, alice.key, alice.max_sessions, alice.max_bytes, alice.has_token) == ("Alice", "alice", 5,
                                                                                            None, True)
    assert len(token) >= 43 and people.any() and people.by_token(token) == alice
    assert people.by_token(token[:-1] + ("A" if token[-1] != "A" else "B")) is None and people.by_token("") is None
    text = path.read_text()
    assert token not in text and hashlib.sha256(token.encode()).hexdigest() in text
    record = json.loads(text)["users"]["alice"]
    assert record["name"] == "Alice" and record["maxSessions"] == 5 and record["maxBytes"] is None
    assert isinstance(record["createdAt"], int) and abs(record["createdAt"] - time.time() * 1000) < 60_000
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
    assert Users.open(path).by_token(token) == alice  # another reader of the same file


def test_names_are_checked_and_compared_without_case(tmp_path: Path) -> None:
    people = Users.open(tmp_path / "users.json")
    for bad in ["", "a b", "ünïcode", "x" * 65, "a/b", "a:b", "tab\t", "new\nline"]:
        with pytest.raises(ValueError, match=r"invalid: use 1-64 characters of A-Z a-z 0-9 \. _ @ \+ -"):
            people.add(bad)
        with pytest.raises(ValueError, match="invalid"):
            people.ensure(bad)
        assert people.by_name(bad) is None
    for reserved in [DEFAULT, "Default", "DEFAULT"]:
        with pytest.raises(ValueError, match="the default user's name"):
            people.add(reserved)
        with pytest.raises(ValueError, match="the default user's name"):
            people.ensure(reserved)
    longest = "a.b_c@d+e-" + "Z" * 54
    assert NAME.fullmatch(longest) and people.add(longest)[0].key == longest.lower()
    people.add("Bob")
    with pytest.raises(ValueError, match="a user named 'Bob' already exists"):
        people.add("BOB")
    assert people.by_name("bOb").name == "Bob" and people.ensure("BOB").name == "Bob"
    assert [u.key for u in people.all()] == sorted([longest.lower(), "bob"])


def test_ensure_creates_a_proxy_user_once_and_without_a_token(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    people = Users.open(path)
    carol = people.ensure("Carol@example.org")
    assert carol.key == "carol@example.org" and not carol.has_token and not carol.revoked and people.any()
    created = json.loads(path.read_text())["users"]["carol@example.org"]["createdAt"]
    assert people.ensure("CAROL@example.org") == carol
    assert json.loads(path.read_text())["users"]["carol@example.org"]["createdAt"] == created
    assert Users.open(path).by_name("carol@example.org") == carol


def test_rotate_and_revoke(tmp_path: Path) -> None:
    people = Users.open(tmp_path / "users.json")
    _, first = people.add("dave")
    second = people.rotate("DAVE")
    assert people.by_token(first) is None and people.by_token(second).key == "dave"
    people.revoke("dave")
    dave = people.by_name("dave")
    assert people.by_token(second) is None and not dave.has_token and dave.revoked and people.any()
    third = people.rotate("dave")
    assert people.by_token(third).revoked is False
    with pytest.raises(ValueError, match="no user named 'eve'"):
        people.revoke("eve")
    with pytest.raises(ValueError, match="no user named 'eve'"):
        people.rotate("eve")


def test_quota_overrides(tmp_path: Path) -> None:
    people = Users.open(tmp_path / "users.json")
    people.add("erin", max_bytes=0)
    assert (people.by_name("erin").max_sessions, people.by_name("erin").max_bytes) == (None, 0)
    people.set_quota("erin", max_sessions=10, max_bytes=None)
    assert (people.by_name("erin").max_sessions, people.by_name("erin").max_bytes) == (10, None)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="max_sessions must be a whole number"):
            people.set_quota("erin", max_sessions=bad, max_bytes=None)


def test_fields_this_version_does_not_know_survive_a_change(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"version": 7, "users": {"frank": {"name": "Frank", "tokenSha256": None,
                                                                   "theme": "dark", "createdAt": 1}}}))
    Users.open(path).add("gina")
    saved = json.loads(path.read_text())
    assert saved["version"] == 7 and saved["users"]["frank"]["theme"] == "dark" and "gina" in saved["users"]


@pytest.mark.parametrize(("content", "problem"), [
    ("{not json", "is not valid JSON"),
    ("[]", 'must hold an object {"users": {...}}'),
    ('{"users": []}', 'must hold an object {"users": {...}}'),
    ('{"users": {"a": 1}}', "user 'a' must be an object"),
    ('{"users": {"a": {"name": "B"}}}', "the name must be 1-64 characters"),
    ('{"users": {"a b": {"name": "a b"}}}', "the name must be 1-64 characters"),
    ('{"users": {"a": {"name": "a", "tokenSha256": "secret-token-in-the-clear"}}}', "tokenSha256 must be null or 64"),
    ('{"users": {"a": {"name": "a", "maxBytes": -1}}}', "maxBytes must be null or a whole number"),
    ('{"users": {"a": {"name": "a", "maxSessions": "5"}}}', "maxSessions must be null or a whole number"),
    ('{"users": {"a": {"tokenSha256": "' + "0" * 64 + '"}, "b": {"tokenSha256": "' + "0" * 64 + '"}}}',
     "have the same token hash"),
])
def test_an_unusable_file_is_one_line_naming_users_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "users.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as raised:
        Users.open(path)
    message = str(raised.value)
    assert message.startswith(f"USERS_FILE: {str(path)!r}") and problem in message and "\n" not in message
    assert "secret-token-in-the-clear" not in message


def test_a_folder_or_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^USERS_FILE: .* is a folder, not a file$"):
        Users.open(tmp_path)
    path = tmp_path / "users.json"
    path.write_text('{"users": {}}')
    path.chmod(0)
    if os.name == "posix" and os.geteuid() != 0:  # root reads it anyway
        with pytest.raises(ConfigError, match=r"^USERS_FILE: cannot read .*users\.json.* \(Permission denied\)$"):
            Users.open(path)


def test_a_file_broken_while_running_fails_closed(tmp_path: Path) -> None:
    """A hand edit that leaves bad JSON: the tokens stop working (an error the caller answers 503), not the old ones."""
    path = tmp_path / "users.json"
    people = Users.open(path)
    _, token = people.add("hank")
    path.write_text('{"users": {"hank": ')
    with pytest.raises(ConfigError, match="is not valid JSON"):
        people.by_token(token)
    path.unlink()
    assert people.by_token(token) is None and not people.any()


def test_a_revoke_in_another_process_is_seen_by_the_next_lookup(tmp_path: Path) -> None:
    """The CLI revokes, rotates and adds in processes of their own; a running service's Users sees each at once."""
    (tmp_path / ".env").write_text("USERS_FILE=shared/users.json\n")
    people = Users.open(tmp_path / "shared" / "users.json")
    _, token = people.add("ida")
    assert people.by_token(token).key == "ida"
    done = run_cli(tmp_path, "revoke", "IDA")
    assert done.returncode == 0, done.stderr
    assert people.by_token(token) is None and people.by_name("ida").revoked
    done = run_cli(tmp_path, "rotate", "ida")
    assert done.returncode == 0, done.stderr
    assert people.by_token(done.stdout.splitlines()[-1]).key == "ida" and people.by_token(token) is None
    done = run_cli(tmp_path, "add", "jo")
    assert done.returncode == 0 and "shown once" in done.stdout.splitlines()[-2]
    assert people.by_token(done.stdout.splitlines()[-1]).name == "jo"


ENSURER = """
import sys, time
from pathlib import Path
from users import Users
path, ready, go, names = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
people = Users.open(path)
ready.touch()
deadline = time.monotonic() + 30
while not go.exists() and time.monotonic() < deadline:  # all start together
    time.sleep(0.001)
for name in names:
    people.ensure(name)
"""


def test_concurrent_writers_in_several_processes_lose_nothing(tmp_path: Path) -> None:
    """Four processes meet 30 new proxy users each (10 the same ones, in another case) while the CLI adds one."""
    path = tmp_path / "users.json"
    go = tmp_path / "go"
    shared = [f"Shared{i}" for i in range(10)]
    names = {n: [f"p{n}-user{i}" for i in range(20)] + [s.upper() if n % 2 else s for s in shared] for n in range(4)}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [subprocess.Popen([sys.executable, "-c", ENSURER, str(path), str(tmp_path / f"ready{n}"), str(go),
                                   *names[n]], env=env) for n in names]
    wait_for(lambda: all((tmp_path / f"ready{n}").exists() for n in names), "the writers")
    go.touch()
    (tmp_path / ".env").write_text(f"USERS_FILE={path}\n")
    added = run_cli(tmp_path, "add", "kim")
    assert [p.wait(timeout=60) for p in processes] == [0, 0, 0, 0] and added.returncode == 0, added.stderr
    expected = {n.casefold() for group in names.values() for n in group} | {"kim"}
    assert {u.key for u in Users.open(path).all()} == expected and len(expected) == 4 * 20 + 10 + 1
    assert Users.open(path).by_token(added.stdout.splitlines()[-1]).key == "kim"


def test_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """add prints the token alone on the last line; list shows names, token states and quotas, never a hash."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    env = {"USERS_FILE": str(tmp_path / "people.json"), "USER_MAX_BYTES": "1000000"}
    added = runner.invoke(users_cli, ["add", "Lee", "--max-sessions", "3"], env=env)
    assert added.exit_code == 0, added.output
    token = added.output.splitlines()[-1]
    assert token.strip() == token and len(token) == 43 and "shown once" in added.output.splitlines()[-2]
    assert Users.open(tmp_path / "people.json").by_token(token).name == "Lee"
    runner.invoke(users_cli, ["add", "max"], env=env)
    runner.invoke(users_cli, ["revoke", "max"], env=env)
    Users.open(tmp_path / "people.json").ensure("nia")
    assert runner.invoke(users_cli, ["quota", "nia", "--max-bytes", "0"], env=env).exit_code == 0
    listed = runner.invoke(users_cli, ["list"], env=env)
    assert listed.exit_code == 0
    rows = [line.split() for line in listed.output.splitlines()[1:-1]]
    assert rows == [["Lee", "set", "3", "1000000*"], ["max", "revoked", "none*", "1000000*"],
                    ["nia", "none", "none*", "none"]]
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert digest not in listed.output and digest[:8] not in listed.output
    rotated = runner.invoke(users_cli, ["rotate", "LEE"], env=env)
    assert rotated.exit_code == 0 and Users.open(tmp_path / "people.json").by_token(token) is None
    assert Users.open(tmp_path / "people.json").by_token(rotated.output.splitlines()[-1]).name == "Lee"


@pytest.mark.parametrize(("args", "line"), [
    (["add", "a b"], "Error: user name 'a b' is invalid: use 1-64 characters of A-Z a-z 0-9 . _ @ + - "
                     "(not . or .. alone)"),
    (["add", "Default"], "Error: 'default' is the default user's name (the one API_TOKEN names); choose another"),
    (["add", "oz"], "Error: a user named 'oz' already exists"),
    (["revoke", "pat"], "Error: no user named 'pat'"),
    (["rotate", "pat"], "Error: no user named 'pat'"),
    (["quota", "oz", "--max-sessions", "many"], "Error: --max-sessions: expected a whole number of 0 or more, "
                                                "or `setting`, got 'many'"),
])
def test_a_refused_command_says_why_in_one_line(tmp_path: Path, monkeypatch, args: list[str], line: str) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"USERS_FILE": str(tmp_path / "users.json")}
    Users.open(tmp_path / "users.json").add("oz")
    before = (tmp_path / "users.json").read_bytes()
    done = CliRunner().invoke(users_cli, args, env=env)
    assert done.exit_code == 1 and done.output.strip().splitlines() == [line]
    assert (tmp_path / "users.json").read_bytes() == before


def test_a_bad_file_or_setting_stops_the_cli_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "users.json").write_text("{")
    (tmp_path / ".env").write_text("USERS_FILE=users.json\n")
    done = run_cli(tmp_path, "list")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "storyart: configuration error: USERS_FILE: 'users.json' is not valid JSON (Expecting property name enclosed "
        "in double quotes: line 1 column 2 (char 1))"]
    (tmp_path / ".env").write_text("USERS_FILE=users.json\nUSER_MAX_SESSIONS=-1\n")
    done = run_cli(tmp_path, "add", "quinn")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "storyart: configuration error: USER_MAX_SESSIONS: must be between 0 and 1e+08, got '-1'"]


def test_what_a_lookup_costs(tmp_path: Path) -> None:
    """Printed, not asserted (the machine is shared): a `by_token` with 100 users, against the ~1 ms of a request."""
    people = Users.open(tmp_path / "users.json")
    tokens = [people.add(f"user{i}")[1] for i in range(100)]
    rounds = 20_000
    started = time.perf_counter()
    for i in range(rounds):
        people.by_token(tokens[i % 100])
    lookup = (time.perf_counter() - started) / rounds
    started = time.perf_counter()
    for _ in range(rounds):
        os.stat(people.path)
    print(f"\nby_token: {lookup * 1e6:.2f} us per lookup (os.stat alone: "
          f"{(time.perf_counter() - started) / rounds * 1e6:.2f} us)")
