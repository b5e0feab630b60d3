// The Django attach example (contrib/examples/django-attach) and unmodified Converse.js with
// prebind, in a real headless Chromium: every tab is its own virtual BOSH session on the daemon,
// all of one user's tabs share one XMPP session. Run by tests/browser_bosh.rs, which starts
// boshmux in front of the test Prosody and the Django example, and passes their addresses.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const SITE = process.env.SITE_URL;
const DAEMON = process.env.DAEMON_URL;
const API_KEY = process.env.DAEMON_API_KEY;
const DOMAIN = process.env.XMPP_DOMAIN;
const [ALICE, BOB, CAROL] = (process.env.USERS ?? "").split(",");
if (!SITE || !DAEMON || !API_KEY || !DOMAIN || !CAROL) throw new Error("set by tests/browser_bosh.rs");

const T = 20000;
let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
});
after(async () => browser?.close());

async function loggedIn(user) {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  await page.goto(`${SITE}/login`);
  await page.fill("[data-testid=user]", user);
  await page.fill("[data-testid=password]", `pw-${user}`);
  await Promise.all([page.waitForURL(`${SITE}/`), page.click("[data-testid=login]")]);
  await page.close();
  return ctx;
}

async function chatTab(ctx) {
  const page = await ctx.newPage();
  page.on("pageerror", (e) => console.error("page error:", e.message));
  await page.goto(`${SITE}/`);
  await attached(page);
  return page;
}

async function attached(page) {
  await page.waitForSelector("[data-testid=state]:text('attached')", { timeout: T });
}

async function send(page, to, text) {
  await page.fill("[data-testid=to]", to);
  await page.fill("[data-testid=text]", text);
  await page.click("[data-testid=send]");
}

async function sees(page, kind, text) {
  await page.waitForSelector(`[data-testid=message][data-kind=${kind}]:has-text("${text}")`, { timeout: T });
}

async function pagesOf(user) {
  const r = await fetch(`${DAEMON}/api/v1/sessions/${user}@${DOMAIN}`, { headers: { authorization: `Bearer ${API_KEY}` } });
  return r.ok ? (await r.json()).pages : 0;
}

// At least n: a tab closed a moment ago stays counted until its inactivity ends it.
async function waitPages(user, n) {
  const until = Date.now() + T;
  while ((await pagesOf(user)) < n) {
    assert.ok(Date.now() < until, `${user} should have ${n} pages, has ${await pagesOf(user)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

let alice;
let bob;
let tab1;
let tab2;
let bobTab;

test("two tabs of the Django example attach at the same time", async () => {
  alice = await loggedIn(ALICE);
  tab1 = await chatTab(alice);
  tab2 = await chatTab(alice);
  assert.equal(await tab1.textContent("[data-testid=jid]"), await tab2.textContent("[data-testid=jid]"));
  await waitPages(ALICE, 2);
  bob = await loggedIn(BOB);
  bobTab = await chatTab(bob);
});

test("a contact's message reaches both tabs", async () => {
  await send(bobTab, `${ALICE}@${DOMAIN}`, "hello both tabs");
  await sees(tab1, "in", "hello both tabs");
  await sees(tab2, "in", "hello both tabs");
});

test("a send from one tab shows in the other as a carbon", async () => {
  await send(tab1, `${BOB}@${DOMAIN}`, "sent from tab 1");
  await sees(bobTab, "in", "sent from tab 1");
  await sees(tab2, "sent-elsewhere", "sent from tab 1");
});

test("closing one tab leaves the other working", async () => {
  await tab1.close();
  await send(bobTab, `${ALICE}@${DOMAIN}`, "after the close");
  await sees(tab2, "in", "after the close");
  await send(tab2, `${BOB}@${DOMAIN}`, "tab 2 still sends");
  await sees(bobTab, "in", "tab 2 still sends");
});

test("a reload attaches again", async () => {
  await tab2.reload();
  await attached(tab2);
  await send(bobTab, `${ALICE}@${DOMAIN}`, "after the reload");
  await sees(tab2, "in", "after the reload");
});

test("unmodified Converse.js with prebind in two tabs", async () => {
  const carol = await loggedIn(CAROL);
  const before = await pagesOf(CAROL);
  const tabs = [];
  for (let i = 0; i < 2; i++) {
    const page = await carol.newPage();
    page.on("pageerror", (e) => console.error("converse page error:", e.message));
    await page.goto(`${SITE}/converse`);
    tabs.push(page);
  }
  await waitPages(CAROL, before + 2);
  // Converse adds its message handlers as it connects and shows the roster after that: a message
  // sent before a tab shows its contacts may reach a tab that is not listening yet. A contact
  // shows as its roster name where it has one (ejabberd's test rosters: the localpart), else as
  // its JID (Prosody's): the localpart is in both.
  const bobInRoster = (page) => page.getByText(BOB).first();
  for (const page of tabs) await bobInRoster(page).waitFor({ timeout: T });
  await send(bobTab, `${CAROL}@${DOMAIN}`, "hello converse");
  for (const page of tabs) {
    try {
      // Converse counts the message as unread under "New messages"; opening the chat shows it.
      await page.waitForSelector("text=New messages", { timeout: T });
      await bobInRoster(page).click({ timeout: T });
      await page.waitForSelector(`text=hello converse`, { timeout: T });
    } catch (e) {
      if (process.env.SCREENSHOT_DIR) await page.screenshot({ path: `${process.env.SCREENSHOT_DIR}/converse-prebind.png` });
      console.error("converse page text:", (await page.evaluate(() => document.body.innerText)).slice(0, 2000));
      throw e;
    }
  }
});
