// A share link (`/s/<token>`): the shared session, read-only, for someone who has the link and no token. The page
// keeps only the session view, without its actions, and calls the service anonymously: no token of this tab is
// sent and none is asked for (docs/contract.md §6).

import { call } from "./api.js";
import { fill, h, timeOf } from "./dom.js";
import { renderSession, sessionTitle } from "./session.js";

const $ = (id) => document.getElementById(id);
const GONE = "This link does not exist, was revoked or has expired.";

/** Everything of the page that acts on a library: not there for a share link's reader. */
const LIBRARY_PARTS = ["#list-view", "#compare-view", "#shares-view", "#activity-view", "#health", "#whoami",
  "#degraded", ".topbar .actions", "#session-view .back", "#session-view .toolbar", "#session-pinned", "dialog"];

function counts(data) {
  const scenes = Array.isArray(data.analyzedEpisode?.scenes) ? data.analyzedEpisode.scenes : [];
  const beats = scenes.reduce((sum, scene) => sum + (Array.isArray(scene?.beats) ? scene.beats.length : 0), 0);
  return [scenes.length, beats];
}

function renderMeta(data) {
  const [scenes, beats] = counts(data);
  const saved = Number.isSafeInteger(data.timestamp) ? timeOf(data.timestamp) : null;
  const items = [
    saved ? ["Saved", saved] : null,
    ["Episode", data.analyzedEpisode?.episodeNumber ?? "–"],
    ["Story", data.storyUuid ?? "–"],
    ["Scenes", scenes],
    ["Beats", beats],
  ].filter(Boolean);
  fill($("session-meta"), items.map(([label, value]) => h("div", null, h("dt", null, label), h("dd", null, value))));
}

/** Show the session the link `token` (as it is in the address) names, or why it cannot be shown. */
export async function showShared(token) {
  for (const part of document.querySelectorAll(LIBRARY_PARTS.join(","))) part.remove();
  document.querySelector(".brand").removeAttribute("href");
  document.body.classList.add("shared");
  $("session-view").hidden = false;
  fill($("session-title"), "Loading…");
  let shared;
  try {
    shared = await call(`/api/v1/shared/${token}`, { anonymous: true });
  } catch (err) {
    fill($("session-title"), err.status === 404 ? "Link not found" : "The shared session could not be opened");
    fill($("session-body"), h("p", { class: "error", role: "alert" }, err.status === 404 ? GONE : err.message));
    document.title = "Share link · StoryArt sessions";
    return;
  }
  const title = sessionTitle(shared.data);
  fill($("session-title"), title);
  document.title = `${title} · shared · StoryArt sessions`;
  const by = $("shared-by");
  fill(by, "Shared by ", h("strong", null, String(shared.sharedBy)), " · until ", timeOf(shared.expiresAt));
  by.hidden = false;
  renderMeta(shared.data);
  fill($("session-body"), renderSession(shared.data));
  $("session-title").focus();
}
