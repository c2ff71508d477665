// A session as something to read: its scenes, their beats, each beat's prompts, then the script, the episode
// context and the raw JSON. The shape is StoryArt's (see tests/fixtures/); whatever a session holds beyond it is
// still shown, as fields, so nothing saved is hidden.

import { anyValue, asText, h } from "./dom.js";

const SESSION_SHOWN = new Set(["scriptText", "episodeContext", "analyzedEpisode", "timestamp"]);
const EPISODE_SHOWN = new Set(["episodeNumber", "title", "scenes"]);
const SCENE_SHOWN = new Set(["sceneNumber", "title", "metadata", "beats"]);
const BEAT_FIELDS = [
  ["visual_anchor", "Visual anchor"],
  ["cameraAngleSuggestion", "Camera"],
  ["characterPositioning", "Positioning"],
  ["characters", "Characters"],
  ["locationAttributes", "Location"],
];
const BEAT_SHOWN = new Set(["beatId", "beat_number", "beat_title", "core_action", "beat_script_text",
  "emotional_tone", "imageDecision", "prompts", ...BEAT_FIELDS.map(([key]) => key)]);
const PROMPT_SHOWN = new Set(["prompt", "negativePrompt", "model", "width", "height", "steps", "cfgscale", "seed",
  "sampler"]);

const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);

/** Fields of `object` not in `shown`, as a field list (or nothing). */
function rest(object, shown, label) {
  const extra = Object.entries(object).filter(([key]) => !shown.has(key));
  if (!extra.length) return null;
  return h("div", { class: "extra" }, label ? h("p", { class: "extra-label" }, label) : null,
    anyValue(Object.fromEntries(extra)));
}

/** A `<details>` whose content is built when it is first opened (a 3 MB session has thousands of nodes). */
function lazyDetails(attrs, summary, build) {
  const details = h("details", attrs, h("summary", null, summary));
  details.addEventListener("toggle", () => {
    if (details.open && !details.dataset.built) {
      details.dataset.built = "1";
      details.append(build());
    }
  });
  return details;
}

export function sessionTitle(data) {
  const episode = isObject(data.analyzedEpisode) ? data.analyzedEpisode : {};
  return typeof episode.title === "string" && episode.title ? episode.title : "Untitled session";
}

function prompt(kind, p) {
  if (!isObject(p)) return h("section", { class: "prompt" }, h("h5", null, kind), anyValue(p));
  const size = p.width && p.height ? `${p.width}×${p.height}` : null;
  const params = [
    p.model,
    size,
    p.steps !== undefined ? `${p.steps} steps` : null,
    p.cfgscale !== undefined ? `CFG ${p.cfgscale}` : null,
    p.sampler,
    p.seed !== undefined ? `seed ${p.seed}` : null,
  ].filter((part) => part !== null && part !== undefined && part !== "");
  return h("section", { class: "prompt", "data-kind": kind },
    h("h5", null, kind),
    h("p", { class: "prompt-text" }, asText(p.prompt)),
    p.negativePrompt ? h("p", { class: "negative" }, h("span", { class: "label" }, "Negative: "),
      asText(p.negativePrompt)) : null,
    params.length ? h("p", { class: "params" }, params.map(asText).join(" · ")) : null,
    rest(p, PROMPT_SHOWN));
}

function beatBody(beat) {
  const decision = isObject(beat.imageDecision) ? beat.imageDecision : null;
  const fields = BEAT_FIELDS.filter(([key]) => beat[key] !== undefined).map(([key, label]) => [
    h("dt", null, label), h("dd", null, anyValue(beat[key]))]);
  if (decision) {
    fields.push(h("dt", null, "Image"), h("dd", null, [asText(decision.type ?? "–"),
      decision.reason ? ` — ${asText(decision.reason)}` : ""]));
  } else if (beat.imageDecision !== undefined) {
    fields.push(h("dt", null, "Image"), h("dd", null, anyValue(beat.imageDecision)));
  }
  const prompts = isObject(beat.prompts) ? Object.entries(beat.prompts) : [];
  return h("div", { class: "beat-body" },
    beat.core_action !== undefined ? h("p", { class: "action" }, asText(beat.core_action)) : null,
    beat.beat_script_text !== undefined ? h("blockquote", { class: "script-text" }, asText(beat.beat_script_text))
      : null,
    fields.length ? h("dl", { class: "fields inline" }, fields) : null,
    prompts.length ? h("div", { class: "prompts" }, prompts.map(([kind, p]) => prompt(kind, p))) : null,
    beat.prompts !== undefined && !isObject(beat.prompts) ? anyValue(beat.prompts) : null,
    rest(beat, BEAT_SHOWN, "Other fields"));
}

function beat(item, index) {
  if (!isObject(item)) return h("li", { class: "beat" }, anyValue(item));
  const number = item.beat_number ?? index + 1;
  const tone = item.emotional_tone ? h("span", { class: "chip" }, asText(item.emotional_tone)) : null;
  const image = isObject(item.imageDecision) && item.imageDecision.type
    ? h("span", { class: "chip image" }, asText(item.imageDecision.type)) : null;
  return h("li", { class: "beat" }, lazyDetails({ "data-beat": item.beatId ?? number },
    [h("span", { class: "beat-no" }, asText(number)), " ",
      h("span", { class: "beat-title" }, asText(item.beat_title ?? item.beatId ?? `Beat ${number}`)), " ", tone, " ",
      image],
    () => beatBody(item)));
}

function scene(item, index) {
  if (!isObject(item)) return h("section", { class: "scene" }, anyValue(item));
  const number = item.sceneNumber ?? index + 1;
  const beats = Array.isArray(item.beats) ? item.beats : [];
  const metadata = isObject(item.metadata) ? Object.entries(item.metadata) : [];
  return h("section", { class: "scene", "data-scene": number },
    h("h3", null, h("span", { class: "scene-no" }, `Scene ${asText(number)}`), " ",
      item.title !== undefined ? asText(item.title) : ""),
    metadata.length ? h("p", { class: "chips" }, metadata.map(([key, value]) =>
      h("span", { class: "chip" }, `${key}: ${asText(value)}`))) : null,
    h("p", { class: "muted" }, `${beats.length} beat${beats.length === 1 ? "" : "s"}`),
    beats.length ? h("ol", { class: "beats" }, beats.map(beat)) : null,
    item.beats !== undefined && !Array.isArray(item.beats) ? anyValue(item.beats) : null,
    rest(item, SCENE_SHOWN, "Other fields"));
}

function episodeContext(text) {
  let parsed = text;
  if (typeof text === "string") {
    try {
      parsed = JSON.parse(text);
    } catch {
      return h("pre", { class: "raw" }, text);
    }
  }
  return anyValue(parsed);
}

/** Expand or collapse every beat of the rendered session. */
function toggleAll(root, open) {
  for (const details of root.querySelectorAll("li.beat > details")) {
    if (details.open !== open) details.open = open;
  }
}

/** The readable body of a session (everything below its title and actions). */
export function renderSession(data) {
  const episode = isObject(data.analyzedEpisode) ? data.analyzedEpisode : {};
  const scenes = Array.isArray(episode.scenes) ? episode.scenes : [];
  const root = h("div", { class: "session" });
  const overview = Object.fromEntries(Object.entries(data).filter(([key]) => !SESSION_SHOWN.has(key)));
  root.append(
    h("section", { class: "card" }, h("h2", null, "Overview"), anyValue(overview),
      rest(episode, EPISODE_SHOWN, "Episode fields")),
    h("section", { class: "card scenes" },
      h("div", { class: "section-head" },
        h("h2", null, `Scenes (${scenes.length})`),
        h("div", { class: "toolbar" },
          h("button", { type: "button", class: "quiet", onclick: () => toggleAll(root, true) }, "Expand all beats"),
          h("button", { type: "button", class: "quiet", onclick: () => toggleAll(root, false) }, "Collapse all"))),
      scenes.length ? scenes.map(scene) : h("p", { class: "muted" }, "This session has no scenes."),
      episode.scenes !== undefined && !Array.isArray(episode.scenes) ? anyValue(episode.scenes) : null),
    h("section", { class: "card" }, lazyDetails({ class: "block" }, h("h2", null, "Script"),
      () => h("pre", { class: "script" }, asText(data.scriptText)))),
    h("section", { class: "card" }, lazyDetails({ class: "block" }, h("h2", null, "Episode context"),
      () => episodeContext(data.episodeContext))),
    h("section", { class: "card" }, lazyDetails({ class: "block" }, h("h2", null, "Raw JSON"),
      () => h("pre", { class: "raw" }, JSON.stringify(data, null, 2)))),
  );
  return root;
}
