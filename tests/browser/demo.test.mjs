// The demo page and the status page in a real headless Chromium (Debian's, driven by
// playwright-core). Run by tests/browser.rs, which starts the demo and passes its address.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const URL = process.env.DEMO_URL;
const API_KEY = process.env.DEMO_API_KEY;
const SHOTS = process.env.SCREENSHOT_DIR;
if (!URL || !API_KEY || !SHOTS) throw new Error("DEMO_URL, DEMO_API_KEY and SCREENSHOT_DIR are set by tests/browser.rs");
mkdirSync(SHOTS, { recursive: true });

const T = 15000;
let browser;
let alice; // one browser profile: its tabs share the cookie
let bob;

before(async () => {
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  alice = await browser.newContext({ viewport: { width: 860, height: 620 } });
  bob = await browser.newContext({ viewport: { width: 860, height: 620 } });
});
after(async () => browser?.close());

async function openTab(ctx) {
  const page = await ctx.newPage();
  page.on("pageerror", (e) => console.error("page error:", e.message));
  await page.goto(`${URL}/demo`);
  return page;
}

async function jidOf(page) {
  await page.waitForFunction(() => document.querySelector("[data-testid=jid]")?.textContent.includes("@"), null, { timeout: T });
  await page.waitForSelector("[data-testid=state].live", { timeout: T });
  return page.textContent("[data-testid=jid]");
}

async function chatWith(page, contact) {
  await page.click(`[data-contact="${contact}"]`);
  await page.waitForFunction((c) => document.querySelector("[data-testid=peer]")?.textContent === c.split("@")[0], contact, { timeout: T });
}

async function say(page, text) {
  await page.fill("[data-testid=input]", text);
  await page.click("[data-testid=send]");
}

function message(page, text) {
  return page.locator("[data-testid=message]", { hasText: text });
}

let tab1;
let tab2;

test("two tabs of one user show the same JID", async () => {
  tab1 = await openTab(alice);
  await tab1.click("[data-testid=pick-alice]");
  const jid1 = await jidOf(tab1);
  tab2 = await openTab(alice); // no picker: the cookie is shared by the profile's tabs
  const jid2 = await jidOf(tab2);
  assert.equal(jid1, "alice@demo.localhost/boshmux");
  assert.equal(jid2, jid1);
  assert.notEqual(await tab1.textContent("[data-testid=tab-badge]"), await tab2.textContent("[data-testid=tab-badge]"));
});

test("a message from another user appears in both tabs", async () => {
  const b = await openTab(bob);
  await b.click("[data-testid=pick-bob]");
  assert.equal(await jidOf(b), "bob@demo.localhost/boshmux");
  await chatWith(tab1, "bob@demo.localhost");
  await chatWith(tab2, "bob@demo.localhost");
  await b.waitForSelector('[data-contact="alice@demo.localhost"][data-online="true"]', { timeout: T });
  await chatWith(b, "alice@demo.localhost");
  await say(b, "hi alice, from bob");
  await message(tab1, "hi alice, from bob").waitFor({ timeout: T });
  await message(tab2, "hi alice, from bob").waitFor({ timeout: T });
  assert.equal(await message(tab1, "hi alice, from bob").count(), 1);
  assert.equal(await message(tab2, "hi alice, from bob").count(), 1);
});

test("a message typed in tab 1 appears in tab 2 as sent, marked with the tab that sent it", async () => {
  await say(tab1, "hello bob, typed in tab 1");
  const inTab2 = message(tab2, "hello bob, typed in tab 1");
  await inTab2.waitFor({ timeout: T });
  assert.equal(await inTab2.getAttribute("class"), "out");
  const label = (await tab1.textContent("[data-testid=tab-badge]")).replace("Tab ", "");
  assert.equal(await inTab2.getAttribute("data-from-tab"), label);
  assert.match(await inTab2.textContent(), /from another tab/);
  await screenshotSideBySide();
});

test("closing tab 1 leaves tab 2 working", async () => {
  await tab1.close();
  await chatWith(tab2, "echo@demo.localhost");
  await say(tab2, "still working?");
  await message(tab2, "echo: still working?").waitFor({ timeout: T });
});

test("reloading a tab brings it back into the same session without logging in again", async () => {
  await tab2.reload();
  assert.equal(await tab2.isVisible("[data-testid=picker]"), false);
  assert.equal(await jidOf(tab2), "alice@demo.localhost/boshmux");
  await chatWith(tab2, "echo@demo.localhost");
  await say(tab2, "after the reload");
  await message(tab2, "echo: after the reload").waitFor({ timeout: T });
  // The conversation so far is still shown.
  assert.equal(await message(tab2, "echo: still working?").count(), 1);
});

test("the status page shows the sessions to an operator", async () => {
  const ops = await browser.newContext({ httpCredentials: { username: "ops", password: API_KEY }, viewport: { width: 1100, height: 400 } });
  const page = await ops.newPage();
  const resp = await page.goto(`${URL}/status`);
  assert.equal(resp.status(), 200);
  const text = await page.textContent("body");
  assert.match(text, /alice@demo\.localhost\/boshmux/);
  assert.match(text, /bob@demo\.localhost\/boshmux/);
  await page.screenshot({ path: `${SHOTS}/status-page.png` });
  await ops.close();
});

/** Writes a picture of both of alice's tabs next to each other. */
async function screenshotSideBySide() {
  const [a, b] = await Promise.all([tab1.screenshot(), tab2.screenshot()]);
  const board = await browser.newPage({ viewport: { width: 1760, height: 660 } });
  const img = (buf) => `<img src="data:image/png;base64,${buf.toString("base64")}" style="width:860px;border:1px solid #ccc">`;
  await board.setContent(`<body style="margin:10px;display:flex;gap:20px;background:#888">${img(a)}${img(b)}</body>`);
  await board.screenshot({ path: `${SHOTS}/demo-two-tabs.png` });
  await board.close();
}
