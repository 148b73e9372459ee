// Talking to the daemon: the token (asked once, kept in this tab), JSON requests, and the
// live event stream.

const TOKEN_KEY = "plugin-host-token";

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export class HttpError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

export async function request(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let reply;
  try {
    reply = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
  } catch (err) {
    throw new HttpError(0, "Unreachable", `the daemon did not answer (${err.message})`);
  }
  let data = null;
  try {
    data = await reply.json();
  } catch {
    data = null;
  }
  if (!reply.ok) {
    const error = (data && data.error) || {};
    throw new HttpError(reply.status, error.type || reply.statusText, error.message || `HTTP ${reply.status}`);
  }
  return data;
}

// The host's events (GET /events), read with fetch() rather than EventSource: fetch can
// send the Authorization header (so the token never goes into a URL) and sees every event
// name (EventSource has no wildcard listener). It reconnects with Last-Event-ID, like
// EventSource would.
export function follow(onEvent, onState) {
  let lastId = null;
  let stopped = false;
  let delay = 500;
  const controller = new AbortController();

  function dispatch(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue; // a comment (keepalive)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
      else if (field === "id") lastId = value;
    }
    if (!data.length) return;
    try {
      onEvent(name, JSON.parse(data.join("\n")));
    } catch (err) {
      console.warn("unreadable event", err);
    }
  }

  async function once() {
    const headers = { Accept: "text/event-stream" };
    const token = getToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    const url = lastId === null ? "/events?backlog=100" : "/events";
    const reply = await fetch(url, { headers, signal: controller.signal, cache: "no-store" });
    if (!reply.ok) throw new HttpError(reply.status, "EventStream", `GET /events: HTTP ${reply.status}`);
    onState(true);
    delay = 500;
    const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffered += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffered.indexOf("\n\n")) >= 0) {
        dispatch(buffered.slice(0, end));
        buffered = buffered.slice(end + 2);
      }
    }
  }

  (async () => {
    while (!stopped) {
      try {
        await once();
      } catch (err) {
        if (stopped) return;
        onState(false, err);
      }
      if (stopped) return;
      onState(false);
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 10_000);
    }
  })();

  return {
    stop() {
      stopped = true;
      controller.abort();
    },
  };
}
