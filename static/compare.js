// What changed from one session to another, from the service's compare report (`GET
// /api/v1/session/<a>/compare/<b>`, see compare.py): the report names what changed as dotted paths, and the two
// sessions themselves give each path's value before and after, shown side by side.

import { anyValue, asText, h, timeOf } from "./dom.js";

const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);
const ABSENT = Symbol("absent");

/** The value at a dotted `path` inside `value`, or ABSENT. */
function at(value, path) {
  let node = value;
  for (const part of path.split(".")) {
    if (!isObject(node) || !(part in node)) return ABSENT;
    node = node[part];
  }
  return node;
}

const DIFF_MAX_PIECES = 1200; // words and spaces; a longer text is shown unmarked (the table grows as a product)
const DIFF_MIN_SHARED = 0.4; // texts sharing fewer of their words were rewritten, not edited: no marks
const SPACE = /^\s+$/;

/** `[marked, text]` pieces as runs: a space between two marked words is marked with them. */
function runs(pieces, tag) {
  const out = [];
  pieces.forEach(([marked, text], k) => {
    const mark = marked || (SPACE.test(text) && Boolean(pieces[k - 1]?.[0]) && Boolean(pieces[k + 1]?.[0]));
    const last = out.at(-1);
    if (last && last[0] === mark) last[1] += text;
    else out.push([mark, text]);
  });
  return out.map(([mark, text]) => (mark ? h(tag, null, text) : text));
}

/** Two texts with what only `before` has marked `del` and what only `after` has marked `ins` (a longest common
 * subsequence of words); null when they are too long, or too different for marks to help. */
function wordDiff(before, after) {
  const a = before.split(/(\s+)/);
  const b = after.split(/(\s+)/);
  if (a.length > DIFF_MAX_PIECES || b.length > DIFF_MAX_PIECES) return null;
  const width = b.length + 1;
  const common = new Uint32Array((a.length + 1) * width);
  for (let i = a.length - 1; i >= 0; i--) {
    for (let j = b.length - 1; j >= 0; j--) {
      common[i * width + j] = a[i] === b[j] ? common[(i + 1) * width + j + 1] + 1
        : Math.max(common[(i + 1) * width + j], common[i * width + j + 1]);
    }
  }
  const old = [];
  const now = [];
  let shared = 0;
  let i = 0;
  let j = 0;
  while (i < a.length || j < b.length) {
    if (i < a.length && j < b.length && a[i] === b[j]) {
      if (!SPACE.test(a[i]) && a[i]) shared++;
      old.push([false, a[i++]]);
      now.push([false, b[j++]]);
    } else if (j < b.length && (i === a.length || common[i * width + j + 1] >= common[(i + 1) * width + j])) {
      now.push([!SPACE.test(b[j]), b[j++]]);
    } else {
      old.push([!SPACE.test(a[i]), a[i++]]);
    }
  }
  const words = Math.min(...[a, b].map((pieces) => pieces.filter((p) => p && !SPACE.test(p)).length));
  return words && shared / words >= DIFF_MIN_SHARED ? [runs(old, "del"), runs(now, "ins")] : null;
}

function side(label, value, marked) {
  const shown = marked ? h("span", { class: "value" }, marked)
    : value === ABSENT || value === null || value === undefined
      ? h("p", { class: "muted" }, value === ABSENT ? "(absent)" : "(none)") : anyValue(value);
  return h("div", { class: label === "Before" ? "before" : "after" }, h("p", { class: "label" }, label), shown);
}

/** Before and after side by side; two texts with the words that differ marked. */
function beforeAfter(before, after) {
  const marks = typeof before === "string" && typeof after === "string" ? wordDiff(before, after) : null;
  return h("div", { class: "before-after" }, side("Before", before, marks && marks[0]),
    side("After", after, marks && marks[1]));
}

/** Every added, removed and changed path of `changes`, each with its value before and after. */
function pathList(changes, before, after, prefix = "") {
  const paths = [
    ...(changes.changed || []).map((path) => [path, "changed"]),
    ...(changes.added || []).map((path) => [path, "added"]),
    ...(changes.removed || []).map((path) => [path, "removed"]),
  ];
  if (!paths.length) return null;
  return h("ul", { class: "changes" }, paths.map(([path, kind]) => h("li", { class: "change", "data-path": path },
    h("p", { class: "field" }, `${prefix}${path} `, h("span", { class: `badge ${kind}` }, kind)),
    beforeAfter(at(before, path), at(after, path)))));
}

function count(changes) {
  return ["added", "removed", "changed"].reduce((sum, kind) => sum + (changes?.[kind]?.length || 0), 0);
}

function section(title, body, empty = "No change.") {
  return h("section", { class: "card" }, h("h2", null, title), body || h("p", { class: "muted" }, empty));
}

function parsedContext(session) {
  try {
    return JSON.parse(session.episodeContext);
  } catch {
    return {};
  }
}

function scenesOf(session) {
  const scenes = isObject(session.analyzedEpisode) ? session.analyzedEpisode.scenes : null;
  return Array.isArray(scenes) ? scenes.filter(isObject) : [];
}

const BY_POSITION = " (by position)"; // a scene without a `sceneNumber` of its own: "#<position>"

/** The scene a report names: the one at `position` (from 1) when the report gives one (the scene has no
 * `sceneNumber` of its own, or repeats one), else the first with that `sceneNumber`. */
function findScene(session, sceneNumber, position) {
  if (position !== undefined) {
    const scenes = isObject(session.analyzedEpisode) ? session.analyzedEpisode.scenes : null;
    const scene = Array.isArray(scenes) ? scenes[position - 1] : undefined;
    return isObject(scene) ? scene : undefined;
  }
  return scenesOf(session).find((s) => s.sceneNumber === sceneNumber);
}

function sceneTitle(session, ref) {
  const scene = findScene(session, ref.sceneNumber, ref.position);
  const name = `Scene ${asText(ref.sceneNumber)}${ref.position !== undefined ? BY_POSITION : ""}`;
  return `${name}${scene && scene.title ? ` · ${asText(scene.title)}` : ""}`;
}

/** The beat a report names: by `beatId`, else by its scene and position. */
function findBeat(session, ident) {
  if (ident.beatId === null || ident.beatId === undefined) {
    const scene = findScene(session, ident.sceneNumber, ident.scenePosition);
    const beats = scene && Array.isArray(scene.beats) ? scene.beats : [];
    return isObject(beats[ident.index]) ? beats[ident.index] : {};
  }
  for (const scene of scenesOf(session)) {
    const beats = Array.isArray(scene.beats) ? scene.beats : [];
    const found = beats.find((b) => isObject(b) && b.beatId === ident.beatId);
    if (found) return found;
  }
  return {};
}

function beatName(beat, ident) {
  const id = ident.beatId ?? `#${(ident.index ?? 0) + 1}`;
  const title = beat.beat_title ? ` · ${asText(beat.beat_title)}` : "";
  const scene = `Scene ${asText(ident.sceneNumber)}${ident.scenePosition !== undefined ? BY_POSITION : ""}`;
  return `${scene}, beat ${asText(id)}${title}`;
}

function beatList(kind, idents, session) {
  if (!idents.length) return null;
  return h("ul", { class: "plain" }, idents.map((ident) => h("li", { class: kind },
    beatName(findBeat(session, ident), ident))));
}

function changedBeat(item, before, after) {
  const old = findBeat(before, item);
  const now = findBeat(after, item);
  const prompts = Object.entries(item.prompts || {});
  const promptPaths = new Set(prompts.map(([format]) => `prompts.${format}.prompt`));
  const rest = {
    added: item.added || [],
    removed: item.removed || [],
    changed: (item.changed || []).filter((path) => !promptPaths.has(path)),
  };
  return h("li", { class: "changed-beat", "data-beat": item.beatId ?? "" },
    h("h3", null, beatName(now, item)),
    item.movedFrom !== undefined ? h("p", { class: "note" }, `Moved from scene ${asText(item.movedFrom)}.`) : null,
    prompts.map(([format, texts]) => h("div", { class: "prompt-change", "data-kind": format },
      h("p", { class: "field" }, `${format} prompt`),
      beforeAfter(texts.before ?? ABSENT, texts.after ?? ABSENT))),
    pathList(rest, old, now));
}

function sessionHead(label, session, timestamp) {
  const episode = isObject(session.analyzedEpisode) ? session.analyzedEpisode : {};
  return h("div", { class: "side" }, h("p", { class: "label" }, label),
    h("p", { class: "title" }, h("a", { href: `#/session/${timestamp}` }, asText(episode.title || "Untitled session"))),
    h("p", { class: "muted" }, `episode ${asText(episode.episodeNumber ?? "–")} · `, timeOf(timestamp)));
}

/** The readable report of `report` (the compare answer) between the sessions `before` and `after`. */
export function renderCompare(report, before, after) {
  const script = report.scriptText || {};
  const context = report.episodeContext || {};
  const scenes = report.scenes || {};
  const beats = report.beats || {};
  const episodeBefore = before.analyzedEpisode;
  const episodeAfter = after.analyzedEpisode;
  const sceneChanges = (scenes.changed || []).map((scene) => h("li", null,
    h("h3", null, sceneTitle(after, scene)),
    pathList(scene, findScene(before, scene.sceneNumber, scene.position),
      findScene(after, scene.sceneNumber, scene.position))));
  const sceneLines = [
    ...(scenes.added || []).map((s) => h("li", { class: "added" }, sceneTitle(after, s))),
    ...(scenes.removed || []).map((s) => h("li", { class: "removed" }, sceneTitle(before, s))),
  ];
  const beatCounts = `${beats.added?.length || 0} added, ${beats.removed?.length || 0} removed, `
    + `${beats.changed?.length || 0} changed, ${beats.unchanged ?? 0} unchanged`;
  return h("div", { class: "compare" },
    h("div", { class: "card sides" }, sessionHead("Before", before, report.from),
      h("p", { class: "arrow", "aria-hidden": "true" }, "→"), sessionHead("After", after, report.to)),
    report.identical ? h("p", { class: "note" }, "The two sessions hold the same analysis: only the time differs.")
      : null,
    section(`Session fields (${count(report.fields) + count(report.episode)})`, (count(report.fields)
      || count(report.episode)) ? [pathList(report.fields || {}, before, after),
      pathList(report.episode || {}, episodeBefore, episodeAfter, "analyzedEpisode.")] : null),
    section("Script", script.changed ? h("p", null,
      `${script.linesBefore} lines → ${script.linesAfter} lines: `,
      h("span", { class: "added-count" }, `+${script.linesAdded}`), " ",
      h("span", { class: "removed-count" }, `−${script.linesRemoved}`),
      script.exact === false ? h("span", { class: "muted inexact" }, " (at most: the scripts differ in too many "
        + "places, or are too long, for the service to count the fewest changed lines)") : null) : null),
    section("Episode context", !context.changed ? null : context.parsed
      ? pathList(context.fields || {}, parsedContext(before), parsedContext(after))
      : h("p", null, "The text changed (it is not a JSON object on both sides).")),
    section(`Scenes: ${scenes.added?.length || 0} added, ${scenes.removed?.length || 0} removed, `
      + `${sceneChanges.length} changed`, sceneLines.length || sceneChanges.length
      ? [sceneLines.length ? h("ul", { class: "plain" }, sceneLines) : null,
        sceneChanges.length ? h("ul", { class: "plain" }, sceneChanges) : null] : null),
    h("section", { class: "card beats-report" }, h("h2", null, "Beats"), h("p", { class: "muted" }, beatCounts),
      beatList("added", beats.added || [], after),
      beatList("removed", beats.removed || [], before),
      (beats.changed || []).length
        ? h("ol", { class: "plain" }, beats.changed.map((item) => changedBeat(item, before, after))) : null));
}
