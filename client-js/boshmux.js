// boshmux-client: a page's connection to boshmux (SPEC §4): XMPP over WebSocket (RFC 7395),
// authenticated with the boshmux_token cookie (SASL EXTERNAL) or a token (SASL PLAIN), with
// boshmux's status notices (§6.8) and automatic reconnection that follows its close codes.
//
// One instance is one page of the user's shared session: every page binds the session's one full
// JID, gets every inbound stanza, and sees what other pages send as XEP-0280 carbons.

import { Element, XmlError, parse, xml } from "./xml.js";

export { Element, XmlError, parse, xml };

const NS = {
  CLIENT: "jabber:client",
  FRAMING: "urn:ietf:params:xml:ns:xmpp-framing",
  STREAM: "http://etherx.jabber.org/streams",
  SASL: "urn:ietf:params:xml:ns:xmpp-sasl",
  BIND: "urn:ietf:params:xml:ns:xmpp-bind",
  STANZAS: "urn:ietf:params:xml:ns:xmpp-stanzas",
  STREAMS: "urn:ietf:params:xml:ns:xmpp-streams",
  CARBONS: "urn:xmpp:carbons:2",
  FORWARD: "urn:xmpp:forward:0",
  MUC: "http://jabber.org/protocol/muc",
  STATUS: "urn:boshmux:status:0",
};

/** The WebSocket close codes boshmux uses (SPEC §4); the daemon defines the same values. */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY: 1008,
  RESTARTING: 1012,
  REVOKED: 4001,
  SLOW: 4002,
  TOO_MANY_PAGES: 4003,
  LOST: 4004,
});

// Close codes after which reconnecting cannot help: a normal close, a policy violation (the same
// page would be refused again), revoked, too many pages, upstream gone for good. Every other code
// — restarting, too slow, no pong, 1006 network — is worth a retry.
const FINAL_CODES = new Set([
  CloseCode.NORMAL,
  CloseCode.POLICY,
  CloseCode.REVOKED,
  CloseCode.TOO_MANY_PAGES,
  CloseCode.LOST,
]);

// How long to wait for the other side's close once `<close/>` went either way.
const LINGER_MS = 2000;

/** An error with an XMPP condition: a stanza, SASL or stream error's, or "timeout" / "disconnected". */
export class BoshmuxError extends Error {
  name = "BoshmuxError";

  constructor(condition, message, { stanza, code } = {}) {
    super(message ?? condition);
    this.condition = condition;
    if (stanza) this.stanza = stanza;
    if (code !== undefined) this.code = code;
  }
}

let counter = 0;
const idPrefix = Math.random().toString(36).slice(2, 8);
function nextId() {
  return `${idPrefix}-${++counter}`;
}

// PLAIN's credentials are UTF-8 (RFC 4616); btoa alone takes Latin-1 only.
function base64(text) {
  return btoa(String.fromCharCode(...new TextEncoder().encode(text)));
}

// The condition of a stanza, SASL or stream error element: its first child other than <text/>.
function conditionOf(error) {
  return error?.getChildren().find((c) => c.localName !== "text")?.localName ?? "undefined-condition";
}

function bareOf(jid) {
  return jid.split("/")[0];
}

/**
 * One socket and its RFC 7395 handshake. Frames are read one at a time until bind; afterwards the
 * client dispatches them as they come.
 */
class Connection {
  frames = [];
  waiter = null;
  failure = null;
  bound = false;
  /** Set when this side ends the connection: `{ reason, retry }` decides in place of the close code. */
  ending = null;
  lingerTimer = null;
  /** Frames written before the socket opened (send() would throw then). */
  unsent = [];

  constructor(ws) {
    this.ws = ws;
    ws.addEventListener("open", () => {
      for (const text of this.unsent.splice(0)) ws.send(text);
    });
  }

  write(el) {
    if (this.ws.readyState === 0) this.unsent.push(el.toString());
    else this.ws.send(el.toString());
  }

  push(el) {
    if (this.waiter) {
      this.waiter.resolve(el);
      this.waiter = null;
    } else {
      this.frames.push(el);
    }
  }

  fail(error) {
    this.failure ??= error;
    this.waiter?.reject(this.failure);
    this.waiter = null;
  }

  next() {
    if (this.frames.length) return Promise.resolve(this.frames.shift());
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => (this.waiter = { resolve, reject }));
  }

  /** Ends the connection from this side: `<close/>` once bound (RFC 7395 §3.6), else just the socket. */
  end(reason, retry) {
    this.ending ??= { reason, retry };
    if (this.bound && this.ws.readyState === 1) {
      this.write(xml("close", { xmlns: NS.FRAMING }));
      this.linger();
    } else if (this.ws.readyState < 2) {
      this.ws.close(1000);
    }
  }

  /** Closes the socket if the server has not done so shortly after `<close/>`. */
  linger() {
    clearTimeout(this.lingerTimer);
    this.lingerTimer = setTimeout(() => this.ws.close(1000), LINGER_MS);
  }
}

export class BoshmuxClient {
  #opts;
  #listeners = new Map();
  #conn = null;
  #state = "offline";
  #jid = null;
  #connecting = null;
  /** iq id → { resolve, reject, timer, stanza, conn: the connection it was written on } */
  #pending = new Map();
  /** Stanzas sent while (re)connecting, written after the next bind. */
  #queue = [];
  /** The last undirected available presence and the MUC joins: what a new page must repeat. */
  #presence = null;
  #rooms = new Map();
  #everOnline = false;
  #stopped = false;
  #attempt = 0;
  #retryTimer = null;

  constructor({
    url,
    domain,
    username,
    token,
    statusNotices = true,
    reconnect = true,
    initialDelay = 500,
    maxDelay = 30000,
    iqTimeout = 30000,
    WebSocket = globalThis.WebSocket,
  } = {}) {
    if (!domain) throw new TypeError("domain is required");
    if (token && !username) throw new TypeError("a token needs the username (localpart) it belongs to");
    if (!WebSocket) throw new TypeError("no WebSocket implementation: pass one as the WebSocket option");
    if (!url) {
      if (typeof location === "undefined") throw new TypeError("url is required outside a browser");
      url = `${location.protocol === "https:" ? "wss://" : "ws://"}${location.host}/ws`;
    }
    this.#opts = {
      url,
      domain,
      username,
      token,
      statusNotices,
      reconnect,
      initialDelay,
      maxDelay,
      iqTimeout,
      WebSocket,
    };
  }

  /** The session's full JID once bound, else null. */
  get jid() {
    return this.#jid;
  }

  /** "offline" | "connecting" | "online" | "reconnecting" */
  get state() {
    return this.#state;
  }

  on(event, listener) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(listener);
    return this;
  }

  off(event, listener) {
    this.#listeners.get(event)?.delete(listener);
    return this;
  }

  #emit(event, ...args) {
    for (const listener of [...(this.#listeners.get(event) ?? [])]) {
      try {
        listener(...args);
      } catch (e) {
        // An application bug must not break the connection's state machine; report it the way an
        // uncaught exception would be.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  /** Connects, authenticates and binds; resolves with the full JID. A failure of this first attempt rejects and is not retried. */
  connect() {
    if (this.#state === "online") return Promise.resolve(this.#jid);
    if (!this.#connecting) {
      if (this.#state === "offline") {
        this.#state = "connecting";
        this.#stopped = false;
        this.#everOnline = false;
        this.#attempt = 0;
        this.#presence = null;
        this.#rooms.clear();
      }
      // While reconnecting, this is the next attempt, now.
      clearTimeout(this.#retryTimer);
      this.#connecting = this.#open().finally(() => (this.#connecting = null));
    }
    return this.#connecting;
  }

  /** Sends a stanza (message, presence or iq); queued while (re)connecting. */
  send(stanza) {
    if (!(stanza instanceof Element) || !["message", "presence", "iq"].includes(stanza.name)) {
      // boshmux answers anything else with a stream error and closes the page (SPEC §5).
      throw new TypeError("send() takes a message, presence or iq element");
    }
    if (this.#state === "offline") throw new BoshmuxError("disconnected", "not connected");
    if (!("xmlns" in stanza.attrs)) stanza.attrs = { xmlns: NS.CLIENT, ...stanza.attrs };
    this.#remember(stanza);
    if (this.#state === "online") this.#write(this.#conn, stanza);
    else this.#queue.push(stanza);
  }

  #write(conn, stanza) {
    conn.write(stanza);
    const entry = this.#pending.get(stanza.attr("id"));
    if (entry?.stanza === stanza) entry.conn = conn;
  }

  /** Sends an iq get/set; resolves with the result, rejects with a BoshmuxError on error or timeout. */
  iq(stanza, { timeout = this.#opts.iqTimeout } = {}) {
    if (!(stanza instanceof Element) || stanza.name !== "iq" || !["get", "set"].includes(stanza.attr("type"))) {
      return Promise.reject(new TypeError("iq() takes an iq of type get or set"));
    }
    stanza.attrs.id ??= nextId();
    const id = stanza.attrs.id;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new BoshmuxError("timeout", `no answer to iq ${id} within ${timeout} ms`));
      }, timeout);
      this.#pending.set(id, { resolve, reject, timer, stanza, conn: null });
      try {
        this.send(stanza);
      } catch (e) {
        this.#settle(id, null, e);
      }
    });
  }

  /** Sends a message with a body; returns the stanza sent (its id included). */
  message(to, body, { type = "chat", id = nextId() } = {}) {
    const stanza = xml("message", { to, type, id }, xml("body", {}, body));
    this.send(stanza);
    return stanza;
  }

  /** Sends presence; the last undirected available one is repeated after every reconnect. */
  presence({ to, type, show, status, priority } = {}) {
    const stanza = xml(
      "presence",
      { to, type },
      show && xml("show", {}, show),
      status && xml("status", {}, status),
      priority !== undefined && priority !== null && xml("priority", {}, priority),
    );
    this.send(stanza);
    return stanza;
  }

  /** Ends this page's stream; never reconnects. Resolves once the socket is closed. */
  close() {
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    this.#goOffline();
    const conn = this.#conn;
    if (!conn) return Promise.resolve();
    return new Promise((resolve) => {
      conn.ws.addEventListener("close", () => resolve());
      conn.end("closed by the client", false);
    });
  }

  // Tracks what a new page has to repeat so that the user looks the same after a reconnect.
  #remember(stanza) {
    if (stanza.name !== "presence") return;
    const to = stanza.attr("to");
    const type = stanza.attr("type");
    if (!to) {
      if (type === undefined) this.#presence = stanza;
      else if (type === "unavailable") this.#presence = null;
    } else if (type === undefined && stanza.getChild("x", NS.MUC)) {
      this.#rooms.set(bareOf(to), stanza);
    } else if (type === "unavailable") {
      this.#rooms.delete(bareOf(to));
    }
  }

  async #open() {
    const { WebSocket, url, iqTimeout } = this.#opts;
    const ws = new WebSocket(url, "xmpp");
    const conn = new Connection(ws);
    this.#conn = conn;
    ws.addEventListener("message", (e) => this.#onFrame(conn, e.data));
    // The close event that always follows says all there is to say; but node's ws package throws
    // an `error` that has no listener (a refused connection, say).
    ws.addEventListener("error", () => {});
    ws.addEventListener("close", (e) => {
      clearTimeout(conn.lingerTimer);
      conn.fail(
        new BoshmuxError("disconnected", `connection closed (${e.code}${e.reason ? ` ${e.reason}` : ""})`, {
          code: e.code,
        }),
      );
      this.#onClose(conn, e.code, e.reason);
    });
    // The whole handshake must finish in time, or this attempt is over (and maybe retried).
    const deadline = setTimeout(
      () => conn.fail(new BoshmuxError("timeout", `no handshake within ${iqTimeout} ms`)),
      iqTimeout,
    );
    try {
      const jid = await this.#handshake(conn);
      clearTimeout(deadline);
      await this.#bound(conn, jid);
      return jid;
    } catch (e) {
      clearTimeout(deadline);
      if (this.#conn === conn) {
        // This side gives up on a socket that is still open: settle the client's state now (the
        // socket's own close is then ignored), so that it is final when connect() rejects.
        conn.end(e.condition ?? e.message, e.condition === "timeout" || e.condition === "temporary-auth-failure");
        this.#onClose(conn, 1000, "");
      }
      throw e;
    }
  }

  async #handshake(conn) {
    const { domain, username, token } = this.#opts;
    const mechanism = token ? "PLAIN" : "EXTERNAL";
    const offered = (await this.#openStream(conn))
      .getChild("mechanisms", NS.SASL)
      ?.getChildren("mechanism")
      .map((m) => m.text());
    if (!offered?.includes(mechanism)) {
      const hint = token ? "" : " (no valid boshmux_token cookie, or this page's origin is not allowed)";
      throw new BoshmuxError("invalid-mechanism", `the server does not offer ${mechanism}${hint}`);
    }
    // EXTERNAL's empty response is "=" (RFC 6120 §6.4.2).
    conn.write(xml("auth", { xmlns: NS.SASL, mechanism }, token ? base64(`\0${username}\0${token}`) : "="));
    const answer = await conn.next();
    if (!answer.is("success", NS.SASL)) {
      const condition = answer.is("failure", NS.SASL) ? conditionOf(answer) : "not-authorized";
      throw new BoshmuxError(condition, `authentication failed: ${condition}`, { stanza: answer });
    }
    if (!(await this.#openStream(conn)).getChild("bind", NS.BIND)) {
      throw new BoshmuxError("undefined-condition", "the server offers no resource binding");
    }
    // boshmux marks the legacy session optional, so it is skipped; the requested resource would be
    // ignored (every page binds the session's one full JID), so none is asked for.
    const id = nextId();
    conn.write(xml("iq", { xmlns: NS.CLIENT, type: "set", id }, xml("bind", { xmlns: NS.BIND })));
    const result = await conn.next();
    const jid = result.getChild("bind", NS.BIND)?.getChild("jid", NS.BIND)?.text();
    if (!result.is("iq", NS.CLIENT) || result.attr("id") !== id || result.attr("type") !== "result" || !jid) {
      const condition = conditionOf(result.getChild("error"));
      throw new BoshmuxError(condition, `resource binding failed: ${condition}`, { stanza: result });
    }
    return jid;
  }

  /** Sends `<open/>`, reads the server's `<open/>` and returns the stream features. */
  async #openStream(conn) {
    conn.write(xml("open", { xmlns: NS.FRAMING, to: this.#opts.domain, version: "1.0" }));
    const open = await conn.next();
    if (!open.is("open", NS.FRAMING))
      throw new BoshmuxError("invalid-namespace", `expected <open/>, got <${open.name}/>`);
    const features = await conn.next();
    if (!features.is("features", NS.STREAM)) {
      throw new BoshmuxError("invalid-namespace", `expected stream features, got <${features.name}/>`);
    }
    return features;
  }

  async #bound(conn, jid) {
    conn.bound = true;
    this.#jid = jid;
    this.#state = "online";
    this.#attempt = 0;
    // A new page counts as available only once it has sent presence itself (SPEC §6.6), and
    // rooms the last page left were left upstream: repeat both, then what was sent meanwhile.
    const repeat = this.#everOnline ? [this.#presence, ...this.#rooms.values()].filter(Boolean) : [];
    const queued = this.#queue.splice(0).filter((stanza) => !repeat.includes(stanza));
    for (const stanza of [...repeat, ...queued]) this.#write(conn, stanza);
    if (this.#opts.statusNotices) {
      // A server that is not boshmux answers with an error: there are no notices then, nothing else.
      await this.iq(xml("iq", { type: "set" }, xml("enable", { xmlns: NS.STATUS }))).catch(() => {});
    }
    if (this.#conn !== conn || this.#state !== "online") {
      throw new BoshmuxError("disconnected", "connection closed right after binding");
    }
    this.#everOnline = true;
    this.#emit("status", "connected");
    this.#emit("online", jid);
  }

  #onFrame(conn, data) {
    if (this.#conn !== conn) return;
    let el;
    try {
      el = parse(data);
    } catch (e) {
      this.#fault(conn, new BoshmuxError("not-well-formed", `unreadable frame from the server: ${e.message}`));
      return;
    }
    if (el.is("close", NS.FRAMING)) {
      // The server ends the stream; its WebSocket close (with the code that matters) follows.
      conn.linger();
    } else if (el.is("error", NS.STREAM)) {
      const condition = conditionOf(el);
      const text = el.getChild("text", NS.STREAMS)?.text();
      this.#fault(
        conn,
        new BoshmuxError(condition, `stream error: ${condition}${text ? ` (${text})` : ""}`, { stanza: el }),
      );
    } else if (!conn.bound) {
      conn.push(el);
    } else if (this.#state === "online") {
      // (Not after close(): what the server still sends then is for nobody.)
      this.#dispatch(el);
    }
  }

  // During the handshake a fault fails the attempt (connect() rejects with it); later it is an
  // `error` event, as no promise is waiting.
  #fault(conn, error) {
    if (conn.bound) this.#emit("error", error);
    else conn.fail(error);
  }

  #dispatch(stanza) {
    this.#emit("stanza", stanza);
    const type = stanza.attr("type");
    if (stanza.name === "iq") {
      if (type === "result" || type === "error") {
        // boshmux delivers only the answer from the addressee of this page's own request (SPEC §6.1).
        const id = stanza.attr("id");
        if (type === "result") this.#settle(id, stanza);
        else {
          const error = stanza.getChild("error");
          const condition = conditionOf(error);
          const text = error?.getChild("text", NS.STANZAS)?.text();
          this.#settle(
            id,
            null,
            new BoshmuxError(condition, `iq error: ${condition}${text ? ` (${text})` : ""}`, { stanza }),
          );
        }
      } else {
        // No automatic error reply: boshmux takes the first page's answer, and answers
        // service-unavailable itself when no page does (SPEC §6.2).
        this.#emit("iq", stanza);
      }
    } else if (stanza.name === "message") {
      const status = stanza.getChild("status", NS.STATUS);
      const sent = stanza.getChild("sent", NS.CARBONS);
      const from = stanza.attr("from");
      if (status && from === this.#opts.domain) {
        this.#emit("status", status.attr("state"));
      } else if (sent && from === bareOf(this.#jid)) {
        // Only carbons from the user's own bare JID are genuine (XEP-0280 §11).
        const inner = sent.getChild("forwarded", NS.FORWARD)?.getChild("message");
        if (inner) this.#emit("carbon", inner, stanza);
      } else {
        this.#emit("message", stanza);
      }
    } else if (stanza.name === "presence") {
      this.#emit("presence", stanza);
    }
  }

  #settle(id, result, error) {
    const entry = this.#pending.get(id);
    if (!entry) return;
    this.#pending.delete(id);
    clearTimeout(entry.timer);
    if (error) entry.reject(error);
    else entry.resolve(result);
  }

  #onClose(conn, code, reason) {
    if (this.#conn !== conn) return;
    this.#conn = null;
    // Answers to requests written on this socket can never come; queued ones wait for the next.
    for (const [id, entry] of this.#pending) {
      if (entry.conn === conn)
        this.#settle(
          id,
          null,
          new BoshmuxError("disconnected", `connection closed before iq ${id} was answered`, { code }),
        );
    }
    const retry = conn.ending ? conn.ending.retry : !FINAL_CODES.has(code);
    const willReconnect = retry && this.#opts.reconnect && this.#everOnline && !this.#stopped;
    if (willReconnect) {
      this.#state = "reconnecting";
      const base = Math.min(this.#opts.maxDelay, this.#opts.initialDelay * 2 ** this.#attempt++);
      // Jitter spreads the reconnects of every page of every user after a daemon restart.
      const delay = base / 2 + (Math.random() * base) / 2;
      // A failed attempt's close is reported by its own `disconnect`; other failures (say, the token
      // was refused) are reported here, as no promise is waiting.
      this.#retryTimer = setTimeout(
        () => this.connect().catch((e) => e.condition !== "disconnected" && this.#emit("error", e)),
        delay,
      );
    } else {
      this.#goOffline();
    }
    this.#emit("disconnect", { code, reason: conn.ending?.reason ?? reason, willReconnect });
  }

  #goOffline() {
    this.#state = "offline";
    this.#jid = null;
    for (const stanza of this.#queue.splice(0)) {
      if (stanza.name === "iq")
        this.#settle(stanza.attr("id"), null, new BoshmuxError("disconnected", "not connected"));
    }
  }
}
