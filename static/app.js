// The history page: the list of saved sessions with its filters and paging, one session opened, two compared,
// import, backup, the service's health, who is signed in, share links and the activity log. Five views, chosen by
// the address's fragment (`#/`, `#/session/<ts>`, `#/compare/<a>/<b>`, `#/shares`, `#/activity`), so the
// browser's back button and bookmarks work. A share link (`/s/<token>`) shows one session read-only instead.

import { call, download, whenTokenNeeded } from "./api.js";
import { renderCompare } from "./compare.js";
import { fill, formatBytes, h, timeOf, toast } from "./dom.js";
import { openShare, rememberTitle, showActivity, showShares, showWho, wirePeople } from "./people.js";
import { renderSession, sessionTitle } from "./session.js";
import { showShared } from "./shared.js";

const $ = (id) => document.getElementById(id);
const HEALTH_EVERY_MS = 10_000;
const SEARCH_DELAY_MS = 250;
const VIEWS = ["list-view", "session-view", "compare-view", "shares-view", "activity-view"];
const SESSION_ACTIONS = ["session-download", "session-pin", "session-share", "session-compare", "session-delete"];

const state = {
  rows: [], // summaries shown, newest first
  more: false, // whether older sessions match beyond those shown
  listSeq: 0, // the latest list request; answers to older ones are dropped
  listStale: true, // reload the list when it is shown next (after a delete, pin or import)
  selected: new Map(), // timestamp -> summary, for compare
  open: null, // {timestamp, data, summary} of the session shown
};

// ------------------------------------------------------------------------------------------------- health

function storageName(wire) {
  return wire === "redis" ? "Redis" : "the local store";
}

/** Set `text` only when it changed: a live region announces every change, and health is polled. */
function say(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function showHealth(health, failure) {
  const pill = $("health");
  const banner = $("degraded");
  if (!health) {
    pill.dataset.state = "down";
    say(pill, "Service unreachable");
    banner.hidden = false;
    say(banner, `The session service cannot be reached. ${failure.message}`);
    return;
  }
  const redis = health.redis;
  pill.dataset.state = health.status === "degraded" ? "degraded" : "ok";
  say(pill, redis === "connected" ? "Redis connected"
    : redis === "not configured" ? "Local store (no Redis)" : `Redis ${redis}`);
  pill.title = `New saves go to ${storageName(health.storage)}.`;
  showBackups(health);
  banner.hidden = health.status !== "degraded";
  if (health.status === "degraded") {
    say(banner, `Degraded: Redis is ${redis}. New saves go to ${storageName(health.storage)} and are written `
      + "back to Redis when it answers again; lists may be incomplete meanwhile.");
  }
}

const WHEN = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

/** The line beside the backup button: the last backup the service took (its schedule, or the command) and the
 * next one; nothing when neither exists (no BACKUP_SCHEDULE and no backup yet). */
function showBackups(health) {
  const line = $("backup-status");
  const last = health.lastBackup;
  const next = health.nextBackup ? ` Next: ${WHEN.format(new Date(health.nextBackup))}.` : "";
  line.hidden = !last && !next;
  if (!last) {
    say(line, next.trim());
    return;
  }
  const when = WHEN.format(new Date(last.at));
  line.dataset.state = last.error ? "failed" : "ok";
  line.title = last.error || last.where.join("\n");
  const offsite = last.where.some((place) => place.startsWith("s3://"));
  say(line, last.error ? `Last backup (${when}) failed: ${last.error}.${next}`
    : `Last backup ${when}: ${last.sessions} session${last.sessions === 1 ? "" : "s"}, `
      + `${offsite ? "verified off-site" : "kept on this machine"}.${next}`);
}

async function refreshHealth() {
  try {
    showHealth(await call("/health"));
  } catch (err) {
    showHealth(null, err);
  }
}

// --------------------------------------------------------------------------------------------------- list

/** The start (or, with `end`, the last millisecond) of a local calendar day `yyyy-mm-dd`. */
function dayMs(value, end) {
  const [year, month, day] = value.split("-").map(Number);
  return new Date(year, month - 1, day + (end ? 1 : 0)).getTime() - (end ? 1 : 0);
}

function listParams(before) {
  const form = new FormData($("filters"));
  const params = new URLSearchParams({ view: "summary", limit: form.get("limit") || "25" });
  for (const name of ["q", "storyUuid", "episode"]) {
    const value = String(form.get(name) || "").trim();
    if (value) params.set(name, value);
  }
  if (form.get("since")) params.set("since", String(dayMs(form.get("since"), false)));
  if (form.get("until")) params.set("until", String(dayMs(form.get("until"), true)));
  if (before) params.set("before", String(before));
  return params;
}

async function loadList(older = false) {
  const seq = ++state.listSeq;
  const before = older && state.rows.length ? state.rows.at(-1).timestamp : null;
  $("load-more").disabled = true;
  let answer;
  try {
    answer = await call(`/api/v1/session/list?${listParams(before)}`);
  } catch (err) {
    if (seq !== state.listSeq) return;
    state.rows = older ? state.rows : [];
    renderList(err);
    return;
  }
  if (seq !== state.listSeq) return;
  state.listStale = false;
  state.rows = older ? [...state.rows, ...answer.sessions] : answer.sessions;
  for (const summary of answer.sessions) rememberTitle(summary.timestamp, summary.title || "Untitled session");
  state.more = answer.total > answer.count;
  if (!older) $("list-total").textContent = `${answer.total} session${answer.total === 1 ? "" : "s"}`;
  $("partial").hidden = !answer.partial;
  renderList();
}

function filtered() {
  const form = new FormData($("filters"));
  return ["q", "storyUuid", "episode", "since", "until"].some((name) => String(form.get(name) || "").trim());
}

function row(summary) {
  const ts = summary.timestamp;
  const title = summary.title || "Untitled session";
  const selected = state.selected.has(ts);
  const box = h("input", {
    type: "checkbox",
    "aria-label": `Select “${title}” (${new Date(ts).toISOString()}) to compare`,
    checked: selected,
    disabled: !selected && state.selected.size >= 2,
    onchange: (event) => select(summary, event.target.checked),
  });
  return h("tr", { "data-ts": ts, class: summary.pinned ? "pinned" : null },
    h("td", { class: "select" }, box),
    h("td", { "data-label": "Title", class: "title-cell" },
      h("a", { href: `#/session/${ts}`, class: "title" }, title),
      summary.pinned ? h("span", { class: "badge pin", title: "Pinned: never expires" }, "Pinned") : null,
      summary.storyUuid ? h("span", { class: "sub" }, summary.storyUuid) : null),
    h("td", { "data-label": "Episode" }, summary.episodeNumber ?? "–"),
    h("td", { "data-label": "Scenes", class: "num" }, summary.sceneCount ?? "–"),
    h("td", { "data-label": "Beats", class: "num" }, summary.beatCount ?? "–"),
    h("td", { "data-label": "Size", class: "num" }, formatBytes(summary.sizeBytes)),
    h("td", { "data-label": "Saved" }, timeOf(ts)),
    h("td", { "data-label": "Stored in" },
      h("span", { class: `badge ${summary.storage === "redis" ? "redis" : "local"}` },
        summary.storage === "redis" ? "Redis" : "local store")));
}

function renderList(failure) {
  fill($("session-rows"), state.rows.map(row));
  const empty = $("list-empty");
  empty.hidden = Boolean(state.rows.length) && !failure;
  if (failure) {
    fill(empty, h("strong", null, "The list could not be loaded: "), failure.message);
  } else if (!state.rows.length) {
    fill(empty, filtered() ? "No session matches these filters."
      : "No sessions yet. Each finished StoryArt analysis appears here; or import exported .json files.");
  }
  $("load-more").hidden = !state.more || Boolean(failure);
  $("load-more").disabled = false;
  renderCompareBar();
}

// ------------------------------------------------------------------------------------------------ compare

function select(summary, on) {
  if (on) state.selected.set(summary.timestamp, summary);
  else state.selected.delete(summary.timestamp);
  renderList();
}

function renderCompareBar() {
  const count = state.selected.size;
  $("compare-bar").hidden = count === 0;
  $("compare-count").textContent = count === 1 ? "1 selected: pick one more to compare"
    : `${count} selected`;
  $("compare-go").disabled = count !== 2;
}

function compareHash(a, b) {
  const [older, newer] = [a, b].sort((x, y) => x - y);
  return `#/compare/${older}/${newer}`;
}

async function showCompare(a, b) {
  showView("compare-view");
  const body = $("compare-body");
  fill(body, h("p", { class: "muted" }, "Comparing…"));
  try {
    const [report, before, after] = await Promise.all([call(`/api/v1/session/${a}/compare/${b}`),
      call(`/api/v1/session/${a}`), call(`/api/v1/session/${b}`)]);
    fill(body, renderCompare(report, before.data, after.data));
  } catch (err) {
    fill(body, h("p", { class: "error", role: "alert" }, `The sessions could not be compared: ${err.message}`));
  }
  $("compare-title").focus();
}

async function pickOther() {
  const open = state.open;
  const list = $("pick-list");
  fill(list, h("li", { class: "muted" }, "Loading…"));
  $("pick-dialog").showModal();
  const story = open.data.storyUuid;
  const query = (extra) => call(`/api/v1/session/list?${new URLSearchParams({ view: "summary", limit: "50", ...extra })}`);
  let sessions = [];
  try {
    sessions = (await query(typeof story === "string" && story ? { storyUuid: story } : {})).sessions;
    if (sessions.length < 2) sessions = (await query({})).sessions;
  } catch (err) {
    fill(list, h("li", { class: "error" }, err.message));
    return;
  }
  const others = sessions.filter((s) => s.timestamp !== open.timestamp);
  fill(list, others.length ? others.map((s) => h("li", null, h("a", {
    href: compareHash(open.timestamp, s.timestamp),
    onclick: () => $("pick-dialog").close(),
  }, h("span", { class: "title" }, s.title || "Untitled session"), " ",
  h("span", { class: "muted" }, `episode ${s.episodeNumber ?? "–"} · `, timeOf(s.timestamp)))))
    : h("li", { class: "muted" }, "There is no other session to compare with."));
}

// ------------------------------------------------------------------------------------------------ session

/** The summary of one session (pinned, size, where stored), through the list's exact time range. */
async function summaryOf(ts) {
  const answer = await call(`/api/v1/session/list?view=summary&limit=1&since=${ts}&until=${ts}`);
  return answer.sessions[0] || null;
}

function renderMeta(timestamp, data, summary, storage) {
  const items = [
    ["Saved", timeOf(timestamp)],
    ["Timestamp", String(timestamp)],
    ["Episode", data.analyzedEpisode?.episodeNumber ?? "–"],
    ["Story", data.storyUuid ?? "–"],
    ["Scenes", summary?.sceneCount ?? "–"],
    ["Beats", summary?.beatCount ?? "–"],
    ["Size", formatBytes(summary?.sizeBytes)],
    ["Stored in", storage === "redis" ? "Redis" : "local store"],
  ];
  fill($("session-meta"), items.map(([label, value]) => h("div", null, h("dt", null, label), h("dd", null, value))));
}

function renderPin(pinned) {
  const button = $("session-pin");
  button.setAttribute("aria-pressed", String(pinned));
  button.textContent = pinned ? "Unpin" : "Pin";
  button.title = pinned ? "Let it expire like any other session" : "Keep it: a pinned session never expires";
  $("session-pinned").hidden = !pinned;
}

async function showSession(timestamp) {
  showView("session-view");
  state.open = null;
  fill($("session-title"), "Loading…");
  $("session-meta").replaceChildren();
  fill($("session-body"));
  $("session-pinned").hidden = true;
  for (const id of SESSION_ACTIONS) $(id).disabled = true;
  try {
    const [found, summary] = await Promise.all([call(`/api/v1/session/${timestamp}`), summaryOf(timestamp)]);
    state.open = { timestamp, data: found.data, summary };
    fill($("session-title"), sessionTitle(found.data));
    document.title = `${sessionTitle(found.data)} · StoryArt sessions`;
    renderMeta(timestamp, found.data, summary, found.storage);
    renderPin(Boolean(summary?.pinned));
    fill($("session-body"), renderSession(found.data));
    rememberTitle(timestamp, sessionTitle(found.data));
    for (const id of SESSION_ACTIONS) $(id).disabled = false;
  } catch (err) {
    fill($("session-title"), err.status === 404 ? "Session not found" : "The session could not be opened");
    fill($("session-body"), h("p", { class: "error", role: "alert" }, err.message));
  }
  $("session-title").focus();
}

async function togglePin() {
  const open = state.open;
  const pinned = $("session-pin").getAttribute("aria-pressed") === "true";
  $("session-pin").disabled = true;
  try {
    const answer = await call(`/api/v1/session/${open.timestamp}/pin`, { method: pinned ? "DELETE" : "POST" });
    renderPin(Boolean(answer.pinned));
    state.listStale = true;
    toast(answer.pinned ? "Pinned: this session never expires." : "Unpinned: it expires like any other session.");
  } catch (err) {
    toast(`Could not ${pinned ? "unpin" : "pin"} the session: ${err.message}`, "error");
  } finally {
    $("session-pin").disabled = false;
  }
}

function askDelete() {
  const open = state.open;
  fill($("confirm-delete-text"), h("strong", null, sessionTitle(open.data)), ", saved ", timeOf(open.timestamp), ".");
  $("confirm-delete").showModal();
}

async function confirmDelete(event) {
  event.preventDefault();
  const open = state.open;
  $("confirm-delete").close();
  try {
    await call(`/api/v1/session/${open.timestamp}`, { method: "DELETE" });
  } catch (err) {
    toast(`The session was not deleted: ${err.message}`, "error");
    return;
  }
  state.selected.delete(open.timestamp);
  state.listStale = true;
  toast(`Deleted “${sessionTitle(open.data)}”.`);
  location.hash = "#/";
}

// ------------------------------------------------------------------------------------------------- import

const importFiles = [];

function isJsonFile(file) {
  return /\.json$/i.test(file.name) || file.type === "application/json";
}

function chooseFiles(files) {
  importFiles.length = 0;
  const chosen = $("import-chosen");
  chosen.replaceChildren();
  for (const file of files) {
    const usable = isJsonFile(file);
    if (usable) importFiles.push(file);
    chosen.append(h("li", { class: usable ? null : "error" }, file.name, " ",
      h("span", { class: "muted" }, usable ? formatBytes(file.size) : "skipped: not a .json file")));
  }
  $("import-report").replaceChildren();
  $("import-go").disabled = importFiles.length === 0;
}

function openImport(files) {
  const dialog = $("import-dialog");
  if (!dialog.open) {
    $("import-form").reset();
    chooseFiles([]);
    $("import-chosen").replaceChildren();
    dialog.showModal();
  }
  if (files) chooseFiles(files);
}

function reportOf(file, answer) {
  const counts = `${answer.imported} imported, ${answer.replaced} replaced, ${answer.rejected} rejected`
    + (answer.skipped ? `, ${answer.skipped} skipped` : "");
  return h("section", { class: "report" },
    h("h3", null, file.name, " ", h("span", { class: "muted" }, counts)),
    answer.complete === false ? h("p", { class: "note" }, "The service stopped before the last items "
      + "(IMPORT_TIME_LIMIT_SECONDS). Import this file again: what is already stored is not stored twice.") : null,
    h("table", null,
      h("thead", null, h("tr", null, ["Item", "Result", "Session", "Stored in"].map((label) =>
        h("th", { scope: "col" }, label)))),
      h("tbody", null, answer.results.map((item) => h("tr", { class: `status-${item.status}` },
        h("td", null, `#${item.index + 1}`),
        h("td", null, h("span", { class: `badge ${item.status}` }, item.status)),
        h("td", null, item.timestamp
          ? h("a", { href: `#/session/${item.timestamp}`, onclick: () => $("import-dialog").close() },
            String(item.timestamp))
          : h("span", { class: "error" }, item.error || "–")),
        h("td", null, item.storage ? (item.storage === "redis" ? "Redis" : "local store") : "–"))))));
}

async function runImport(event) {
  event.preventDefault();
  const report = $("import-report");
  report.replaceChildren();
  $("import-go").disabled = true;
  for (const file of importFiles) {
    try {
      const answer = await call("/api/v1/session/import", { method: "POST", body: await file.text() });
      report.append(reportOf(file, answer));
    } catch (err) {
      report.append(h("section", { class: "report" }, h("h3", null, file.name),
        h("p", { class: "error" }, `Not imported: ${err.message}`)));
    }
  }
  state.listStale = true;
  importFiles.length = 0;
}

// -------------------------------------------------------------------------------------------------- token

function askToken(refused) {
  const dialog = $("token-dialog");
  $("token-text").textContent = refused
    ? "The service did not accept that token. Enter your API token again."
    : "This service asks for your API token (your own, or API_TOKEN). It is kept in this tab only.";
  $("token-input").value = "";
  return new Promise((resolve) => {
    const done = (value) => {
      dialog.removeEventListener("close", closed);
      $("token-form").removeEventListener("submit", submitted);
      if (dialog.open) dialog.close();
      resolve(value);
    };
    const closed = () => done(null);
    const submitted = (event) => {
      event.preventDefault();
      done($("token-input").value.trim() || null);
    };
    dialog.addEventListener("close", closed);
    $("token-form").addEventListener("submit", submitted);
    dialog.showModal();
  });
}

// ---------------------------------------------------------------------------------------------- the views

function showView(id) {
  for (const view of VIEWS) $(view).hidden = view !== id;
  const titles = { "list-view": "StoryArt sessions", "shares-view": "Share links · StoryArt sessions",
    "activity-view": "Activity · StoryArt sessions" };
  if (titles[id]) document.title = titles[id];
}

function route() {
  const hash = location.hash;
  let match = /^#\/session\/(\d{1,16})$/.exec(hash);
  if (match) return showSession(Number(match[1]));
  match = /^#\/compare\/(\d{1,16})\/(\d{1,16})$/.exec(hash);
  if (match) return showCompare(Number(match[1]), Number(match[2]));
  if (hash === "#/shares" || hash === "#/activity") {
    showView(`${hash.slice(2)}-view`);
    return hash === "#/shares" ? showShares() : showActivity();
  }
  showView("list-view");
  if (state.listStale) loadList();
  return null;
}

function wire() {
  // A token given may name another user than the one shown (a refused token replaced): show who it names.
  whenTokenNeeded(async (refused) => {
    const token = await askToken(refused);
    if (token) setTimeout(showWho); // once the token is kept, after the call that asked for it
    return token;
  });
  wirePeople();
  let searchTimer = null;
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    loadList();
  });
  $("filters").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => loadList(), SEARCH_DELAY_MS);
  });
  $("filters").addEventListener("reset", () => setTimeout(() => loadList()));
  $("load-more").addEventListener("click", () => loadList(true));
  $("compare-go").addEventListener("click", () => {
    const [a, b] = state.selected.keys();
    location.hash = compareHash(a, b);
  });
  $("compare-clear").addEventListener("click", () => {
    state.selected.clear();
    renderList();
  });
  $("session-download").addEventListener("click", () => download(`/api/v1/session/${state.open.timestamp}/export`,
    `storyart-session-${state.open.timestamp}.json`).catch((err) => toast(`Download failed: ${err.message}`, "error")));
  $("session-pin").addEventListener("click", togglePin);
  $("session-share").addEventListener("click", () => openShare(state.open));
  $("session-compare").addEventListener("click", pickOther);
  $("session-delete").addEventListener("click", askDelete);
  $("confirm-delete-form").addEventListener("submit", confirmDelete);
  $("confirm-delete-cancel").addEventListener("click", () => $("confirm-delete").close());
  $("pick-cancel").addEventListener("click", () => $("pick-dialog").close());
  $("pick-form").addEventListener("submit", (event) => event.preventDefault());
  $("token-cancel").addEventListener("click", () => $("token-dialog").close());
  $("backup").addEventListener("click", () => download("/api/v1/backup", "storyart-backup.zip")
    .then(() => toast("Backup downloaded."))
    .catch((err) => toast(`The backup could not be downloaded: ${err.message}`, "error")));

  $("import-open").addEventListener("click", () => openImport());
  $("import-files").addEventListener("change", (event) => chooseFiles([...event.target.files]));
  $("import-form").addEventListener("submit", runImport);
  $("import-close").addEventListener("click", () => $("import-dialog").close());
  $("import-dialog").addEventListener("close", () => {
    if (state.listStale && !$("list-view").hidden) loadList();
  });
  // Files dropped anywhere on the page (or on the dialog's drop zone) are offered for import.
  const zone = $("drop-zone");
  document.addEventListener("dragover", (event) => {
    if (event.dataTransfer && [...event.dataTransfer.types].includes("Files")) {
      event.preventDefault();
      zone.classList.add("dragging");
    }
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) zone.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    if (!event.dataTransfer || !event.dataTransfer.files.length) return;
    event.preventDefault();
    zone.classList.remove("dragging");
    openImport([...event.dataTransfer.files]);
  });

  window.addEventListener("hashchange", route);
  refreshHealth();
  setInterval(refreshHealth, HEALTH_EVERY_MS);
  showWho();
  route();
}

if (location.pathname.startsWith("/s/")) showShared(location.pathname.slice(3));
else wire();
