// The demo page: one boshmux client per tab, all tabs of a user sharing one XMPP session.
// Conversations are also kept in localStorage so a new tab shows what was said before it opened
// (the demo server keeps no history of its own).
import { BoshmuxClient, xml } from "/client-js/boshmux.js";

const DEMO_NS = "urn:boshmux:demo";
const $ = (sel) => document.querySelector(sel);

// Each page load is a tab with a number and a colour, shown next to what it sends. The number
// comes from a counter shared by this browser's tabs, so no two open tabs look alike.
const tab = (() => {
  const n = Number(localStorage.getItem("boshmux-demo:tabs") || "0") + 1;
  localStorage.setItem("boshmux-demo:tabs", String(n));
  return { label: String(n), hue: (n * 137) % 360 };
})();

function badge(label, hue) {
  const b = document.createElement("span");
  b.className = "tab-badge";
  b.textContent = `Tab ${label}`;
  b.style.background = `hsl(${hue} 65% 45%)`;
  return b;
}

async function main() {
  const me = await (await fetch("/demo/whoami")).json();
  if (!me.user) return showPicker(me.users);
  startChat(me);
}

function showPicker(users) {
  const box = $(".picker .users");
  for (const user of users) {
    const form = document.createElement("form");
    form.method = "post";
    form.action = "/demo/login";
    form.innerHTML = `<input type="hidden" name="user"><button type="submit"></button>`;
    form.user.value = user;
    form.querySelector("button").textContent = user;
    form.querySelector("button").dataset.testid = `pick-${user}`;
    box.append(form);
  }
  $(".picker").hidden = false;
}

function startChat(me) {
  const bare = me.user;
  const domain = me.domain;
  const bot = `${me.bot}@${domain}`;
  const contacts = new Map(); // bare jid → { name, online: Set of full jids, status }
  let peer = bot;

  $(".who").hidden = false;
  $(".chat").hidden = false;
  const mine = badge(tab.label, tab.hue);
  mine.dataset.testid = "tab-badge";
  $("[data-testid=tab-badge]").replaceWith(mine);
  document.title = `${bare.split("@")[0]} · Tab ${tab.label} · boshmux demo`;

  const state = $("[data-testid=state]");
  const setState = (text, kind) => {
    state.textContent = text;
    state.className = `state ${kind}`;
  };

  const store = (contact) => `boshmux-demo:${bare}:${contact}`;
  const history = (contact) => JSON.parse(localStorage.getItem(store(contact)) || "[]");
  function remember(contact, entry) {
    const list = history(contact);
    if (list.some((e) => e.id === entry.id)) return false;
    list.push(entry);
    localStorage.setItem(store(contact), JSON.stringify(list.slice(-200)));
    return true;
  }

  function renderMessages() {
    $("[data-testid=peer]").textContent = contacts.get(peer)?.name ?? peer;
    const ol = $("[data-testid=messages]");
    ol.replaceChildren();
    for (const e of history(peer)) {
      const li = document.createElement("li");
      li.className = e.out ? "out" : "in";
      li.dataset.testid = "message";
      const meta = document.createElement("span");
      meta.className = "meta";
      if (e.out) {
        meta.append(e.tabLabel === tab.label ? "you, from this tab " : "you, from another tab ");
        if (e.tabLabel) meta.append(badge(e.tabLabel, e.tabHue));
        li.dataset.fromTab = e.tabLabel ?? "";
      } else {
        meta.textContent = contacts.get(peer)?.name ?? peer;
      }
      const body = document.createElement("span");
      body.className = "body";
      body.textContent = e.body;
      li.append(meta, body);
      ol.append(li);
    }
    ol.scrollTop = ol.scrollHeight;
  }

  function renderRoster() {
    const ul = $("[data-testid=roster]");
    ul.replaceChildren();
    for (const [jid, c] of contacts) {
      const li = document.createElement("li");
      li.dataset.contact = jid;
      li.dataset.online = c.online.size > 0;
      if (jid === peer) li.className = "selected";
      const dot = document.createElement("span");
      dot.className = `dot ${c.online.size > 0 ? "online" : ""}`;
      const name = document.createElement("span");
      name.textContent = c.name;
      const status = document.createElement("span");
      status.className = "status";
      status.textContent = c.online.size > 0 ? c.status || "online" : "offline";
      name.append(status);
      li.append(dot, name);
      li.addEventListener("click", () => {
        peer = jid;
        renderRoster();
        renderMessages();
      });
      ul.append(li);
    }
  }

  const client = new BoshmuxClient({ domain });
  client.on("online", async (jid) => {
    $("[data-testid=jid]").textContent = jid;
    setState("live", "live");
    const roster = await client.iq(xml("iq", { type: "get" }, xml("query", { xmlns: "jabber:iq:roster" })));
    for (const item of roster.getChild("query", "jabber:iq:roster")?.getChildren("item") ?? []) {
      const jid = item.attr("jid");
      if (!contacts.has(jid)) contacts.set(jid, { name: item.attr("name") || jid, online: new Set(), status: "" });
    }
    renderRoster();
    renderMessages();
  });
  client.on("status", (s) => {
    if (s === "reconnecting") setState("upstream reconnecting…", "trouble");
    else if (s === "restored" || s === "connected") setState("live", "live");
    else if (s === "lost") setState("upstream lost", "down");
  });
  client.on("disconnect", ({ code, willReconnect }) => {
    if (willReconnect) return setState(`reconnecting (${code})…`, "trouble");
    setState(code === 4001 ? "logged out" : `closed (${code})`, "down");
    if (code === 4001) {
      const n = $("[data-testid=notice]");
      n.textContent = "This user was logged out everywhere. Reload to pick a user again.";
      n.hidden = false;
    }
  });
  client.on("presence", (p) => {
    const from = p.attr("from") ?? "";
    const [who] = from.split("/");
    const c = contacts.get(who);
    if (!c) return;
    if (p.attr("type") === "unavailable") c.online.delete(from);
    else if (!p.attr("type")) {
      c.online.add(from);
      c.status = p.getChild("status")?.text() ?? "";
    }
    renderRoster();
  });
  client.on("message", (m) => {
    const body = m.getChild("body")?.text();
    if (!body || m.attr("type") === "error") return;
    const [who] = (m.attr("from") ?? "").split("/");
    const id = m.attr("id") ?? `${who}:${Date.now()}:${body}`;
    if (remember(who, { id, out: false, body, time: Date.now() }) || who === peer) renderIfPeer(who);
  });
  client.on("carbon", (inner) => {
    const body = inner.getChild("body")?.text();
    const to = (inner.attr("to") ?? "").split("/")[0];
    if (!body) return;
    const t = inner.getChild("tab", DEMO_NS);
    const entry = { id: inner.attr("id"), out: true, body, tabLabel: t?.attr("label"), tabHue: t?.attr("hue"), time: Date.now() };
    remember(to, entry);
    renderIfPeer(to);
  });
  function renderIfPeer(who) {
    if (who === peer) renderMessages();
  }

  $("[data-testid=compose]").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = ev.target.body;
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    const id = `${tab.label}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 6)}`;
    client.send(
      xml("message", { to: peer, type: "chat", id }, xml("body", {}, text), xml("tab", { xmlns: DEMO_NS, label: tab.label, hue: String(tab.hue) })),
    );
    remember(peer, { id, out: true, body: text, tabLabel: tab.label, tabHue: tab.hue, time: Date.now() });
    renderMessages();
  });

  setState("connecting…", "");
  client
    .connect()
    .then(() => client.presence({ status: `Tab ${tab.label} is here` }))
    .catch((e) => setState(`could not connect: ${e.condition ?? e.message}`, "down"));
}

main();
