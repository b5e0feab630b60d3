// Drives an unmodified third-party XMPP client library (xmpp.js, npm package @xmpp/client) against
// an XMPP-over-WebSocket endpoint (RFC 7395): connect, SASL PLAIN, bind, initial presence, one chat
// message to a peer, wait for the peer's answer, then close the stream with <close/>.
//
// Environment:
//   XMPP_WS_URL      ws:// or wss:// URL of the endpoint (required)
//   XMPP_DOMAIN      XMPP domain, sent as <open to=...> (required)
//   XMPP_USER        localpart to log in as (required)
//   XMPP_PASSWORD    password / opaque token for SASL PLAIN (required)
//   XMPP_PEER        bare JID that receives "hello from xmpp.js" and must answer "hello back" (required)
//   XMPP_RESOURCE    resource to ask for at bind (optional; the server picks one otherwise)
//   XMPP_TIMEOUT_MS  deadline for the whole exchange, login to answer (optional, default 20000)
//   XMPP_DEBUG=1     print every element received (and stream open/close) to stderr
//
// stdout, on success exactly two lines:
//   online <full JID>
//   received hello back from <full JID of the peer>
// Exit status 0 on success; on any failure one line "third_party_client: <reason>" on stderr and 1.

import WebSocket from "ws";
import { client, xml, jid } from "@xmpp/client";
// The class @xmpp/client registers as its WebSocket transport; used only to drop the others.
import ConnectionWebSocket from "@xmpp/websocket/lib/Connection.js";

// Node 20 has no global WebSocket and xmpp.js uses the global one. Always install `ws` (also on
// newer Node versions that have one) so that every run uses the same, pinned implementation.
globalThis.WebSocket = WebSocket;

const PROG = "third_party_client";
const OUR_BODY = "hello from xmpp.js";
const PEER_BODY = "hello back";

const debugEnabled = process.env.XMPP_DEBUG === "1";
function debug(line) {
  if (debugEnabled) process.stderr.write(`${PROG}: ${line}\n`);
}

let finished = false;
let messageSent = false;
let authenticated = false;
let xmpp = null;
let phase = "starting";

// Ends the process with one clear line. On failure, still tries to leave the server cleanly (a
// bounded stop), but never lets that hide the original reason or hang.
async function finish(code, reason) {
  if (finished) return;
  finished = true;
  clearTimeout(deadline);
  if (code !== 0) {
    process.stderr.write(`${PROG}: ${reason}\n`);
    if (xmpp && xmpp.status !== "offline") {
      xmpp.reconnect.stop();
      await Promise.race([
        xmpp.stop().catch(() => {}),
        new Promise((resolve) => setTimeout(resolve, 1000)),
      ]);
    }
  }
  process.exit(code);
}

function fail(reason) {
  return finish(1, reason);
}

function describe(err) {
  if (!err) return "unknown error";
  // XMPPError family (SASLError, StreamError, StanzaError): condition and optional text.
  if (err.condition) {
    const kind =
      err.name === "SASLError"
        ? "SASL authentication failed"
        : err.name === "StreamError"
          ? "stream error"
          : err.name === "StanzaError"
            ? "stanza error"
            : err.name;
    return `${kind}: ${err.condition}${err.text ? ` (${err.text})` : ""}`;
  }
  if (err.name === "TimeoutError") return "timed out";
  const msg = err.message || String(err);
  return err.code && !msg.includes(err.code) ? `${msg} [${err.code}]` : msg;
}

function env(name, { required = true } = {}) {
  const value = process.env[name];
  if (required && (value === undefined || value === "")) {
    process.stderr.write(`${PROG}: environment variable ${name} is not set\n`);
    process.exit(1);
  }
  return value === "" ? undefined : value;
}

const service = env("XMPP_WS_URL");
const domain = env("XMPP_DOMAIN");
const username = env("XMPP_USER");
const password = env("XMPP_PASSWORD");
const peerText = env("XMPP_PEER");
const resource = env("XMPP_RESOURCE", { required: false });
const timeoutMs = Number(env("XMPP_TIMEOUT_MS", { required: false }) ?? 20000);

if (!/^wss?:\/\//i.test(service)) {
  process.stderr.write(`${PROG}: XMPP_WS_URL must be a ws:// or wss:// URL, got ${service}\n`);
  process.exit(1);
}
if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) {
  process.stderr.write(`${PROG}: XMPP_TIMEOUT_MS must be a positive number\n`);
  process.exit(1);
}
let peer;
try {
  peer = jid(peerText);
} catch (err) {
  process.stderr.write(`${PROG}: XMPP_PEER is not a valid JID: ${describe(err)}\n`);
  process.exit(1);
}

const deadline = setTimeout(
  () => fail(`timed out after ${timeoutMs} ms (${phase})`),
  timeoutMs,
);

xmpp = client({
  service,
  domain,
  resource,
  // Only used by xmpp.js to put from='user@domain' on <open/> over a secure (wss or loopback)
  // connection; authentication goes through `credentials` below.
  username,
  // xmpp.js's default mechanism choice (@xmpp/client/lib/createOnAuthenticate.js) takes the
  // first mechanism, in its own preference order SCRAM-SHA-1 > PLAIN > ANONYMOUS, that the server
  // offers, and never picks PLAIN over a connection it deems insecure (plain ws:// to anything but
  // localhost/127.0.0.1/::1). A credentials function replaces that choice (documented in
  // @xmpp/sasl's README): always PLAIN. `mechanisms` lists the offered mechanisms xmpp.js
  // implements, so EXTERNAL never appears in it and is never tried.
  credentials: async (authenticate, mechanisms) => {
    phase = "authenticating with SASL PLAIN";
    if (!mechanisms.includes("PLAIN")) {
      throw new Error(
        `server does not offer SASL PLAIN (usable mechanisms offered: ${mechanisms.join(", ") || "none"})`,
      );
    }
    await authenticate({ username, password }, "PLAIN");
    authenticated = true;
  },
});

// WebSocket only: drop the TCP (xmpp://) and TLS (xmpps://) transports.
const wsTransports = xmpp.transports.filter((T) => T === ConnectionWebSocket);
if (wsTransports.length !== 1) {
  await fail("could not find @xmpp/client's WebSocket transport (duplicate @xmpp/websocket install?)");
}
xmpp.transports.splice(0, xmpp.transports.length, ...wsTransports);

// One attempt only: a failure must be reported, not retried behind our back.
xmpp.reconnect.stop();

xmpp.on("error", (err) => {
  fail(`${describe(err)} (${phase})`);
});

// Name the step in progress for error messages; after login the main flow names it.
const loginPhases = {
  connect: "opening the stream (waiting for the server's <open/>)",
  open: "waiting for <stream:features>",
};
xmpp.on("status", (status, detail) => {
  if (status === "open" && detail?.toString) debug(`<< ${detail.toString()}`);
  else debug(`status ${status}`);
  if (xmpp.status === "online" || !loginPhases[status]) return;
  phase = authenticated ? `${loginPhases[status]} after SASL success` : loginPhases[status];
});

xmpp.on("element", (element) => {
  debug(`<< ${element.toString()}`);
  if (authenticated && xmpp.status !== "online" && element.getName() === "features") {
    phase = "binding a resource";
  }
});

// xmpp.js can throw from its own event handlers after an error (e.g. data arriving once it has
// dropped its parser); report the first problem in one line instead of a stack trace.
process.on("uncaughtException", (err) => fail(`${describe(err)} (${phase})`));
process.on("unhandledRejection", (err) => fail(`${describe(err)} (${phase})`));

// Registered before anything is sent: the peer may answer at once.
xmpp.on("stanza", (stanza) => {
  if (finished || !stanza.is("message")) return;
  const fromText = stanza.attrs.from;
  if (!fromText) return;
  let from;
  try {
    from = jid(fromText);
  } catch {
    return;
  }
  if (!from.bare().equals(peer.bare())) return;

  const type = stanza.attrs.type || "normal";
  if (type === "error") {
    const error = stanza.getChild("error");
    const condition = error?.getChildElements().find((c) => c.name !== "text")?.name ?? "unknown";
    fail(`message to ${peer} bounced with error ${condition} (${phase})`);
    return;
  }
  if (type !== "chat" || stanza.getChildText("body") !== PEER_BODY) return;
  if (!messageSent) {
    fail(`got "${PEER_BODY}" from ${from} before sending anything to it`);
    return;
  }
  onReply(from);
});

async function onReply(from) {
  process.stdout.write(`received ${PEER_BODY} from ${from}\n`);
  phase = "closing the stream";
  clearTimeout(deadline);
  // stop() writes <close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>, waits for the server's
  // <close/> (xmpp.js timeout option, default 2 s), then closes the WebSocket. It swallows a missing
  // answer, so check what it returns: the server's <close/> element, or undefined.
  let closeElement;
  try {
    closeElement = await xmpp.stop();
  } catch (err) {
    await fail(`${describe(err)} (${phase})`);
    return;
  }
  if (!closeElement) {
    await fail("the server did not answer our <close/> with <close/> (RFC 7395 section 3.6)");
    return;
  }
  debug(`<< ${closeElement.toString()}`);
  await finish(0);
}

try {
  phase = `connecting to ${service}`;
  const address = await xmpp.start();
  phase = "sending initial presence";
  await xmpp.send(xml("presence"));
  process.stdout.write(`online ${address}\n`);
  phase = "sending the message";
  messageSent = true; // before the send: the answer may be processed before send() resolves
  await xmpp.send(xml("message", { type: "chat", to: peerText }, xml("body", {}, OUR_BODY)));
  if (phase === "sending the message") phase = `waiting for "${PEER_BODY}" from ${peer}`;
  debug(`sent "${OUR_BODY}" to ${peerText}; waiting for "${PEER_BODY}"`);
} catch (err) {
  await fail(`${describe(err)} (${phase})`);
}
