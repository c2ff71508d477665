"""What changed from one session to another, for `GET /api/v1/session/<a>/compare/<b>`: two parsed sessions
in, a JSON-able report out (no storage, no HTTP), so the history page can show what a re-analysis changed.

The report follows the session's shape (see the README's "Compare two sessions"): the top-level fields, the
script text as line counts (the standard library's `difflib`), the fields of `episodeContext` (a JSON document
kept in a string), `analyzedEpisode`'s own fields, its scenes (matched by `sceneNumber`) and their beats
(matched by `beatId` across scenes, so a beat moved to another scene is one change, not a removal and an
addition), with each changed beat's prompt text before and after. Sessions other tools wrote may lack any of
these parts: a missing or mistyped part compares as empty, never as an error.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import orjson

# Parts reported in their own sections, not among the top-level fields; `timestamp` always differs.
OWN_SECTIONS = frozenset({"scriptText", "episodeContext", "analyzedEpisode", "timestamp"})
BEAT_DEPTH = 3  # a beat's changes are named down to `prompts.<format>.<field>`
CONTEXT_DEPTH = 2  # `episodeContext`'s down to `episode.<field>`
SCENE_DEPTH = 2  # a scene's down to `metadata.<field>`


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


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The report of what changed from `before` to `after` (both parsed sessions); `identical` is true when
    nothing but the timestamp differs (the order of scenes or beats included, which the sections do not
    report)."""
    fields = diff_fields(before, after, depth=1, skip=OWN_SECTIONS)
    script = _script(before.get("scriptText"), after.get("scriptText"))
    context = _context(before.get("episodeContext"), after.get("episodeContext"))
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
    """The differences of two objects as dotted paths, descending into objects present on both sides at most
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
    """Line counts: how many lines each side has, and how many a line diff adds and removes."""
    old, new = _text(before).splitlines(), _text(after).splitlines()
    added = removed = 0
    if old != new:
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new).get_opcodes():
            if tag != "equal":
                removed += i2 - i1
                added += j2 - j1
    return {"changed": _text(before) != _text(after), "linesBefore": len(old), "linesAfter": len(new),
            "linesAdded": added, "linesRemoved": removed}


def _context(before: Any, after: Any) -> dict[str, Any]:
    """`episodeContext` is a JSON document in a string: its `fields` when both sides parse to objects, else
    just whether the text changed."""
    old, new = _parsed_object(before), _parsed_object(after)
    if old is None or new is None:
        return {"changed": before != after, "parsed": False}
    changes = diff_fields(old, new, depth=CONTEXT_DEPTH)
    return {"changed": bool(changes), "parsed": True, "fields": changes.report()}


@dataclass(frozen=True, slots=True)
class Scene:
    number: Any  # its `sceneNumber`, or its position (from 1) when it has none or repeats one
    fields: dict[str, Any]


def _scenes(episode: dict[str, Any]) -> dict[Any, Scene]:
    scenes: dict[Any, Scene] = {}
    raw = episode.get("scenes")
    for position, scene in enumerate(raw if isinstance(raw, list) else [], start=1):
        scene = _object(scene)
        number = scene.get("sceneNumber")
        if not isinstance(number, int | str) or isinstance(number, bool) or number in scenes:
            number = f"#{position}"
        scenes[number] = Scene(number, scene)
    return scenes


def _compare_scenes(before: dict[Any, Scene], after: dict[Any, Scene]) -> dict[str, list[Any]]:
    """Scenes by number; a scene's own fields (its title, metadata) are compared here, its beats below."""
    changed = []
    for number, scene in after.items():
        if number in before:
            changes = diff_fields(before[number].fields, scene.fields, depth=SCENE_DEPTH, skip=frozenset({"beats"}))
            if changes:
                changed.append({"sceneNumber": number, **changes.report()})
    return {
        "added": [{"sceneNumber": n} for n in after if n not in before],
        "removed": [{"sceneNumber": n} for n in before if n not in after],
        "changed": changed,
    }


@dataclass(frozen=True, slots=True)
class Beat:
    beat_id: str | None  # None: the beat has no (or a repeated) `beatId`, so it is matched by its position
    scene: Any
    index: int  # its position in its scene, from 0
    fields: dict[str, Any]

    def ident(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"beatId": self.beat_id, "sceneNumber": self.scene}
        return shown if self.beat_id is not None else {**shown, "index": self.index}


def _beats(scenes: dict[Any, Scene]) -> dict[Any, Beat]:
    beats: dict[Any, Beat] = {}
    for scene in scenes.values():
        raw = scene.fields.get("beats")
        for index, beat in enumerate(raw if isinstance(raw, list) else []):
            beat = _object(beat)
            beat_id = beat.get("beatId")
            if isinstance(beat_id, str) and beat_id not in beats:
                beats[beat_id] = Beat(beat_id, scene.number, index, beat)
            else:
                beats[(scene.number, index)] = Beat(None, scene.number, index, beat)
    return beats


def _compare_beats(before: dict[Any, Beat], after: dict[Any, Beat]) -> dict[str, Any]:
    changed = []
    unchanged = 0
    for key, new in after.items():
        old = before.get(key)
        if old is None:
            continue
        changes = diff_fields(old.fields, new.fields, depth=BEAT_DEPTH)
        if not changes and old.scene == new.scene:
            unchanged += 1
            continue
        item = {**new.ident(), **changes.report(), "prompts": _prompts(old.fields, new.fields)}
        if old.scene != new.scene:
            item["movedFrom"] = old.scene
        changed.append(item)
    return {
        "added": [beat.ident() for key, beat in after.items() if key not in before],
        "removed": [beat.ident() for key, beat in before.items() if key not in after],
        "changed": changed,
        "unchanged": unchanged,
    }


def _prompts(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, str | None]]:
    """Per prompt format (`cinematic`, `vertical`, ...) whose prompt text changed: the text before and after
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


def _parsed_object(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None
