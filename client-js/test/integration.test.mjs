// BoshmuxClient against the real daemon in front of a real XMPP server. The Rust test harness
// starts both and sets
//   BOSHMUX_HTTP     the daemon's base URL, e.g. http://127.0.0.1:5380
//   BOSHMUX_API_KEY  its api key (the tests hand users off themselves)
//   BOSHMUX_DOMAIN   the XMPP domain
//   BOSHMUX_USERS    user:password,user:password… — at least two accounts that are mutual contacts
// and optionally BOSHMUX_ORIGIN, an allowed origin, for the cookie (EXTERNAL) test.
// Without the four required variables these tests fail, so that a harness that forgets them is
// noticed; BOSHMUX_CLIENT_JS_UNIT_ONLY=1 skips them instead.
import assert from "node:assert/strict";
import { test } from "node:test";
import WebSocket from "ws";

import { BoshmuxClient, xml } from "../boshmux.js";
import { next, sleep } from "../test-support/fake-server.mjs";

const env = process.env;
const missing = ["BOSHMUX_HTTP", "BOSHMUX_API_KEY", "BOSHMUX_DOMAIN", "BOSHMUX_USERS"].filter((k) => !env[k]);
const unitOnly = env.BOSHMUX_CLIENT_JS_UNIT_ONLY === "1";

/** An integration test: skipped when asked for unit tests only, failing when the environment is missing. */
function itest(name, fn, skip = false) {
  test(name, { timeout: 30000, skip: unitOnly ? "BOSHMUX_CLIENT_JS_UNIT_ONLY=1" : skip }, (t) => {
    assert.deepEqual(
      missing,
      [],
      "not set: run under the Rust test harness, or set BOSHMUX_CLIENT_JS_UNIT_ONLY=1 for unit tests only",
    );
    return fn(t);
  });
}

const http = env.BOSHMUX_HTTP?.replace(/\/+$/, "");
const domain = env.BOSHMUX_DOMAIN;
const users = (env.BOSHMUX_USERS ?? "").split(",").map((pair) => {
  const at = pair.indexOf(":");
  const user = pair.slice(0, at);
  return { bare: user.includes("@") ? user : `${user}@${domain}`, password: pair.slice(at + 1) };
});
const [A, B] = users;
if (!missing.length) assert.ok(users.length >= 2 && B.password, "BOSHMUX_USERS needs two user:password pairs");

function api(method, path, body) {
  return fetch(`${http}/api/v1${path}`, {
    method,
    headers: { authorization: `Bearer ${env.BOSHMUX_API_KEY}`, "content-type": "application/json" },
    body: body && JSON.stringify(body),
  });
}

/** Logs a user in through the handoff API (SPEC §3). */
async function handoff(user) {
  const response = await api("POST", "/sessions", { jid: user.bare, password: user.password });
  assert.ok([200, 201].includes(response.status), `handoff of ${user.bare}: HTTP ${response.status}`);
  return response.json();
}

/** A connected client of `user` with a fresh token, closed after the test. */
async function page(t, user, options = {}) {
  const { token } = await handoff(user);
  const client = new BoshmuxClient({
    url: `${http.replace(/^http/, "ws")}/ws`,
    domain,
    username: user.bare.split("@")[0],
    token,
    WebSocket,
    ...options,
  });
  t.after(() => client.close());
  await client.connect();
  return client;
}

const withBody = (text) => (message) => message.getChild("body")?.text() === text;
const unique = (what) => `${what} ${Math.random().toString(36).slice(2)}`;

itest("connect() with a token binds the session's full JID", async (t) => {
  const { jid } = await handoff(A);
  const client = await page(t, A);
  assert.equal(client.jid, jid);
  assert.ok(jid.startsWith(`${A.bare}/`), jid);
  assert.equal(client.state, "online");
});

itest("the daemon answers the status notice opt-in", async (t) => {
  const client = await page(t, A, { statusNotices: false });
  const result = await client.iq(xml("iq", { type: "set" }, xml("enable", { xmlns: "urn:boshmux:status:0" })));
  assert.equal(result.attr("type"), "result");
});

itest("two clients of one user share one full JID", async (t) => {
  const one = await page(t, A);
  const two = await page(t, A);
  assert.equal(one.jid, two.jid);
});

itest("a message from a contact reaches every client of the user", async (t) => {
  const a1 = await page(t, A);
  const a2 = await page(t, A);
  const b = await page(t, B);
  const text = unique("hello from B");
  const arrivals = [next(a1, "message", withBody(text)), next(a2, "message", withBody(text))];
  b.message(a1.jid, text);
  for (const [message] of await Promise.all(arrivals)) {
    assert.equal(message.attr("from"), b.jid);
    assert.equal(message.attr("type"), "chat");
  }
});

itest("what one client sends reaches the contact, and the user's other client as a carbon", async (t) => {
  const a1 = await page(t, A);
  const a2 = await page(t, A);
  const b = await page(t, B);
  const text = unique("hello from A");
  const atB = next(b, "message", withBody(text));
  const carbon = next(a2, "carbon", withBody(text));
  const sent = a1.message(b.jid, text);
  const [received] = await atB;
  assert.equal(received.attr("from"), a1.jid);
  const [inner, outer] = await carbon;
  assert.equal(inner.attr("to"), b.jid);
  assert.equal(inner.attr("id"), sent.attr("id"));
  assert.equal(outer.attr("from"), A.bare);
});

itest("iq() to the domain resolves; an error rejects with its condition", async (t) => {
  const client = await page(t, A);
  const DISCO = "http://jabber.org/protocol/disco#info";
  const info = await client.iq(xml("iq", { type: "get", to: domain }, xml("query", { xmlns: DISCO })));
  assert.equal(info.attr("from"), domain);
  assert.ok(info.getChild("query", DISCO).getChild("identity", DISCO));
  await assert.rejects(
    client.iq(xml("iq", { type: "get", to: `nobody-${Date.now()}@${domain}` }, xml("query", { xmlns: DISCO }))),
    (e) => typeof e.condition === "string" && e.stanza?.attr("type") === "error",
  );
});

itest(
  "a page with the handoff cookie authenticates with EXTERNAL",
  async (t) => {
    const { ticket, jid } = await handoff(A);
    // The browser's redirect through /handoff, which sets the HttpOnly cookie.
    const redirect = await fetch(`${http}/handoff?ticket=${encodeURIComponent(ticket)}&next=/`, { redirect: "manual" });
    assert.equal(redirect.status, 303);
    const cookie = redirect.headers.get("set-cookie").split(";")[0];
    assert.match(cookie, /^boshmux_token=./);
    // What a browser sends with the upgrade on its own: the page's Origin and the cookie.
    class BrowserLikeWebSocket extends WebSocket {
      constructor(url, protocols) {
        super(url, protocols, { origin: env.BOSHMUX_ORIGIN, headers: { cookie } });
      }
    }
    const client = new BoshmuxClient({
      url: `${http.replace(/^http/, "ws")}/ws`,
      domain,
      WebSocket: BrowserLikeWebSocket,
    });
    t.after(() => client.close());
    assert.equal(await client.connect(), jid);
  },
  !env.BOSHMUX_ORIGIN && "BOSHMUX_ORIGIN not set",
);

// Last: it ends user A's session.
itest("logout through the API closes the clients with 4001 and they stay closed", async (t) => {
  const one = await page(t, A);
  const two = await page(t, A);
  const closed = [next(one, "disconnect"), next(two, "disconnect")];
  const response = await api("DELETE", `/sessions/${encodeURIComponent(A.bare)}`);
  assert.equal(response.status, 204);
  for (const [info] of await Promise.all(closed)) {
    assert.equal(info.code, 4001);
    assert.equal(info.willReconnect, false);
  }
  await sleep(700);
  assert.equal(one.state, "offline");
  assert.equal(two.state, "offline");
});
