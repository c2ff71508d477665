// Building the page from data without ever parsing data as HTML: every text goes in as a text node, so a
// session's `<script>` or `onerror=` stays text (no HTML parsing sink is used anywhere in the page).

/** `h("p", {class: "x", onclick: fn}, "text", child)`: an element; strings become text nodes, null is skipped. */
export function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace everything inside `node` with `children`. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

export function formatBytes(bytes) {
  if (typeof bytes !== "number") return "–";
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(bytes < 10 * 1024 ? 1 : 0)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

const DATE_TIME = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

/** A `<time>` for a timestamp in ms: local time for people, ISO in `datetime` for machines. */
export function timeOf(ms) {
  const date = new Date(ms);
  return h("time", { datetime: date.toISOString(), title: date.toISOString() }, DATE_TIME.format(date));
}

/** The value as text for reading: strings as they are, anything else as indented JSON. */
export function asText(value) {
  if (typeof value === "string") return value;
  if (value === undefined) return "–";
  return JSON.stringify(value, null, 2);
}

/** A readable rendering of any JSON value: a definition list for objects, a list for arrays, text otherwise. */
export function anyValue(value, depth = 0) {
  if (value === null || typeof value !== "object") return h("span", { class: "value" }, asText(value));
  if (depth > 6) return h("pre", { class: "raw" }, JSON.stringify(value, null, 2));
  if (Array.isArray(value)) {
    if (value.every((item) => item === null || typeof item !== "object")) {
      return h("span", { class: "value" }, value.map(asText).join(", ") || "–");
    }
    return h("ol", { class: "values" }, value.map((item) => h("li", null, anyValue(item, depth + 1))));
  }
  return h("dl", { class: "fields" }, Object.entries(value).map(([key, item]) => [
    h("dt", null, key),
    h("dd", null, anyValue(item, depth + 1)),
  ]));
}

/** Announce `message` briefly (success or failure of an action) in the page's live region. */
export function toast(message, kind = "ok") {
  const region = document.getElementById("toast");
  fill(region, h("p", { class: `toast-item ${kind}` }, message));
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => region.replaceChildren(), kind === "error" ? 10_000 : 4_000);
}
