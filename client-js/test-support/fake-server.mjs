// Test helpers (kept out of test/, where node --test would run every module as a test file):
// a scriptable stand-in for boshmux's page endpoint (RFC 7395, SPEC §4) for tests of the
// client's own logic — handshake, close codes, reconnects, iq bookkeeping, notices — and event
// helpers.
import { EventEmitter, once } from "node:events";
import { WebSocketServer } from "ws";

import { parse, xml } from "../xml.js";

export const DOMAIN = "example.com";
export const JID = "alice@example.com/boshmux";

const FRAMING = "urn:ietf:params:xml:ns:xmpp-framing";
const SASL = "urn:ietf:params:xml:ns:xmpp-sasl";
const BIND = "urn:ietf:params:xml:ns:xmpp-bind";
const STATUS = "urn:boshmux:status:0";

/**
 * Starts the server. `script` may hold
 * - `onConnection(page)`: called first for every new socket (e.g. to close it at once, or to set
 *   `page.silent` so that nothing it sends is answered);
 * - `auth(page, mechanism, payload)`: returns a SASL failure condition to refuse, or nothing;
 * - `external`: offer EXTERNAL too;
 * - `port`: listen there (to come back where a stopped server was).
 * Events: `connection` (page), `bound` (page), `stanza` (page, element) for every stanza after bind.
 */
export async function fakeServer(script = {}) {
  const wss = new WebSocketServer({
    host: "127.0.0.1",
    port: script.port ?? 0,
    handleProtocols: (protocols) => (protocols.has("xmpp") ? "xmpp" : false),
  });
  await once(wss, "listening");
  const server = new EventEmitter();
  server.url = `ws://127.0.0.1:${wss.address().port}/ws`;
  server.pages = [];
  server.close = () =>
    new Promise((resolve) => {
      for (const c of wss.clients) c.terminate();
      wss.close(resolve);
    });

  wss.on("connection", (ws) => {
    const page = { ws, at: Date.now(), authed: false, bound: false, stanzas: [], auth: null };
    page.send = (el) => ws.send(el.toString());
    server.pages.push(page);
    server.emit("connection", page);
    script.onConnection?.(page);
    ws.on("message", (data) => {
      if (page.silent) return;
      const el = parse(data.toString());
      if (el.is("open", FRAMING)) {
        page.send(xml("open", { xmlns: FRAMING, from: DOMAIN, id: "s1", version: "1.0" }));
        const features = page.authed
          ? [xml("bind", { xmlns: BIND })]
          : [
              xml(
                "mechanisms",
                { xmlns: SASL },
                script.external && xml("mechanism", {}, "EXTERNAL"),
                xml("mechanism", {}, "PLAIN"),
              ),
            ];
        page.send(xml("stream:features", { "xmlns:stream": "http://etherx.jabber.org/streams" }, features));
      } else if (el.is("auth", SASL)) {
        page.auth = { mechanism: el.attr("mechanism"), payload: el.text() };
        const refused = script.auth?.(page, page.auth.mechanism, page.auth.payload);
        if (refused) {
          page.send(xml("failure", { xmlns: SASL }, xml(refused)));
        } else {
          page.authed = true;
          page.send(xml("success", { xmlns: SASL }));
        }
      } else if (!page.bound && el.getChild("bind", BIND)) {
        page.bound = true;
        page.send(
          xml(
            "iq",
            { xmlns: "jabber:client", type: "result", id: el.attr("id") },
            xml("bind", { xmlns: BIND }, xml("jid", {}, JID)),
          ),
        );
        server.emit("bound", page);
      } else if (el.getChild("enable", STATUS)) {
        page.notices = true;
        page.send(xml("iq", { xmlns: "jabber:client", type: "result", id: el.attr("id") }));
      } else if (el.is("close", FRAMING)) {
        // As boshmux does: <close/> back, then close 1000.
        page.send(xml("close", { xmlns: FRAMING }));
        ws.close(1000, "closed by the page");
      } else {
        page.stanzas.push(el);
        server.emit("stanza", page, el);
      }
    });
  });
  return server;
}

/** Waits for the next `event` of a BoshmuxClient (on/off) whose arguments pass `accept`, and gives them. */
export function next(client, event, accept = () => true, ms = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      client.off(event, listener);
      reject(new Error(`no ${event} event within ${ms} ms`));
    }, ms);
    const listener = (...args) => {
      if (!accept(...args)) return;
      clearTimeout(timer);
      client.off(event, listener);
      resolve(args);
    };
    client.on(event, listener);
  });
}

/** Records every `event` of a client. */
export function record(client, event) {
  const seen = [];
  client.on(event, (...args) => seen.push(args.length === 1 ? args[0] : args));
  return seen;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
