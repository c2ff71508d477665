// What changed between two sessions, as the service's compare endpoint reports it: top-level fields, scenes
// added or removed, beats added, removed or changed (each changed field, a prompt's text included, before and
// after, side by side).

import { anyValue, asText, h, timeOf } from "./dom.js";

const list = (value) => (Array.isArray(value) ? value : []);

/** `[{field, before, after}]` from either a list of such records or an object `{field: {before, after}}`. */
function changesOf(value) {
  if (Array.isArray(value)) return value;
  if (value && typeof value === "object") {
    return Object.entries(value).map(([field, change]) => ({ field, ...change }));
  }
  return [];
}

function fieldName(change) {
  return asText(change.field ?? change.path ?? change.name ?? "–");
}

function beforeAfter(change) {
  return h("div", { class: "before-after" },
    h("div", { class: "before" }, h("p", { class: "label" }, "Before"),
      change.before === undefined ? h("p", { class: "muted" }, "(absent)") : h("div", null, anyValue(change.before))),
    h("div", { class: "after" }, h("p", { class: "label" }, "After"),
      change.after === undefined ? h("p", { class: "muted" }, "(absent)") : h("div", null, anyValue(change.after))));
}

function changeList(changes) {
  return h("ul", { class: "changes" }, changes.map((change) => h("li", { class: "change" },
    h("p", { class: "field" }, fieldName(change)), beforeAfter(change))));
}

function sceneLabel(scene) {
  if (!scene || typeof scene !== "object") return asText(scene);
  const number = scene.sceneNumber ?? scene.number;
  return [number !== undefined ? `Scene ${asText(number)}` : "Scene", scene.title ? ` · ${asText(scene.title)}` : ""]
    .join("");
}

function beatLabel(beat) {
  if (!beat || typeof beat !== "object") return asText(beat);
  const where = beat.sceneNumber !== undefined ? `Scene ${asText(beat.sceneNumber)}, ` : "";
  const id = beat.beatId ?? beat.beat_number ?? beat.beatNumber;
  const title = beat.beat_title ?? beat.title;
  return `${where}beat ${asText(id ?? "?")}${title ? ` · ${asText(title)}` : ""}`;
}

function section(title, count, body) {
  return h("section", { class: "card" }, h("h2", null, `${title} (${count})`),
    count ? body : h("p", { class: "muted" }, "None."));
}

function sessionHead(label, summary, timestamp) {
  return h("div", { class: "side" }, h("p", { class: "label" }, label),
    h("p", { class: "title" }, summary?.title || "Untitled session"),
    h("p", { class: "muted" }, `episode ${summary?.episodeNumber ?? "–"} · `,
      timestamp ? timeOf(timestamp) : "–"));
}

/** The readable report; `left` and `right` are the two sessions' summaries (null when unknown). */
export function renderCompare(report, left, right) {
  const scenes = report.scenes || {};
  const beats = report.beats || {};
  const top = changesOf(report.changes ?? report.topLevel ?? report.fields);
  const addedScenes = list(scenes.added);
  const removedScenes = list(scenes.removed);
  const addedBeats = list(beats.added);
  const removedBeats = list(beats.removed);
  const changedBeats = list(beats.changed);
  const a = report.a?.timestamp ?? report.from ?? left?.timestamp;
  const b = report.b?.timestamp ?? report.to ?? right?.timestamp;
  const same = !top.length && !addedScenes.length && !removedScenes.length && !addedBeats.length
    && !removedBeats.length && !changedBeats.length;
  return h("div", { class: "compare" },
    h("div", { class: "card sides" }, sessionHead("Before", left, a), h("p", { class: "arrow", "aria-hidden": "true" },
      "→"), sessionHead("After", right, b)),
    same ? h("p", { class: "note" }, "The two sessions hold the same analysis.") : null,
    section("Top-level changes", top.length, changeList(top)),
    section("Scenes added", addedScenes.length,
      h("ul", { class: "plain" }, addedScenes.map((s) => h("li", { class: "added" }, sceneLabel(s))))),
    section("Scenes removed", removedScenes.length,
      h("ul", { class: "plain" }, removedScenes.map((s) => h("li", { class: "removed" }, sceneLabel(s))))),
    section("Beats added", addedBeats.length,
      h("ul", { class: "plain" }, addedBeats.map((x) => h("li", { class: "added" }, beatLabel(x))))),
    section("Beats removed", removedBeats.length,
      h("ul", { class: "plain" }, removedBeats.map((x) => h("li", { class: "removed" }, beatLabel(x))))),
    section("Beats changed", changedBeats.length, h("ol", { class: "plain" }, changedBeats.map((beat) =>
      h("li", { class: "changed-beat" }, h("h3", null, beatLabel(beat)),
        changeList(changesOf(beat.changes ?? beat.fields)))))));
}
