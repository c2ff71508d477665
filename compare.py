"""Compare two sessions for the history page.

What changed from one session to another, for `GET /api/v1/session/<a>/compare/<b>`: two parsed sessions
in, a JSON-able report out (no storage, no HTTP), so the history page can show what a re-analysis changed.

The report follows the session's shape (see docs/api.md): the top-level fields, the
script text as line counts (a line diff, `line_diff`), the fields of `episodeContext` (a JSON document kept in a
string), `analyzedEpisode`'s own fields, its scenes (matched by `sceneNumber`, or by position when they have
none) and their beats (matched by `beatId` across scenes, so a beat moved to another scene is one change, not a
removal and an addition), with each changed beat's prompt text before and after. Sessions other tools wrote may
lack any of these parts: a missing or mistyped part compares as empty, never as an error.

The work is bounded whatever the sessions hold (docs/contract.md §1): `Budget` refuses pairs whose bytes or JSON
values would cost a worker more than about 100 MB, everything else here is linear in them but the line diff,
whose exact part stops after a fixed number of steps (a coarser diff then gives the counts, `exact: false`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from payload import count_values

# Parts reported in their own sections, not among the top-level fields; `timestamp` always differs.
OWN_SECTIONS = frozenset({"scriptText", "episodeContext", "analyzedEpisode", "timestamp"})
BEAT_DEPTH = 3  # a beat's changes are named down to `prompts.<format>.<field>`
CONTEXT_DEPTH = 2  # `episodeContext`'s down to `episode.<field>`
SCENE_DEPTH = 2  # a scene's down to `metadata.<field>`
BYTES_PER_VALUE = 32  # a pair may hold one JSON value per 32 bytes of the budget (real sessions: ~1 per 35)
SCRIPT_MAX_LINES = 100_000  # a side with more lines is counted, not diffed (a line costs ~100 bytes in the diff)
DIFF_STEPS = 500_000  # the exact line diff's work (~0.2 s of CPU; about 1,000 lines changed); past it, a coarser diff
RUN = 32  # lines the exact diff compares at once along a run of equal lines
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # where `str.splitlines` splits (and "\r\n")


class TooLarge(ValueError):
    """The two sessions would cost more than the compare's budget; the message says what and by how much."""


@dataclass
class Budget:
    """Bound how much parsing one compare may cost.

    What one compare may parse: at most `max_bytes` (COMPARE_MAX_BYTES) of the two sessions, and at most one
    JSON value per `BYTES_PER_VALUE` of that, the values of `episodeContext` (a document in a string) included.

    Parsing costs a worker about 2.5 bytes per byte of real sessions, but 40-200 per JSON value of sessions made
    of little else (empty beats, keys): counting both, before parsing, keeps any pair within the budget under
    about 100 MB and 2 s, and refuses the rest (`TooLarge`) before it costs anything but the count."""

    max_bytes: int
    values: int = 0  # counted so far

    @property
    def max_values(self) -> int:
        return self.max_bytes // BYTES_PER_VALUE

    def take(self, documents: Sequence[bytes], what: str) -> None:
        """Count `documents` (`what` names them in the message) against the budget, or raise `TooLarge`."""
        size = sum(len(document) for document in documents)
        if size > self.max_bytes:
            raise TooLarge(f"{what} hold {size:,} bytes, more than the {self.max_bytes:,} a compare takes "
                           "(COMPARE_MAX_BYTES)")
        for document in documents:
            self.values += count_values(document, stop_above=self.max_values - self.values)
            if self.values > self.max_values:
                raise TooLarge(f"{what} hold more than {self.max_values:,} JSON values, the most a compare takes "
                               f"(one per {BYTES_PER_VALUE} bytes of COMPARE_MAX_BYTES)")


@dataclass
class Changes:
    """Dotted paths of what was added, removed or changed between two JSON objects."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def report(self) -> dict[str, list[str]]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed}


def compare(before: dict[str, Any], after: dict[str, Any], budget: Budget | None = None) -> dict[str, Any]:
    """Report what changed between two parsed sessions.

    The report of what changed from `before` to `after` (both parsed sessions); `identical` is true when
    nothing but the timestamp differs (the order of scenes or beats included, which the sections do not
    report). `budget`, when given, holds what parsing the sessions took: the `episodeContext` documents are
    parsed only within what is left (else `TooLarge`)."""
    context = _context(before.get("episodeContext"), after.get("episodeContext"), budget)
    fields = diff_fields(before, after, depth=1, skip=OWN_SECTIONS)
    script = _script(before.get("scriptText"), after.get("scriptText"))
    episode_before, episode_after = _object(before.get("analyzedEpisode")), _object(after.get("analyzedEpisode"))
    episode = diff_fields(episode_before, episode_after, depth=2, skip=frozenset({"scenes"}))
    scenes_before, scenes_after = _scenes(episode_before), _scenes(episode_after)
    scenes = _compare_scenes(scenes_before, scenes_after)
    beats = _compare_beats(_beats(scenes_before), _beats(scenes_after))
    return {
        "identical": _without_timestamp(before) == _without_timestamp(after),
        "fields": fields.report(),
        "scriptText": script,
        "episodeContext": context,
        "episode": episode.report(),
        "scenes": scenes,
        "beats": beats,
    }


def diff_fields(before: Any, after: Any, *, depth: int, skip: frozenset[str] = frozenset(),
                prefix: str = "") -> Changes:
    """List the dotted paths at which two objects differ.

    The differences of two objects as dotted paths, descending into objects present on both sides at most
    `depth` levels; anything else (a list, a string) that differs is one changed path."""
    changes = Changes()
    if before == after:
        return changes
    for name in before.keys() | after.keys():
        if name in skip:
            continue
        path = f"{prefix}{name}"
        if name not in after:
            changes.removed.append(path)
        elif name not in before:
            changes.added.append(path)
        elif before[name] != after[name]:
            old, new = before[name], after[name]
            if depth > 1 and isinstance(old, dict) and isinstance(new, dict):
                inner = diff_fields(old, new, depth=depth - 1, prefix=f"{path}.")
                changes.added += inner.added
                changes.removed += inner.removed
                changes.changed += inner.changed
            else:
                changes.changed.append(path)
    for paths in (changes.added, changes.removed, changes.changed):
        paths.sort()
    return changes


def _script(before: Any, after: Any) -> dict[str, Any]:
    """Compare the script texts of two sessions by line counts.

    Line counts: how many lines each side has, and how many a line diff adds and removes (`exact` when they
    are the fewest possible; else those of a coarser diff, never fewer than the fewest)."""
    old, new = _text(before), _text(after)
    lines_before, lines_after = line_count(old), line_count(new)
    if old == new:
        diff = LineDiff(0, 0, exact=True)
    elif max(lines_before, lines_after) > SCRIPT_MAX_LINES:  # every line replaced: a diff, if the coarsest
        diff = LineDiff(lines_after, lines_before, exact=False)
    else:
        diff = line_diff(old.splitlines(), new.splitlines())
    return {"changed": old != new, "linesBefore": lines_before, "linesAfter": lines_after,
            "linesAdded": diff.added, "linesRemoved": diff.removed, "exact": diff.exact}


def line_count(text: str) -> int:
    """`len(text.splitlines())` without making the lines (a script may have millions of them)."""
    breaks = sum(text.count(mark) for mark in LINE_BREAKS) - text.count("\r\n")
    return breaks + (1 if text and text[-1] not in LINE_BREAKS else 0)


@dataclass(frozen=True, slots=True)
class LineDiff:
    added: int
    removed: int
    exact: bool  # the fewest lines added and removed (a longest common subsequence); else a coarser diff's


def line_diff(old: Sequence[str], new: Sequence[str], steps: int = DIFF_STEPS) -> LineDiff:
    """Count the lines a diff adds and removes, in bounded time.

    How many lines a diff from `old` to `new` adds and removes: the fewest possible (Myers' O(ND) algorithm)
    when that takes at most `steps` steps, else those of a diff that keeps the lines unique on both sides in
    order (patience diff's anchors, O(n log n)); either way linear in memory.

    Lines found on one side only are added or removed whatever the diff, so only the others are diffed: two
    unrelated scripts cost a pass over their lines. Thousands of short lines repeated in another order (a
    quadratic case for difflib: 80,000 of them took 48 s) end within `steps`."""
    canonical: dict[str, str] = {}  # one object per distinct line: equal lines are then identical, fast to compare
    old = [canonical.setdefault(line, line) for line in old]
    new = [canonical.setdefault(line, line) for line in new]
    in_old, in_new = set(old), set(new)
    shared_old = [line for line in old if line in in_new]
    shared_new = [line for line in new if line in in_old]
    distance = _edit_distance(shared_old, shared_new, steps)
    if distance is None:
        common, exact = _anchored_common(shared_old, shared_new), False
    else:
        common, exact = (len(shared_old) + len(shared_new) - distance) // 2, True
    return LineDiff(len(new) - common, len(old) - common, exact)


def _edit_distance(a: list[str], b: list[str], steps: int) -> int | None:
    """Compute the exact line edit distance, if it fits within a step budget.

    The fewest lines to add and remove to turn `a` into `b` (E. Myers, "An O(ND) difference algorithm and
    its variations", 1986: the furthest reaching path of each diagonal, one more edit per round), or None
    when that needs more than `steps` steps (diagonals visited, runs of `RUN` equal lines, and single ones)."""
    n, m = len(a), len(b)
    if not n or not m:
        return n + m
    offset = n + m + 1
    furthest = [0] * (2 * offset + 1)  # by diagonal k = x - y, shifted by `offset`: the furthest x reached
    for distance in range(n + m + 1):
        for k in range(-distance, distance + 1, 2):
            if k == -distance or (k != distance and furthest[offset + k - 1] < furthest[offset + k + 1]):
                x = furthest[offset + k + 1]  # down from diagonal k + 1: a line added
            else:
                x = furthest[offset + k - 1] + 1  # right from diagonal k - 1: a line removed
            y = x - k
            if x < n and y < m and a[x] is b[y]:
                while x + RUN <= n and y + RUN <= m and a[x : x + RUN] == b[y : y + RUN]:
                    x, y, steps = x + RUN, y + RUN, steps - 1
                run_end = x
                while x < n and y < m and a[x] is b[y]:
                    x, y = x + 1, y + 1
                steps -= x - run_end
            furthest[offset + k] = x
            if x >= n and y >= m:
                return distance
        steps -= distance + 1
        if steps < 0:
            return None
    return n + m


def _anchored_common(a: list[str], b: list[str]) -> int:
    """Estimate the longest common subsequence of two line lists from their unique lines.

    The length of a common subsequence of `a` and `b` found in O(n log n): the lines found once on each side,
    the longest run of them in the same order on both, and the equal lines around each of them."""
    count_a, count_b = Counter(a), Counter(b)
    where_b = {line: j for j, line in enumerate(b) if count_b[line] == 1}
    pairs = [(i, where_b[line]) for i, line in enumerate(a) if count_a[line] == 1 and line in where_b]
    tails: list[int] = []  # the longest increasing run of `where_b` positions, patience sorting's piles
    tops: list[int] = []  # per pile, the index in `pairs` on top of it
    previous = [-1] * len(pairs)
    for index, (_, j) in enumerate(pairs):
        pile = bisect_left(tails, j)
        previous[index] = tops[pile - 1] if pile else -1
        if pile == len(tails):
            tails.append(j)
            tops.append(index)
        else:
            tails[pile], tops[pile] = j, index
    anchors = []
    index = tops[-1] if tops else -1
    while index >= 0:
        anchors.append(pairs[index])
        index = previous[index]
    anchors.reverse()
    common = i0 = j0 = 0
    for i1, j1 in [*anchors, (len(a), len(b))]:
        common += _ends_in_common(a, i0, i1, b, j0, j1)
        common += i1 < len(a)  # the anchor itself
        i0, j0 = i1 + 1, j1 + 1
    return common


def _ends_in_common(a: list[str], i0: int, i1: int, b: list[str], j0: int, j1: int) -> int:
    """How many lines `a[i0:i1]` and `b[j0:j1]` share at their start and, after those, at their end."""
    start = 0
    while i0 + start < i1 and j0 + start < j1 and a[i0 + start] is b[j0 + start]:
        start += 1
    end = 0
    while i1 - end - 1 >= i0 + start and j1 - end - 1 >= j0 + start and a[i1 - end - 1] is b[j1 - end - 1]:
        end += 1
    return start + end


def _context(before: Any, after: Any, budget: Budget | None) -> dict[str, Any]:
    """Compare the `episodeContext` of two sessions.

    `episodeContext` is a JSON document in a string: its `fields` when both sides parse to objects, else
    just whether the text changed."""
    if not (isinstance(before, str) and isinstance(after, str)):
        return {"changed": before != after, "parsed": False}
    if budget is not None:
        budget.take([before.encode(), after.encode()], "with their episodeContext documents, they")
    old, new = _parsed_object(before), _parsed_object(after)
    if old is None or new is None:
        return {"changed": before != after, "parsed": False}
    changes = diff_fields(old, new, depth=CONTEXT_DEPTH)
    return {"changed": bool(changes), "parsed": True, "fields": changes.report()}


@dataclass(frozen=True, slots=True)
class Scene:
    """A scene with the key it is matched by.

    A scene and what it is matched by: its `sceneNumber`, or its position (from 1) when it has none or
    repeats one. The two never meet: a scene numbered "#2" is not the second scene that has no number."""

    key: tuple[str, Any]  # what it is matched by: ("number", its sceneNumber) or ("position", its position)
    number: Any  # the `sceneNumber` shown: its own, or "#<position>"
    position: int | None  # set when the scene is matched by its position
    fields: dict[str, Any]

    def ref(self) -> dict[str, Any]:
        """How the report names it: `sceneNumber`, and `position` when it is matched by that."""
        return {"sceneNumber": self.number} if self.position is None else {"sceneNumber": self.number,
                                                                            "position": self.position}


def _scenes(episode: dict[str, Any]) -> dict[tuple[str, Any], Scene]:
    scenes: dict[tuple[str, Any], Scene] = {}
    raw = episode.get("scenes")
    for position, scene in enumerate(raw if isinstance(raw, list) else [], start=1):
        scene = _object(scene)
        number = scene.get("sceneNumber")
        if isinstance(number, int | str) and not isinstance(number, bool) and ("number", number) not in scenes:
            named = Scene(("number", number), number, None, scene)
        else:
            named = Scene(("position", position), f"#{position}", position, scene)
        scenes[named.key] = named
    return scenes


def _compare_scenes(before: dict[Any, Scene], after: dict[Any, Scene]) -> dict[str, list[Any]]:
    """Compare the scenes of two sessions.

    Scenes by number (or position); a scene's own fields (its title, metadata) are compared here, its beats
    below."""
    changed = []
    for key, scene in after.items():
        if key in before:
            changes = diff_fields(before[key].fields, scene.fields, depth=SCENE_DEPTH, skip=frozenset({"beats"}))
            if changes:
                changed.append({**scene.ref(), **changes.report()})
    return {
        "added": [scene.ref() for key, scene in after.items() if key not in before],
        "removed": [scene.ref() for key, scene in before.items() if key not in after],
        "changed": changed,
    }


@dataclass(frozen=True, slots=True)
class Beat:
    beat_id: str | None  # None: the beat has no (or a repeated) `beatId`, so it is matched by its position
    scene: Scene
    index: int  # its position in its scene, from 0
    fields: dict[str, Any]

    def ident(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"beatId": self.beat_id, "sceneNumber": self.scene.number}
        if self.scene.position is not None:
            shown["scenePosition"] = self.scene.position
        return shown if self.beat_id is not None else {**shown, "index": self.index}


def _beats(scenes: dict[Any, Scene]) -> dict[Any, Beat]:
    beats: dict[Any, Beat] = {}
    for scene in scenes.values():
        raw = scene.fields.get("beats")
        for index, beat in enumerate(raw if isinstance(raw, list) else []):
            beat = _object(beat)
            beat_id = beat.get("beatId")
            if isinstance(beat_id, str) and beat_id not in beats:
                beats[beat_id] = Beat(beat_id, scene, index, beat)
            else:
                beats[(scene.key, index)] = Beat(None, scene, index, beat)
    return beats


def _compare_beats(before: dict[Any, Beat], after: dict[Any, Beat]) -> dict[str, Any]:
    changed = []
    unchanged = 0
    for key, new in after.items():
        old = before.get(key)
        if old is None:
            continue
        moved = old.scene.key != new.scene.key
        if not moved and old.fields == new.fields:
            unchanged += 1
            continue
        changes = diff_fields(old.fields, new.fields, depth=BEAT_DEPTH)
        item = {**new.ident(), **changes.report(), "prompts": _prompts(old.fields, new.fields)}
        if moved:
            item["movedFrom"] = old.scene.number
        changed.append(item)
    return {
        "added": [beat.ident() for key, beat in after.items() if key not in before],
        "removed": [beat.ident() for key, beat in before.items() if key not in after],
        "changed": changed,
        "unchanged": unchanged,
    }


def _prompts(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, str | None]]:
    """Report the prompt texts that changed, per format.

    Per prompt format (`cinematic`, `vertical`, ...) whose prompt text changed: the text before and after
    (None where that side has none)."""
    old, new = _object(before.get("prompts")), _object(after.get("prompts"))
    texts = {}
    for name in sorted(old.keys() | new.keys()):
        was, now = _prompt_text(old.get(name)), _prompt_text(new.get(name))
        if was != now:
            texts[name] = {"before": was, "after": now}
    return texts


def _prompt_text(prompt: Any) -> str | None:
    text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
    return text if isinstance(text, str) else None


def _without_timestamp(session: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in session.items() if name != "timestamp"}


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    return orjson.dumps(value).decode()


def _parsed_object(value: str) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None
