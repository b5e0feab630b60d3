// BoshmuxClient against a scripted fake of boshmux's page endpoint: handshake, close codes and
// reconnects, iq bookkeeping, status notices, carbons.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { once } from "node:events";
import { test } from "node:test";
import { promisify } from "node:util";
import WebSocket from "ws";

import { BoshmuxClient, BoshmuxError, xml } from "../boshmux.js";
import { DOMAIN, JID, fakeServer, next, record, sleep } from "../test-support/fake-server.mjs";

const DISCO = "http://jabber.org/protocol/disco#info";

/** A fake server and a client of it, both cleaned up after the test. */
async function setup(t, script, options = {}) {
  const server = await fakeServer(script);
  const client = new BoshmuxClient({
    url: server.url,
    domain: DOMAIN,
    username: "alice",
    token: "t0k3n",
    initialDelay: 40,
    maxDelay: 400,
    WebSocket,
    ...options,
  });
  t.after(async () => {
    await client.close();
    await server.close();
  });
  return { server, client };
}

function decode(payload) {
  return Buffer.from(payload, "base64").toString();
}

test("connect() does the RFC 7395 handshake with PLAIN + token and opts in to status notices", async (t) => {
  const { server, client } = await setup(t);
  const status = record(client, "status");
  const online = record(client, "online");
  assert.equal(client.state, "offline");
  const connecting = client.connect();
  assert.equal(client.state, "connecting");
  assert.equal(await connecting, JID);
  assert.equal(client.jid, JID);
  assert.equal(client.state, "online");
  const [page] = server.pages;
  assert.deepEqual(page.auth, { mechanism: "PLAIN", payload: page.auth.payload });
  assert.equal(decode(page.auth.payload), "\0alice\0t0k3n");
  assert.equal(page.notices, true);
  assert.deepEqual(status, ["connected"]);
  assert.deepEqual(online, [JID]);
});

test("without a token the client uses EXTERNAL (the cookie), and says so when it is not offered", async (t) => {
  const { server, client } = await setup(t, { external: true }, { token: undefined, username: undefined });
  assert.equal(await client.connect(), JID);
  assert.deepEqual(server.pages[0].auth, { mechanism: "EXTERNAL", payload: "=" });

  const { client: noCookie } = await setup(t, {}, { token: undefined });
  await assert.rejects(noCookie.connect(), {
    condition: "invalid-mechanism",
    message: /no valid boshmux_token cookie/,
  });
  assert.equal(noCookie.state, "offline");
});

test("statusNotices: false does not opt in", async (t) => {
  const { server, client } = await setup(t, {}, { statusNotices: false });
  await client.connect();
  assert.equal(server.pages[0].notices, undefined);
});

test("a refused token rejects connect() with the SASL condition, and nothing is retried", async (t) => {
  const { server, client } = await setup(t, { auth: () => "not-authorized" });
  const disconnects = record(client, "disconnect");
  await assert.rejects(client.connect(), (e) => e instanceof BoshmuxError && e.condition === "not-authorized");
  await sleep(200);
  assert.equal(server.pages.length, 1);
  assert.equal(client.state, "offline");
  assert.deepEqual(disconnects, [{ code: 1000, reason: "not-authorized", willReconnect: false }]);
});

test("a stream error during the handshake rejects connect() with its condition", async (t) => {
  const { client } = await setup(t, {
    onConnection: (page) =>
      page.ws.once("message", () => {
        page.ws.send(
          "<stream:error xmlns:stream='http://etherx.jabber.org/streams'><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
        );
        page.ws.close(1008, "host-unknown");
      }),
  });
  await assert.rejects(client.connect(), { condition: "host-unknown" });
});

test("a failed first connection rejects connect() and is not retried", async (t) => {
  const { server, client } = await setup(t, { onConnection: (page) => page.ws.close(1012, "daemon restarting") });
  await assert.rejects(client.connect(), { condition: "disconnected", code: 1012 });
  await sleep(200);
  assert.equal(server.pages.length, 1);
});

test("a handshake that does not finish in time fails with 'timeout'", async (t) => {
  const { client } = await setup(t, { onConnection: (page) => (page.silent = true) }, { iqTimeout: 100 });
  const disconnects = record(client, "disconnect");
  await assert.rejects(client.connect(), { condition: "timeout" });
  assert.equal(client.state, "offline");
  assert.deepEqual(disconnects, [{ code: 1000, reason: "timeout", willReconnect: false }]);
});

test("after 1012 the client reconnects with jittered, growing delays and repeats its presence", async (t) => {
  // Connections 2 and 3 are refused the way a restarting daemon would; the 4th succeeds.
  const { server, client } = await setup(
    t,
    {
      onConnection: (page) => {
        if (server.pages.length === 2 || server.pages.length === 3) {
          page.closedAt = Date.now();
          page.ws.close(1012, "daemon restarting");
        }
      },
    },
    { initialDelay: 100, maxDelay: 1000 },
  );
  const disconnects = record(client, "disconnect");
  const online = record(client, "online");
  await client.connect();
  client.presence({ show: "away", status: "lunch" });
  client.presence({ to: "room@muc.example.com/alice", type: "unavailable" }); // not a join: not repeated
  client.send(
    xml("presence", { to: "room2@muc.example.com/alice" }, xml("x", { xmlns: "http://jabber.org/protocol/muc" })),
  );
  await sleep(50);
  assert.equal(server.pages[0].stanzas.length, 3);

  server.pages[0].closedAt = Date.now();
  server.pages[0].ws.close(1012, "daemon restarting");
  const [page] = await once(server, "bound");
  await next(client, "online");
  assert.equal(server.pages.length, 4);
  assert.equal(page, server.pages[3]);

  // Attempt n waits between initialDelay·2ⁿ/2 and initialDelay·2ⁿ (plus timer slack).
  for (let n = 0; n < 3; n++) {
    const waited = server.pages[n + 1].at - server.pages[n].closedAt;
    const full = 100 * 2 ** n;
    assert.ok(waited >= full / 2 - 5 && waited <= full + 60, `attempt ${n} waited ${waited} ms`);
  }
  assert.deepEqual(
    disconnects.map((d) => [d.code, d.willReconnect]),
    [
      [1012, true],
      [1012, true],
      [1012, true],
    ],
  );
  assert.equal(disconnects[0].reason, "daemon restarting");
  assert.deepEqual(online, [JID, JID]);
  assert.equal(client.state, "online");

  // The new page repeats the presence and the room join, once each.
  await sleep(50);
  assert.deepEqual(
    page.stanzas.map((s) => s.toString()),
    [
      '<presence xmlns="jabber:client"><show>away</show><status>lunch</status></presence>',
      '<presence xmlns="jabber:client" to="room2@muc.example.com/alice"><x xmlns="http://jabber.org/protocol/muc"/></presence>',
    ],
  );
  assert.equal(page.notices, true);
});

test("while the daemon is down (connection refused) the client keeps trying, then comes back", async (t) => {
  const { server, client } = await setup(t, {}, { initialDelay: 50 });
  await client.connect();
  const disconnects = record(client, "disconnect");
  const { port } = new URL(server.url);
  await server.close();
  await sleep(400);
  assert.ok(disconnects.length >= 3, `${disconnects.length} attempts`);
  assert.ok(disconnects.every((d) => d.code === 1006 && d.willReconnect));
  assert.equal(client.state, "reconnecting");
  const again = await fakeServer({ port: Number(port) });
  t.after(() => again.close());
  await next(client, "online", undefined, 3000);
  assert.equal(again.pages.length, 1);
});

for (const [code, how] of [
  [4002, "too slow"],
  [1001, "no answer to pings"],
  [1006, "connection lost"],
]) {
  test(`after ${code} (${how}) the client reconnects`, async (t) => {
    const { server, client } = await setup(t);
    await client.connect();
    if (code === 1006) server.pages[0].ws.terminate();
    else server.pages[0].ws.close(code, how);
    const [info] = await next(client, "disconnect");
    assert.equal(info.code, code);
    assert.equal(info.willReconnect, true);
    assert.equal(client.state, "reconnecting");
    await next(client, "online");
    assert.equal(server.pages.length, 2);
  });
}

for (const [code, how] of [
  [4001, "session revoked"],
  [4003, "too many pages for this user"],
  [4004, "upstream session lost"],
  [1008, "policy-violation"],
]) {
  test(`after ${code} (${how}) the client does not reconnect`, async (t) => {
    const { server, client } = await setup(t);
    const errors = record(client, "error");
    await client.connect();
    const page = server.pages[0];
    if (code === 1008) {
      page.ws.send(
        "<stream:error xmlns:stream='http://etherx.jabber.org/streams'><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
      );
    }
    page.ws.send("<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>");
    page.ws.close(code, how);
    const [info] = await next(client, "disconnect");
    assert.deepEqual(info, { code, reason: how, willReconnect: false });
    assert.equal(client.state, "offline");
    assert.equal(client.jid, null);
    await sleep(300);
    assert.equal(server.pages.length, 1);
    assert.deepEqual(
      errors.map((e) => e.condition),
      code === 1008 ? ["policy-violation"] : [],
    );
    assert.throws(() => client.message("bob@example.com", "hi"), { condition: "disconnected" });
  });
}

test("close() sends <close/>, waits for the server's, and never reconnects", async (t) => {
  const { server, client } = await setup(t);
  const disconnects = record(client, "disconnect");
  await client.connect();
  await client.close();
  assert.deepEqual(disconnects, [{ code: 1000, reason: "closed by the client", willReconnect: false }]);
  assert.equal(client.state, "offline");
  await sleep(200);
  assert.equal(server.pages.length, 1);
});

test("close() while waiting to reconnect stops the retries", async (t) => {
  const { server, client } = await setup(t, {}, { initialDelay: 200 });
  await client.connect();
  server.pages[0].ws.close(1012, "daemon restarting");
  await next(client, "disconnect");
  await client.close();
  await sleep(300);
  assert.equal(server.pages.length, 1);
  assert.equal(client.state, "offline");
});

test("a token refused on reconnect ends the retries with an error event", async (t) => {
  const { server, client } = await setup(t, { auth: () => (server.pages.length > 1 ? "not-authorized" : undefined) });
  await client.connect();
  const errors = record(client, "error");
  const disconnects = record(client, "disconnect");
  server.pages[0].ws.close(1012, "daemon restarting");
  await sleep(300);
  assert.equal(server.pages.length, 2);
  assert.deepEqual(
    disconnects.map((d) => [d.code, d.reason, d.willReconnect]),
    [
      [1012, "daemon restarting", true],
      [1000, "not-authorized", false],
    ],
  );
  assert.deepEqual(
    errors.map((e) => e.condition),
    ["not-authorized"],
  );
  assert.equal(client.state, "offline");
});

test("iq() resolves with the result", async (t) => {
  const { server, client } = await setup(t);
  await client.connect();
  server.on("stanza", (page, iq) =>
    page.send(
      xml(
        "iq",
        { xmlns: "jabber:client", type: "result", id: iq.attr("id"), from: DOMAIN },
        xml("query", { xmlns: DISCO }, xml("identity", { category: "server" })),
      ),
    ),
  );
  const result = await client.iq(xml("iq", { type: "get", to: DOMAIN }, xml("query", { xmlns: DISCO })));
  assert.equal(result.getChild("query", DISCO).getChild("identity").attr("category"), "server");
  const [sent] = server.pages[0].stanzas;
  assert.equal(sent.xmlns, "jabber:client", "stanzas go out in jabber:client");
  assert.match(sent.attr("id"), /./);
});

test("iq() rejects with the stanza error's condition", async (t) => {
  const { server, client } = await setup(t);
  await client.connect();
  server.on("stanza", (page, iq) =>
    page.send(
      xml(
        "iq",
        { xmlns: "jabber:client", type: "error", id: iq.attr("id") },
        xml(
          "error",
          { type: "cancel" },
          xml("item-not-found", { xmlns: "urn:ietf:params:xml:ns:xmpp-stanzas" }),
          xml("text", { xmlns: "urn:ietf:params:xml:ns:xmpp-stanzas" }, "no such node"),
        ),
      ),
    ),
  );
  await assert.rejects(client.iq(xml("iq", { type: "get", id: "q1" }, xml("query", { xmlns: DISCO }))), (e) => {
    assert.ok(e instanceof BoshmuxError);
    assert.equal(e.condition, "item-not-found");
    assert.match(e.message, /no such node/);
    assert.equal(e.stanza.attr("id"), "q1");
    return true;
  });
});

test("iq() rejects with condition 'timeout' when no answer comes", async (t) => {
  const { client } = await setup(t, {}, { iqTimeout: 80 });
  await client.connect();
  const started = Date.now();
  await assert.rejects(client.iq(xml("iq", { type: "get" }, xml("ping", { xmlns: "urn:xmpp:ping" }))), {
    condition: "timeout",
  });
  assert.ok(Date.now() - started >= 75);
  await assert.rejects(
    client.iq(xml("iq", { type: "get" }, xml("ping", { xmlns: "urn:xmpp:ping" })), { timeout: 20 }),
    { condition: "timeout" },
  );
  await assert.rejects(client.iq(xml("iq", { type: "result" })), TypeError);
});

test("an iq in flight fails with 'disconnected' when its socket drops; one sent while reconnecting waits", async (t) => {
  const { server, client } = await setup(t);
  await client.connect();
  const inFlight = client.iq(xml("iq", { type: "get" }, xml("ping", { xmlns: "urn:xmpp:ping" })));
  await once(server, "stanza");
  server.pages[0].ws.close(1012, "daemon restarting");
  await assert.rejects(inFlight, { condition: "disconnected", code: 1012 });

  assert.equal(client.state, "reconnecting");
  const queued = client.iq(xml("iq", { type: "get", id: "later" }, xml("ping", { xmlns: "urn:xmpp:ping" })));
  client.message("bob@example.com", "sent while away", { id: "m1" });
  server.on(
    "stanza",
    (page, s) => s.name === "iq" && page.send(xml("iq", { xmlns: "jabber:client", type: "result", id: s.attr("id") })),
  );
  assert.equal((await queued).attr("id"), "later");
  assert.deepEqual(
    server.pages[1].stanzas.map((s) => s.attr("id")),
    ["later", "m1"],
  );
});

test("status notices become status events; only the domain may send them", async (t) => {
  const { server, client } = await setup(t);
  const status = record(client, "status");
  const messages = record(client, "message");
  await client.connect();
  const notice = (from, state) =>
    server.pages[0].send(
      xml(
        "message",
        { xmlns: "jabber:client", from, to: JID, type: "headline" },
        xml("status", { xmlns: "urn:boshmux:status:0", state }),
      ),
    );
  notice(DOMAIN, "reconnecting");
  notice(DOMAIN, "restored");
  notice("mallory@example.com", "lost");
  await next(client, "message");
  assert.deepEqual(status, ["connected", "reconnecting", "restored"]);
  assert.equal(messages.length, 1);
});

test("a sent carbon from the user's own bare JID is a carbon event; a forged one is a message", async (t) => {
  const { server, client } = await setup(t);
  await client.connect();
  const carbons = record(client, "carbon");
  const messages = record(client, "message");
  const stanzas = record(client, "stanza");
  const carbon = (from) =>
    `<message xmlns='jabber:client' from='${from}' to='${JID}'><sent xmlns='urn:xmpp:carbons:2'>` +
    `<forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' from='${JID}' to='bob@example.com' type='chat' id='c1'>` +
    "<body>from another tab</body></message></forwarded></sent></message>";
  server.pages[0].ws.send(carbon("alice@example.com"));
  server.pages[0].ws.send(carbon("mallory@example.com"));
  await next(client, "message");
  assert.equal(carbons.length, 1);
  const [inner, outer] = carbons[0];
  assert.equal(inner.getChild("body").text(), "from another tab");
  assert.equal(inner.attr("to"), "bob@example.com");
  assert.equal(outer.attr("from"), "alice@example.com");
  assert.equal(messages[0].attr("from"), "mallory@example.com");
  assert.equal(stanzas.length, 2);
});

test("incoming requests are iq events, left to the app to answer", async (t) => {
  const { server, client } = await setup(t);
  await client.connect();
  const asked = next(client, "iq");
  server.pages[0].send(
    xml(
      "iq",
      { xmlns: "jabber:client", type: "get", id: "v1", from: "bob@example.com/x" },
      xml("query", { xmlns: "jabber:iq:version" }),
    ),
  );
  const [iq] = await asked;
  assert.equal(iq.attr("id"), "v1");
  client.send(xml("iq", { type: "result", id: iq.attr("id"), to: iq.attr("from") }));
  const [, answer] = await once(server, "stanza");
  assert.equal(answer.toString(), '<iq xmlns="jabber:client" type="result" id="v1" to="bob@example.com/x"/>');
});

test("messages and presence are built as expected; send() takes stanzas only", async (t) => {
  const { server, client } = await setup(t);
  await client.connect();
  const sent = client.message("bob@example.com", "hi <3", { type: "normal" });
  client.presence({ show: "dnd", status: "busy", priority: 0 });
  client.presence({ to: "bob@example.com", type: "subscribed" });
  await sleep(50);
  assert.deepEqual(
    server.pages[0].stanzas.map((s) => s.toString()),
    [
      `<message xmlns="jabber:client" to="bob@example.com" type="normal" id="${sent.attr("id")}"><body>hi &lt;3</body></message>`,
      '<presence xmlns="jabber:client"><show>dnd</show><status>busy</status><priority>0</priority></presence>',
      '<presence xmlns="jabber:client" to="bob@example.com" type="subscribed"/>',
    ],
  );
  assert.throws(() => client.send(xml("open", { xmlns: "urn:ietf:params:xml:ns:xmpp-framing" })), TypeError);
  assert.throws(() => client.send("<message/>"), TypeError);
});

test("an exception in a listener is reported as uncaught and does not break the client", async () => {
  // In a child process: node's test runner would count the uncaught exception against the test.
  const url = (path) => new URL(path, import.meta.url).href;
  const script = `
    import WebSocket from "ws";
    import { BoshmuxClient } from "${url("../boshmux.js")}";
    import { DOMAIN, fakeServer } from "${url("../test-support/fake-server.mjs")}";
    process.on("uncaughtException", (e) => console.log("uncaught:", e.message));
    const server = await fakeServer();
    const client = new BoshmuxClient({ url: server.url, domain: DOMAIN, username: "alice", token: "t", WebSocket });
    client.on("online", () => { throw new Error("app bug"); });
    client.on("online", () => console.log("second listener ran"));
    console.log("connected:", await client.connect());
    await client.close();
    await server.close();
  `;
  const { stdout } = await promisify(execFile)(process.execPath, ["--input-type=module", "-e", script], {
    cwd: new URL("..", import.meta.url),
  });
  assert.deepEqual(stdout.trim().split("\n"), ["second listener ran", `connected: ${JID}`, "uncaught: app bug"]);
});
