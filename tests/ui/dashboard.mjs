// drover's dashboard in headless Chromium (Debian's, driven by playwright-core). Run by the
// Rust test `ui::the_dashboard_in_a_real_browser`, which starts the coordinator and the agents
// and passes, in the environment:
//   DROVER_URL      the coordinator's base URL
//   TOKEN_APPROVER  an approver of the rollout's group; TOKEN_VIEWER a viewer
//   EVIL            the hostile last_error a host reported
//   SHOTS           where screenshots go
// Each check prints "ok - ..." or throws; the exit code is the verdict.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

const base = process.env.DROVER_URL;
const shots = process.env.SHOTS;
mkdirSync(shots, { recursive: true });

function check(cond, what) {
  if (!cond) throw new Error("FAILED: " + what);
  console.log("ok - " + what);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // This machine has no internet: no background traffic, no updates, no sync.
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});

async function session(token) {
  const ctx = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await ctx.newPage();
  const dialogs = [];
  page.on("dialog", (d) => { dialogs.push(d.message()); d.dismiss(); });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(base + "/ui/login");
  await page.fill("input[name=token]", token);
  await Promise.all([page.waitForNavigation(), page.click("button[type=submit]")]);
  return { ctx, page, dialogs, errors };
}

try {
  // A wrong token is refused: no session.
  {
    const s = await session("not-a-token");
    check(s.page.url().endsWith("/ui/login"), "a wrong token stays on the login page");
    check((await s.page.textContent(".error")).includes("Unknown token"), "a wrong token is told why");
    check((await s.ctx.cookies()).length === 0, "a wrong token gets no session cookie");
    const r = await s.page.goto(base + "/ui/fleet");
    check(s.page.url().endsWith("/ui/login"), "without a session the fleet redirects to login");
    await s.ctx.close();
  }

  // A viewer: reads, sees no buttons, and a forged POST gets 403.
  {
    const s = await session(process.env.TOKEN_VIEWER);
    check(s.page.url().endsWith("/ui/fleet"), "the viewer lands on the fleet");
    const cookie = (await s.ctx.cookies()).find((c) => c.name === "drover_session");
    check(cookie && cookie.httpOnly && cookie.sameSite === "Strict", "the session cookie is HttpOnly, SameSite=Strict");
    const resp = await s.page.goto(base + "/ui/fleet");
    const h = resp.headers();
    check(h["content-security-policy"].includes("script-src 'self'") && !h["content-security-policy"].includes("unsafe-inline"),
          "a CSP with no inline script");
    check(h["x-content-type-options"] === "nosniff" && h["x-frame-options"] === "DENY", "nosniff, framing denied");
    // The hostile last_error shows as text, and nothing of it ran.
    const cell = await s.page.locator("td.err", { hasText: "onerror" }).first().textContent();
    check(cell === process.env.EVIL, "the hostile last_error is shown as the text it is");
    check((await s.page.locator("td.err img").count()) === 0 && (await s.page.locator("td.err script").count()) === 0,
          "no element was made of it");
    check((await s.page.evaluate(() => window.__pwned)) === undefined && s.dialogs.length === 0, "no script of it ran");
    await s.page.screenshot({ path: shots + "/fleet.png", fullPage: true });
    await s.page.goto(base + "/ui/approvals");
    check((await s.page.locator("section.approval").count()) === 1, "the viewer sees what waits");
    check((await s.page.locator("section.approval button").count()) === 0, "the viewer sees no Approve or Reject");
    const csrf = await s.page.getAttribute("input[name=csrf]", "value");
    const forged = await s.page.evaluate(async (csrf) => {
      const r = await fetch("/ui/approvals/prod/hello/1.0.0/approve", {
        method: "POST", headers: { "Content-Type": "application/x-www-form-urlencoded" },
        body: "csrf=" + encodeURIComponent(csrf) });
      return r.status;
    }, csrf);
    check(forged === 403, "the viewer's forged approve (with its own CSRF token) gets 403");
    await s.page.screenshot({ path: shots + "/approvals-viewer.png", fullPage: true });
    await s.ctx.close();
  }

  // An approver approves in the page, and watches the fleet converge without a reload.
  {
    const s = await session(process.env.TOKEN_APPROVER);
    await s.page.goto(base + "/ui/approvals");
    const noCsrf = await s.page.evaluate(async () => (await fetch("/ui/approvals/prod/hello/1.0.0/approve",
      { method: "POST", headers: { "Content-Type": "application/x-www-form-urlencoded" }, body: "csrf=nope" })).status);
    check(noCsrf === 403, "a POST without the session's CSRF token gets 403, even from an approver");
    await s.page.screenshot({ path: shots + "/approvals.png", fullPage: true });
    await Promise.all([s.page.waitForNavigation(), s.page.click("section.approval button.primary")]);
    check((await s.page.textContent(".flash")).includes("approved by alice"), "the approval is confirmed in the page");
    await s.page.goto(base + "/ui/fleet?env=prod");
    await s.page.evaluate(() => { window.__same = "yes"; });
    const before = await s.page.locator("table.fleet tbody tr").allTextContents();
    check(before.length === 2, "the fleet shows prod's two hosts");
    await s.page.waitForFunction(() => {
      const rows = [...document.querySelectorAll("table.fleet tbody tr")];
      return rows.length === 2 && rows.every((r) => r.children[4].textContent === "1.0.0" && r.children[6].textContent === "ok");
    }, null, { timeout: 90000 });
    check((await s.page.evaluate(() => window.__same)) === "yes", "the fleet converged in the page without a reload");
    check((await s.page.getAttribute("body", "data-updated")) !== null, "the live update swapped the content in");
    await s.page.screenshot({ path: shots + "/fleet-converged.png", fullPage: true });
    await s.page.goto(base + "/ui/rollouts");
    check((await s.page.locator("ol.machine li.now").first().textContent()).length > 0, "the rollout's state is drawn");
    await s.page.screenshot({ path: shots + "/rollouts.png", fullPage: true });
    await s.page.goto(base + "/ui/history?actor=alice");
    check((await s.page.locator("table.history tbody tr", { hasText: "approve" }).count()) >= 1, "the history shows alice's approval");
    await s.page.screenshot({ path: shots + "/history.png", fullPage: true });
    const csv = await s.page.evaluate(async () => {
      const r = await fetch("/ui/history?actor=alice&format=csv");
      return [r.headers.get("content-type"), await r.text()];
    });
    check(csv[0].startsWith("text/csv") && csv[1].startsWith("seq,time,actor,action,subject,detail") && csv[1].includes("\"approve\""),
          "the history exports as CSV");
    check(s.errors.length === 0, "no script error in the pages: " + s.errors.join("; "));
    await s.ctx.close();
  }
} finally {
  await browser.close();
}
