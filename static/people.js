// People on the history page: who is signed in, share links (made from a session, listed, revoked) and the
// activity log (docs/contract.md §6). A link's token is in the service's answer to its creation only (the service
// keeps a fingerprint of it), so this page remembers the links it made, in memory, until it is closed or
// reloaded; older links can be revoked but not copied.

import { call } from "./api.js";
import { fill, h, timeOf, toast } from "./dom.js";

const $ = (id) => document.getElementById(id);
const DEFAULT_SHARE_SECONDS = 7 * 86_400; // the service's default (docs/contract.md §6)
const ACTIVITY_PAGE = 50;
const ACTIONS = {
  save: "Saved",
  import: "Imported",
  delete: "Deleted",
  pin: "Pinned",
  unpin: "Unpinned",
  share: "Link made",
  "share-opened": "Link opened",
  revoke: "Link revoked",
};

const madeHere = new Map(); // share id -> its URL, for the links made in this page since it was loaded
const titles = new Map(); // session timestamp -> its title, for the sessions the page has seen
let sharing = null; // {timestamp, data} of the session the share dialog is for
let revoking = null; // the share the revoke dialog asks about
const activity = { events: [], more: false, seq: 0 };

/** Keep a session's title, to name it in the shares and activity lists. */
export function rememberTitle(timestamp, title) {
  titles.set(timestamp, title);
}

// ---------------------------------------------------------------------------------------------------- who

/** The signed-in user's name in the top bar; nothing in single-user mode, where nobody signs in. */
export async function showWho() {
  const who = $("whoami");
  try {
    const me = await call("/api/v1/me");
    fill(who, "Signed in as ", h("strong", null, me.user));
    who.hidden = !me.multiUser;
  } catch {
    who.hidden = true; // the list says why (no token, the service unreachable)
  }
}

// ------------------------------------------------------------------------------------------- copy a link

/** Put `url` on the clipboard where the browser allows it, else select it in `input` for the person to copy. */
async function copyLink(url, input, report) {
  try {
    await navigator.clipboard.writeText(url); // absent outside a secure context, refused without permission
    report("Link copied.");
  } catch {
    input.focus();
    input.select();
    report("The link is selected: copy it with Ctrl+C (⌘C on a Mac).");
  }
}

// ------------------------------------------------------------------------------------------- share dialog

function shareStatus(message, kind) {
  fill($("share-status"), message ? h("span", { class: kind === "error" ? "error" : null }, message) : null);
}

/** Open the dialog that makes a share link to `open` (the session shown). */
export function openShare(open) {
  sharing = open;
  $("share-form").reset();
  $("share-expiry").disabled = false;
  $("share-made").hidden = true;
  $("share-copy").hidden = true;
  $("share-go").hidden = false;
  $("share-go").disabled = false;
  shareStatus(null);
  $("share-dialog").showModal();
}

async function createShare(event) {
  event.preventDefault();
  const seconds = Number($("share-expiry").value) || null;
  $("share-go").disabled = true;
  shareStatus("Making the link…");
  let share;
  try {
    ({ share } = await call(`/api/v1/session/${sharing.timestamp}/shares`, {
      method: "POST",
      body: JSON.stringify(seconds ? { expiresInSeconds: seconds } : {}),
    }));
  } catch (err) {
    shareStatus(`No link was made: ${err.message}`, "error");
    $("share-go").disabled = false;
    return;
  }
  madeHere.set(share.id, share.url);
  $("share-url").value = share.url;
  // The service caps a link at its session's own expiry (unless pinned) and at SHARE_MAX_SECONDS.
  const shorter = share.expiresAt < share.createdAt + (seconds || DEFAULT_SHARE_SECONDS) * 1000 - 1000;
  fill($("share-expires"), "It opens until ", timeOf(share.expiresAt), shorter
    ? ": sooner than asked, as a link never outlives its session (pin the session to share it for longer) "
      + "nor the longest the service allows."
    : ".");
  $("share-made").hidden = false;
  $("share-expiry").disabled = true;
  $("share-go").hidden = true;
  $("share-copy").hidden = false;
  shareStatus(null);
  $("share-copy").focus();
}

// ------------------------------------------------------------------------------------------------- shares

function stateOf(share) {
  if (share.revoked) return "revoked";
  return share.expiresAt <= Date.now() ? "expired" : "active";
}

/** The titles of the sessions named in `stamps` that the page has not seen yet (one small request each). */
async function lookUpTitles(stamps) {
  const unknown = [...new Set(stamps)].filter((ts) => ts && !titles.has(ts));
  await Promise.all(unknown.map(async (ts) => {
    try {
      const answer = await call(`/api/v1/session/list?view=summary&limit=1&since=${ts}&until=${ts}`);
      if (answer.sessions[0]) titles.set(ts, answer.sessions[0].title || "Untitled session");
    } catch {
      // not known: the session is named by its time only
    }
  }));
}

function sessionCell(timestamp, linked = true) {
  if (!timestamp) return "–";
  const title = titles.get(timestamp);
  const when = timeOf(timestamp);
  if (!linked) return [title ? h("span", { class: "title" }, title) : null, " ", when];
  return [h("a", { href: `#/session/${timestamp}`, class: "title" }, title || "Session"), " ",
    h("span", { class: "sub" }, when)];
}

function shareLink(share) {
  const url = madeHere.get(share.id);
  if (!url || stateOf(share) !== "active") {
    return h("span", { class: "muted" }, "Not shown: the service keeps no copy of it");
  }
  const input = h("input", { type: "text", readonly: true, value: url, class: "link", "aria-label": "Link" });
  return h("div", { class: "link-copy" }, input, h("button", {
    type: "button",
    class: "copy",
    onclick: () => copyLink(url, input, (message) => toast(message)),
  }, "Copy link"));
}

function shareRow(share) {
  const state = stateOf(share);
  return h("tr", { "data-share": share.id, "data-state": state },
    h("td", { "data-label": "Session", class: "title-cell" }, sessionCell(share.timestamp)),
    h("td", { "data-label": "Created" }, timeOf(share.createdAt)),
    h("td", { "data-label": "Expires" }, timeOf(share.expiresAt)),
    h("td", { "data-label": "Opened", class: "num" }, String(share.opened)),
    h("td", { "data-label": "State" }, h("span", { class: `badge ${state}` }, state),
      state === "active" ? h("button", { type: "button", class: "danger revoke", onclick: () => askRevoke(share) },
        "Revoke") : null),
    h("td", { "data-label": "Link" }, shareLink(share)));
}

/** The Shares view, opened: its heading focused, the links loaded. */
export function showShares() {
  $("shares-title").focus();
  return loadShares();
}

/** The caller's share links, newest first. */
async function loadShares() {
  const empty = $("shares-empty");
  let answer;
  try {
    answer = await call("/api/v1/shares");
  } catch (err) {
    $("share-rows").replaceChildren();
    empty.hidden = false;
    fill(empty, h("strong", null, "The links could not be loaded: "), err.message);
    return;
  }
  const shares = [...answer.shares].sort((a, b) => b.createdAt - a.createdAt);
  await lookUpTitles(shares.map((share) => share.timestamp));
  $("shares-partial").hidden = !answer.partial;
  fill($("share-rows"), shares.map(shareRow));
  const active = shares.filter((share) => stateOf(share) === "active").length;
  $("shares-total").textContent = `${shares.length} link${shares.length === 1 ? "" : "s"}, ${active} active`;
  empty.hidden = shares.length > 0;
  fill(empty, "No share links yet. Open a session and choose Share… to make one.");
}

function askRevoke(share) {
  revoking = share;
  const title = titles.get(share.timestamp);
  fill($("confirm-revoke-text"), "The link to ", title ? h("strong", null, title) : "the session", " saved ",
    timeOf(share.timestamp), ", made ", timeOf(share.createdAt), `, opened ${share.opened} `,
    share.opened === 1 ? "time." : "times.");
  $("confirm-revoke").showModal();
}

async function confirmRevoke(event) {
  event.preventDefault();
  const share = revoking;
  $("confirm-revoke").close();
  try {
    await call(`/api/v1/shares/${encodeURIComponent(share.id)}`, { method: "DELETE" });
    madeHere.delete(share.id);
    toast("Revoked: the link opens nothing any more.");
  } catch (err) {
    toast(`The link was not revoked: ${err.message}`, "error");
  }
  loadShares();
}

// ----------------------------------------------------------------------------------------------- activity

function eventRow(event) {
  return h("tr", { "data-action": event.action },
    h("td", { "data-label": "When" }, timeOf(event.at)),
    h("td", { "data-label": "What" }, ACTIONS[event.action] || event.action,
      event.shareId ? h("span", { class: "sub" }, `link ${event.shareId}`) : null),
    h("td", { "data-label": "Session", class: "title-cell" },
      sessionCell(event.timestamp, event.action !== "delete")),
    h("td", { "data-label": "From" }, event.from || "–"));
}

/** The caller's newest events, or (`older`) the page of events before the last one shown. */
export async function showActivity(older = false) {
  const seq = ++activity.seq;
  const before = older && activity.events.length ? activity.events.at(-1).at : null;
  const params = new URLSearchParams({ limit: String(ACTIVITY_PAGE) });
  if (before) params.set("before", String(before));
  const empty = $("activity-empty");
  $("activity-more").disabled = true;
  if (!older) $("activity-title").focus();
  let answer;
  try {
    answer = await call(`/api/v1/activity?${params}`);
  } catch (err) {
    if (seq !== activity.seq) return;
    empty.hidden = false;
    fill(empty, h("strong", null, "The activity could not be loaded: "), err.message);
    $("activity-more").hidden = true;
    return;
  }
  if (seq !== activity.seq) return;
  activity.events = older ? [...activity.events, ...answer.events] : answer.events;
  activity.more = answer.events.length === ACTIVITY_PAGE;
  $("activity-partial").hidden = !answer.partial;
  fill($("activity-rows"), activity.events.map(eventRow));
  empty.hidden = activity.events.length > 0;
  fill(empty, "Nothing yet: saves, deletes, pins, imports and share links appear here.");
  $("activity-more").hidden = !activity.more;
  $("activity-more").disabled = false;
}

// ----------------------------------------------------------------------------------------------------- wire

/** Attach the share dialog, the revoke confirmation and the activity's paging. */
export function wirePeople() {
  $("share-form").addEventListener("submit", createShare);
  $("share-close").addEventListener("click", () => $("share-dialog").close());
  $("share-copy").addEventListener("click", () => copyLink($("share-url").value, $("share-url"),
    (message) => shareStatus(message)));
  $("confirm-revoke-form").addEventListener("submit", confirmRevoke);
  $("confirm-revoke-cancel").addEventListener("click", () => $("confirm-revoke").close());
  $("activity-more").addEventListener("click", () => showActivity(true));
}
