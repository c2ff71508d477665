// Calls to this service's own API (same origin only), with its API token when it asks for one.
//
// With API_TOKEN set every /api/v1/... call needs `Authorization: Bearer <token>`: the first 401 asks the person
// for the token (through the function given to `whenTokenNeeded`), keeps it in sessionStorage for this tab and
// repeats the call; a token the service refuses is asked for again. A share link's page calls `anonymous`ly: no
// token is sent (even one this tab holds) and none is asked for, since the link itself is the permission.

const TOKEN_KEY = "storyart.apiToken";
const TIMEOUT_MS = 60_000; // an import of many megabytes still fits

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let askForToken = null;
let pendingAsk = null;

/** `ask(refused)` resolves to a token, or null when the person gives up. */
export function whenTokenNeeded(ask) {
  askForToken = ask;
}

/** One question at a time, however many calls were refused together. */
function tokenFromPerson(refused) {
  if (!pendingAsk) {
    pendingAsk = Promise.resolve(askForToken ? askForToken(refused) : null).finally(() => {
      pendingAsk = null;
    });
  }
  return pendingAsk;
}

async function send(path, options) {
  const headers = {};
  const token = options.anonymous ? null : sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  try {
    return {
      token,
      response: await fetch(path, {
        method: options.method || "GET",
        headers,
        body: options.body,
        cache: "no-store",
        credentials: "same-origin",
        redirect: "error",
        signal: AbortSignal.timeout(TIMEOUT_MS),
      }),
    };
  } catch (err) {
    const what = err && err.name === "TimeoutError" ? "did not answer in time" : "cannot be reached";
    throw new ApiError(0, `The session service ${what}.`);
  }
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return new ApiError(response.status, body.error);
  } catch {
    // not the service's JSON (a proxy's page): the status says enough
  }
  return new ApiError(response.status, `The service answered ${response.status} ${response.statusText}.`);
}

/** The answer to `path` (a Response with `raw`, else its JSON); ApiError with the service's message if not 2xx.
 * `options`: `method`, `body` (JSON text), `raw`, and `anonymous` (no token sent or asked for). */
export async function call(path, options = {}) {
  for (;;) {
    const { token, response } = await send(path, options);
    if (response.status === 401 && path.startsWith("/api/") && !options.anonymous) {
      const given = await tokenFromPerson(Boolean(token));
      if (!given) throw await errorOf(response);
      sessionStorage.setItem(TOKEN_KEY, given);
      continue;
    }
    if (!response.ok) throw await errorOf(response);
    return options.raw ? response : response.json();
  }
}

/** Save what `path` answers as a file, named as the service's Content-Disposition says (else `fallback`). */
export async function download(path, fallback) {
  const response = await call(path, { raw: true });
  const disposition = response.headers.get("Content-Disposition") || "";
  const named = /filename="([^"]+)"/.exec(disposition);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = named ? named[1] : fallback;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
