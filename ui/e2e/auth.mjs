// End-to-end check of the web UI's sign-in in headless Chromium (Debian's /usr/bin/chromium
// driven by playwright-core), against a controller started with `--http-auth tokens`. Run by
// cli/tests/ui_auth_e2e.rs:
//
//   node ui/e2e/auth.mjs --url http://127.0.0.1:PORT/ --viewer NAME:TOKEN --admin NAME:TOKEN \
//     --pod tools/debug --expect shop/Pod/frontend,tools/Pod/debug [--open-url URL]
//
// With auth: the page shows the sign-in form and no data; a wrong token shows the server's
// error; the viewer's token shows the map and "signed in as"; the viewer's quarantine is refused
// (403, the server's error in the toast); signing out forgets the token and the map; the admin's
// token quarantines and releases the pod from the page's buttons. The token goes in the
// Authorization header of every /api request, never in a URL, never in localStorage.
// `--open-url` names a controller without auth: the page works as before, with no sign-in form
// and no Authorization header. Exits non-zero with a message on the first failed check.
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

function arg(name, fallback = undefined) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
}
function credential(name) {
  const v = arg(name);
  const i = v ? v.indexOf(':') : -1;
  return i > 0 ? { name: v.slice(0, i), token: v.slice(i + 1) } : null;
}

const url = arg('url');
const viewer = credential('viewer');
const admin = credential('admin');
const pod = arg('pod');
const openUrl = arg('open-url');
const expected = (arg('expect', '') || '').split(',').filter(Boolean);
const screenshot = arg('screenshot');
if (!url || !viewer || !admin || !pod) {
  console.error('usage: auth.mjs --url URL --viewer NAME:TOKEN --admin NAME:TOKEN --pod ns/pod [--expect ids] [--open-url URL] [--screenshot file]');
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const TOKEN_KEY = 'bulkhead.token';

const step = (s) => console.log(`auth: ${s}`);
// Every wait below is bounded; this bounds them all, whatever hangs.
setTimeout(() => { console.error('auth: FAILED: the checks took longer than 90 s'); process.exit(1); }, 90000).unref();
function fail(s) { throw new Error(s); }

async function waitFor(page, what, fn, a, timeout = 10000) {
  try {
    return await page.waitForFunction(fn, a, { timeout, polling: 100 });
  } catch (e) {
    fail(`timed out waiting for ${what}`);
  }
}

// Every request the page makes: its URL, and its Authorization header.
function recordRequests(page) {
  const seen = [];
  page.on('request', (r) => {
    const entry = { url: r.url(), method: r.method(), at: Date.now(), authorization: undefined };
    seen.push(entry);
    entry.headers = r.allHeaders().then((h) => { entry.authorization = h.authorization; }, () => {});
  });
  return {
    seen,
    async settled() { await Promise.all(seen.map((e) => e.headers)); return seen; },
    api: () => seen.filter((e) => new URL(e.url).pathname.startsWith('/api/')),
  };
}

// What the page keeps: sessionStorage, localStorage, cookies, the address bar.
async function storage(page) {
  return page.evaluate((key) => ({
    session: sessionStorage.getItem(key),
    sessionLength: sessionStorage.length,
    localLength: localStorage.length,
    cookie: document.cookie,
    href: location.href,
  }), TOKEN_KEY);
}

async function signInShown(page) {
  await page.locator('#signin-form').waitFor({ state: 'visible', timeout: 10000 })
    .catch(() => fail('the sign-in form is not shown'));
  const s = await page.evaluate(() => ({
    map: window.bulkhead.state.map,
    elements: window.bulkhead.cy.elements().length,
    mapVisible: !!document.querySelector('#map').offsetParent,
    panel: document.querySelector('#panel-body').textContent,
    stats: document.querySelector('#stats').textContent,
    namespaces: document.querySelectorAll('#namespace-filter .chip').length,
    userHidden: document.querySelector('#user').hidden,
  }));
  if (s.map !== null || s.elements || s.mapVisible || s.panel || s.stats || s.namespaces || !s.userHidden) {
    fail(`the sign-in page still shows data: ${JSON.stringify({ ...s, map: !!s.map })}`);
  }
}

async function signIn(page, token) {
  await page.getByLabel('Access token').fill(token);
  await page.getByRole('button', { name: 'Sign in' }).click();
}

// Opens the workload of `pod` from the overview's list; its pods (with their buttons) show.
async function openWorkloadOf(page, p) {
  const workload = await page.evaluate((p) => {
    const n = window.bulkhead.state.map.nodes.find((n) => n.pods.some((x) => x.pod === p));
    return n && n.id;
  }, p);
  if (!workload) fail(`no workload on the map has the pod ${p}`);
  await page.locator(`button[data-workload="${workload}"]`).click();
  return workload;
}

async function quarantineFromPanel(page, p, reason) {
  const button = page.locator(`button[data-action="quarantine"][data-pod="${p}"]`);
  await button.waitFor({ timeout: 10000 }).catch(() => fail(`the panel offers no quarantine for ${p}`));
  if (await button.isDisabled()) {
    const why = await page.evaluate(() => JSON.stringify(window.bulkhead.state.map.actions));
    fail(`the Quarantine button of ${p} is disabled: actions ${why}`);
  }
  await button.click();
  await page.locator('form.quarantine input[name="reason"]').fill(reason);
  const answer = page.waitForResponse((r) => new URL(r.url()).pathname === '/api/quarantine' && r.request().method() === 'POST', { timeout: 15000 });
  await page.locator('form.quarantine button[type="submit"]').click();
  return answer;
}

async function launch() {
  const profile = mkdtempSync(join(tmpdir(), 'bulkhead-ui-auth-chromium-'));
  // A fresh, empty profile (the user data dir) for every run.
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
    viewport: { width: 1400, height: 860 },
    deviceScaleFactor: 1,
  });
  return { context, profile };
}

// Errors the page logged, except the browser's own lines about 401/403 answers (expected here).
function watchErrors(page) {
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/status of 40[13]/.test(m.text())) errors.push(m.text());
  });
  return errors;
}

async function withAuth(page) {
  const errors = watchErrors(page);
  const requests = recordRequests(page);

  // 1. No token: the sign-in form, no map, and the polling stopped at the first 401.
  await page.goto(url, { waitUntil: 'load' });
  await signInShown(page);
  const input = page.getByLabel('Access token');
  if ((await input.getAttribute('type')) !== 'password') fail('the token input is not a password input');
  const hint = await page.locator('#signin-form').textContent();
  if (!hint.includes('kubectl create token <serviceaccount>') || !/administrator/.test(hint)) {
    fail(`the sign-in form does not say where a token comes from: ${hint}`);
  }
  if (!(await page.locator('#signin-error').isHidden())) fail('the first sign-in form shows an error');
  const before = requests.api().length;
  await page.waitForTimeout(1700); // more than one polling period (1.5 s)
  const polled = requests.api().filter((r) => r.url.endsWith('/api/map'));
  if (requests.api().length !== before || polled.length !== 1) {
    fail(`the page kept calling the API after a 401: ${requests.api().map((r) => r.url).join(', ')}`);
  }
  await requests.settled();
  if (polled[0].authorization !== undefined) fail(`the first request sent a token: ${polled[0].authorization}`);
  step('no token: the sign-in form, no map; one 401 and the polling stopped');

  // 2. A wrong token: the server's error in the form, nothing kept.
  const wrong = `wrong-${'0'.repeat(24)}`;
  const refused = page.waitForResponse((r) => r.url().endsWith('/api/map') && r.status() === 401);
  await signIn(page, wrong);
  const refusedBody = await (await refused).json().catch(() => fail('the 401 is not JSON'));
  if (!refusedBody.error) fail(`the 401 has no error: ${JSON.stringify(refusedBody)}`);
  await page.locator('#signin-error').waitFor({ state: 'visible', timeout: 5000 })
    .catch(() => fail('a wrong token shows no error'));
  const shown = await page.locator('#signin-error').textContent();
  if (!shown.includes(refusedBody.error)) fail(`the form shows ${JSON.stringify(shown)}, not the server's error ${JSON.stringify(refusedBody.error)}`);
  let kept = await storage(page);
  if (kept.session !== null || kept.localLength) fail(`a refused token was kept: ${JSON.stringify(kept)}`);
  await signInShown(page);
  step(`wrong token: the form says "${shown}"`);

  // 3. The viewer: the map, "signed in as", the token in this tab's sessionStorage only.
  await signIn(page, viewer.token);
  await page.locator('#signin').waitFor({ state: 'hidden', timeout: 10000 }).catch(() => fail('the viewer token did not sign in'));
  await waitFor(page, 'the map to load', () => window.bulkhead.state.map);
  for (const id of expected) {
    await waitFor(page, `workload ${id} on the map`, (id) => !window.bulkhead.cy.getElementById(id).empty(), id);
  }
  await page.locator('#user', { hasText: `signed in as ${viewer.name}` }).waitFor({ timeout: 5000 })
    .catch(async () => fail(`no "signed in as ${viewer.name}": ${await page.locator('#user').textContent()}`));
  const user = await page.evaluate(() => window.bulkhead.state.map.user);
  if (user !== viewer.name) fail(`/api/map says user ${JSON.stringify(user)}, not ${viewer.name}`);
  kept = await storage(page);
  if (kept.session !== viewer.token || kept.localLength || kept.cookie) fail(`the token is not (only) in sessionStorage: ${JSON.stringify(kept)}`);
  const polls = requests.api().length;
  await page.waitForTimeout(1800);
  if (requests.api().length <= polls) fail('the page does not poll after signing in');
  step(`viewer signed in: ${expected.length} workloads on the map, "${(await page.locator('#user').textContent()).replace(/\s+/g, ' ').trim()}", polling again`);

  // 4. The viewer may not quarantine: 403, the server's error in the toast.
  await openWorkloadOf(page, pod);
  const denied = await quarantineFromPanel(page, pod, 'viewer tries (UI auth e2e)');
  if (denied.status() !== 403) fail(`the viewer's quarantine answered ${denied.status()}, not 403: ${await denied.text()}`);
  const deniedBody = await denied.json().catch(() => fail('the 403 is not JSON'));
  if (!deniedBody.error) fail(`the 403 has no error: ${JSON.stringify(deniedBody)}`);
  await page.locator('#toast.error', { hasText: deniedBody.error }).waitFor({ timeout: 5000 })
    .catch(async () => fail(`the toast does not show the 403's error ${JSON.stringify(deniedBody.error)}: ${await page.locator('#toast').textContent()}`));
  if (!(await page.locator('#signin').isHidden())) fail('a 403 showed the sign-in form');
  step(`viewer's quarantine refused: "${await page.locator('#toast').textContent()}"`);
  await page.locator('form.quarantine button', { hasText: 'Cancel' }).click();

  // 5. Sign out: the form again, the token and the map gone, no more polling.
  await page.locator('#sign-out').click();
  await signInShown(page);
  kept = await storage(page);
  if (kept.session !== null || kept.sessionLength || kept.localLength) fail(`signing out left a token behind: ${JSON.stringify(kept)}`);
  const afterSignOut = requests.api().length;
  await page.waitForTimeout(1800);
  if (requests.api().length !== afterSignOut) fail('the page kept polling after signing out');
  step('signed out: the form, sessionStorage empty, the map gone, polling stopped');

  // 6. The admin quarantines the pod from the page, and releases it.
  await signIn(page, admin.token);
  await page.locator('#signin').waitFor({ state: 'hidden', timeout: 10000 }).catch(() => fail('the admin token did not sign in'));
  await page.locator('#user', { hasText: `signed in as ${admin.name}` }).waitFor({ timeout: 10000 })
    .catch(async () => fail(`no "signed in as ${admin.name}": ${await page.locator('#user').textContent()}`));
  await waitFor(page, 'the map to load', () => window.bulkhead.state.map && window.bulkhead.state.map.nodes.length);
  await openWorkloadOf(page, pod);
  const done = await quarantineFromPanel(page, pod, 'port scan against the shop (UI auth e2e)');
  if (done.status() !== 200) fail(`the admin's quarantine answered ${done.status()}: ${await done.text()}`);
  await page.locator('#toast', { hasText: `quarantined ${pod}` }).waitFor({ timeout: 10000 })
    .catch(async () => fail(`no confirmation of the quarantine: ${await page.locator('#toast').textContent()}`));
  step(`admin quarantined ${pod}: "${await page.locator('#toast').textContent()}"`);
  const list = await page.evaluate(async (token) => (await fetch('/api/quarantines', { headers: { Authorization: `Bearer ${token}` } })).json(), admin.token);
  const q = Array.isArray(list) && list.find((x) => x.pod === pod);
  if (!q) fail(`/api/quarantines does not list ${pod}: ${JSON.stringify(list)}`);
  step(`/api/quarantines lists ${pod} (actor: ${q.actor})`);
  const release = page.locator(`button[data-action="release"][data-pod="${pod}"]`).first();
  await release.waitFor({ timeout: 10000 }).catch(() => fail('the quarantined pod offers no release'));
  const released = page.waitForResponse((r) => new URL(r.url()).pathname === '/api/quarantine/release', { timeout: 15000 });
  await release.click();
  if ((await released).status() !== 200) fail(`the release answered ${(await released).status()}: ${await (await released).text()}`);
  await page.locator('#toast', { hasText: `released ${pod}` }).waitFor({ timeout: 10000 })
    .catch(async () => fail(`no confirmation of the release: ${await page.locator('#toast').textContent()}`));
  await waitFor(page, `${pod} released on the map`, (p) => !window.bulkhead.state.map.quarantines.some((q) => q.pod === p), pod);
  step(`admin released ${pod}: "${await page.locator('#toast').textContent()}"`);

  if (screenshot) {
    await page.screenshot({ path: screenshot });
    step(`screenshot saved to ${screenshot}`);
  }

  // Every /api request after the first sign-in carried the token of the moment; no URL carried one.
  await requests.settled();
  for (const r of requests.seen) {
    for (const t of [viewer.token, admin.token, wrong]) {
      if (r.url.includes(t)) fail(`a token went into a URL: ${r.url}`);
    }
  }
  const bare = requests.api().filter((r) => r.at > polled[0].at && !r.authorization);
  // (The sign-in attempts and the polls after it all send one; only the first poll had none.)
  if (bare.length) fail(`API requests without a token after the first: ${bare.map((r) => `${r.method} ${r.url}`).join(', ')}`);
  if (!(await storage(page)).href.startsWith(url) || (await storage(page)).href.includes('token')) fail(`the page's address changed: ${(await storage(page)).href}`);
  step(`${requests.api().length} API requests, each after the first with a bearer token; none with a token in its URL`);
  if (errors.length) fail(`the page logged errors: ${errors.join(' | ')}`);
}

// A controller without auth: the page as before, no form, no Authorization header.
async function withoutAuth(page) {
  const errors = watchErrors(page);
  const requests = recordRequests(page);
  await page.goto(openUrl, { waitUntil: 'load' });
  await waitFor(page, 'the map to load', () => window.bulkhead && window.bulkhead.state.map);
  for (const id of expected) {
    await waitFor(page, `workload ${id} on the map`, (id) => !window.bulkhead.cy.getElementById(id).empty(), id);
  }
  await page.waitForTimeout(1800);
  if (!(await page.locator('#signin').isHidden())) fail('the sign-in form shows though the server needs no token');
  if (!(await page.locator('#user').isHidden())) fail('"signed in as" shows though the server needs no token');
  const user = await page.evaluate(() => window.bulkhead.state.map.user);
  if (user !== undefined) fail(`/api/map without auth names a user: ${JSON.stringify(user)}`);
  await requests.settled();
  const polls = requests.api();
  if (polls.length < 2) fail(`the page did not poll: ${polls.length} request(s)`);
  const withHeader = polls.filter((r) => r.authorization !== undefined);
  if (withHeader.length) fail(`requests sent an Authorization header: ${withHeader.map((r) => r.url).join(', ')}`);
  const kept = await storage(page);
  if (kept.sessionLength || kept.localLength) fail(`the page stored something: ${JSON.stringify(kept)}`);
  if (errors.length) fail(`the page logged errors: ${errors.join(' | ')}`);
  step(`without auth: the map, no form, ${polls.length} polls without an Authorization header`);
}

let failed = false;
const runs = [[withAuth, url], ...(openUrl ? [[withoutAuth, openUrl]] : [])];
for (const [check] of runs) {
  const { context, profile } = await launch();
  const page = context.pages()[0] || await context.newPage();
  try {
    await check(page);
  } catch (e) {
    failed = true;
    console.error(`auth: FAILED: ${e.message}`);
    const shot = join(tmpdir(), 'bulkhead-ui-auth-failure.png');
    await page.screenshot({ path: shot }).then(() => console.error(`auth: the page at that moment: ${shot}`), () => {});
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
  if (failed) break;
}
if (!failed) step('all checks passed');
process.exit(failed ? 1 : 0);
