// End-to-end check of the web UI in headless Chromium (Debian's /usr/bin/chromium driven by
// playwright-core), against a controller with real traffic. Run by cli/tests/ui_e2e.rs:
//
//   node ui/e2e/ui.mjs --url http://127.0.0.1:PORT/ --expect ns/Pod/a,ns/Pod/b \
//     --denied-from tools/Pod/debug --quarantine tools/debug --screenshot docs/ui.png
//   node ui/e2e/ui.mjs --url http://127.0.0.1:PORT/ --release tools/debug
//
// With --quarantine, the pod's history panel (one click) must show the 24 h before it.
//
//   node ui/e2e/ui.mjs --url http://127.0.0.1:PORT/ --named-world api.example.com
//
// With --named-world, the world peer named by that DNS name must be drawn as a node of its own
// (`world: NAME`, labelled by the name, grouped with the world), and clicking it must list its
// flows with the name beside the address.
//
//   node ui/e2e/ui.mjs --url http://127.0.0.1:PORT/ --remote west/shop/Deployment/web
//
// With --remote, that peer cluster's workload (id `cluster/namespace/Kind/name`) must be drawn
// labelled `cluster/namespace/name`, inside its namespace's box, inside a box of its cluster
// (`cluster NAME`) that no local namespace is in; clicking it must list its flows with the
// remote pod named `cluster/namespace/pod`.
//
// Clicks happen where a person would click: on the canvas, at the rendered position of the edge
// or node. Exits non-zero with a message on the first failed check; prints what it checked.
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

function arg(name, fallback = undefined) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
}

const url = arg('url');
if (!url) {
  console.error('usage: ui.mjs --url URL [--expect ids] [--denied-from id] [--staged policy] [--quarantine ns/pod] [--release ns/pod] [--named-world name] [--screenshot file]');
  process.exit(2);
}
const expected = (arg('expect', '') || '').split(',').filter(Boolean);
const deniedFrom = arg('denied-from');
const stagedPolicy = arg('staged');
const quarantinePod = arg('quarantine');
const releasePod = arg('release');
const screenshot = arg('screenshot');
const namedWorld = arg('named-world');
const remote = arg('remote');
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';

const step = (s) => console.log(`ui: ${s}`);
// Every wait below is bounded; this bounds them all, whatever hangs.
setTimeout(() => { console.error('ui: FAILED: the checks took longer than 180 s'); process.exit(1); }, 180000).unref();
function fail(s) { throw new Error(s); }

async function waitFor(page, what, fn, arg, timeout = 20000) {
  try {
    return await page.waitForFunction(fn, arg, { timeout, polling: 200 });
  } catch (e) {
    fail(`timed out waiting for ${what}`);
  }
}

// Clicks an element of the map where it is drawn, once the layout stands still (its position
// the same over two reads 150 ms apart): a click during a re-layout animation lands where the
// element was, on whatever is there now.
async function clickOnMap(page, id) {
  const where = () => page.evaluate((id) => {
    const { cy } = window.bulkhead;
    const e = cy.getElementById(id);
    if (e.empty()) return null;
    const p = e.isEdge() ? e.renderedMidpoint() : e.renderedPosition();
    const r = cy.container().getBoundingClientRect();
    return { x: r.left + p.x, y: r.top + p.y };
  }, id);
  let pos = await where();
  const deadline = Date.now() + 10000;
  for (;;) {
    if (!pos) fail(`${id} is not on the map`);
    await page.waitForTimeout(150);
    const next = await where();
    if (next && Math.abs(next.x - pos.x) < 0.5 && Math.abs(next.y - pos.y) < 0.5) break;
    if (Date.now() > deadline) fail(`${id} did not stop moving on the map`);
    pos = next;
  }
  await page.mouse.click(pos.x, pos.y);
}

const profile = mkdtempSync(join(tmpdir(), 'bulkhead-ui-chromium-'));
// A fresh, empty profile (the user data dir) for every run.
const browser = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  viewport: { width: 1600, height: 920 },
  deviceScaleFactor: 1,
});
let failed = false;
const page = browser.pages()[0] || await browser.newPage();
try {
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(m.text()); });
  await page.goto(url, { waitUntil: 'load' });
  await waitFor(page, 'the map to load', () => window.bulkhead && window.bulkhead.state.map);
  step('page loaded, map polled');

  if (releasePod) {
    await page.getByRole('button', { name: 'Release' }).first().waitFor({ timeout: 10000 })
      .catch(() => fail(`no Release button for ${releasePod} on the overview`));
    await page.locator(`button[data-action="release"][data-pod="${releasePod}"]`).first().click();
    await waitFor(page, `${releasePod} to be released`, async (pod) => {
      const r = await fetch('/api/quarantines');
      const list = await r.json();
      return !list.some((q) => q.pod === pod);
    }, releasePod);
    await page.locator('#toast', { hasText: `released ${releasePod}` }).waitFor({ timeout: 5000 });
    step(`released ${releasePod} from the overview's Release button`);
  }

  for (const id of expected) {
    await waitFor(page, `workload ${id} on the map`, (id) => !window.bulkhead.cy.getElementById(id).empty(), id);
  }
  if (expected.length) step(`workloads on the map: ${expected.join(', ')}`);
  if (stagedPolicy) {
    // The overview lists the staged policy with what it would deny; its panel lists the
    // connections, and each opens its edge.
    const entry = page.locator(`button[data-staged="${stagedPolicy}"]`);
    await entry.waitFor({ timeout: 15000 }).catch(() => fail(`the overview lists no staged policy ${stagedPolicy}`));
    await entry.click();
    const title = await page.locator('#panel-body h2').textContent();
    if (title !== stagedPolicy) fail(`clicking ${stagedPolicy} shows ${title}`);
    const edges = page.locator('#panel-body .staged-edges button[data-edge]');
    await edges.first().waitFor({ timeout: 10000 }).catch(() => fail(`${stagedPolicy} lists no connection it would deny`));
    const listed = await edges.allTextContents();
    const edgeId = await edges.first().getAttribute('data-edge');
    const faded = await page.evaluate((id) => window.bulkhead.cy.getElementById(id).hasClass('faded'), edgeId);
    if (faded) fail(`the map fades ${edgeId}, an edge ${stagedPolicy} would deny`);
    await edges.first().click();
    await page.locator('#panel-body .flows tbody tr').first().waitFor({ timeout: 10000 })
      .catch(() => fail(`opening ${edgeId} from the staged list showed no flows`));
    const badges = await page.locator('#panel-body .flows .badge').allTextContents();
    if (!badges.length || !badges.every((b) => b === 'audit-would-deny')) fail(`the would-deny edge lists ${badges}`);
    const rules = await page.locator('#panel-body .flows .rule').allTextContents();
    if (!rules.some((r) => r.startsWith(stagedPolicy))) fail(`no flow names the staged rule: ${JSON.stringify(rules)}`);
    step(`staged policy ${stagedPolicy}: would deny ${listed.join('; ')}; its edge's flows name it`);
  }
  const namespaces = await page.locator('#namespace-filter .chip').allTextContents();
  step(`namespace filter offers: ${namespaces.join(', ')}`);

  let deniedEdge = null;
  if (deniedFrom) {
    const handle = await waitFor(page, `a denied edge from ${deniedFrom}`, (src) => {
      const e = window.bulkhead.cy.edges('[verdict = "denied"]').filter((e) => e.data('source') === src && !e.hasClass('filtered'));
      return e.nonempty() ? e[0].id() : false;
    }, deniedFrom);
    deniedEdge = await handle.jsonValue();
    // Drawn for real: on the canvas, with a size (an edge cytoscape culls has an empty box).
    await waitFor(page, `${deniedEdge} drawn on the canvas`, (id) => {
      const bb = window.bulkhead.cy.getElementById(id).renderedBoundingBox();
      return bb.w > 0 || bb.h > 0;
    }, deniedEdge);
    step(`denied edge drawn: ${deniedEdge}`);

    // Verdict filter: hiding denied hides it; showing brings it back.
    await page.locator('#verdict-filter .chip.denied').click();
    const hidden = await page.evaluate((id) => window.bulkhead.cy.getElementById(id).hasClass('filtered'), deniedEdge);
    if (!hidden) fail('the verdict filter did not hide the denied edge');
    await page.locator('#verdict-filter .chip.denied').click();
    // Namespace filter: hiding the source's namespace hides its workloads.
    const ns = deniedFrom.split('/')[0];
    await page.locator(`#namespace-filter .chip[data-namespace="${ns}"]`).click();
    const nsHidden = await page.evaluate((id) => window.bulkhead.cy.getElementById(id).hasClass('filtered'), deniedFrom);
    if (!nsHidden) fail(`the namespace filter did not hide ${deniedFrom}`);
    await page.locator(`#namespace-filter .chip[data-namespace="${ns}"]`).click();
    await page.waitForTimeout(700); // the re-layout animation
    step('verdict and namespace filters hide and show');

    await clickOnMap(page, deniedEdge);
    // The panel of an edge clicked before may still show: wait for this edge's.
    await page.waitForFunction(
      (from) => (document.querySelector('#panel-body h2')?.textContent ?? '').startsWith(`${from} → `),
      deniedFrom, { timeout: 10000, polling: 100 },
    ).catch(() => {});
    await page.locator('#panel-body .flows tbody tr').first().waitFor({ timeout: 10000 })
      .catch(() => fail('clicking the denied edge showed no flows'));
    const title = await page.locator('#panel-body h2').textContent();
    const rules = await page.locator('#panel-body .flows .rule').allTextContents();
    const verdicts = await page.locator('#panel-body .flows .badge').allTextContents();
    if (!title.startsWith(`${deniedFrom} → `)) fail(`the panel shows ${title}, not the clicked edge`);
    if (!verdicts.every((v) => v === 'denied')) fail(`the denied edge lists other verdicts: ${verdicts}`);
    if (!rules.some((r) => /^(NetworkPolicy|ServicePolicy|ClusterNetworkPolicy|Quarantine) \S+\/\S+ (ingress|egress) (default-deny|rule \d+)$/.test(r))) {
      fail(`no flow names its deciding rule (kind ns/name direction rule): ${JSON.stringify(rules)}`);
    }
    step(`clicked the denied edge: ${title}; ${rules.length} flow(s), decided by ${[...new Set(rules)].join('; ')}`);
  }

  if (namedWorld) {
    const id = `world: ${namedWorld}`;
    await waitFor(page, `the node ${id} on the map`, (id) => !window.bulkhead.cy.getElementById(id).empty(), id);
    // Drawn for real, among the world, labelled by its name, apart from plain `world`.
    await waitFor(page, `${id} drawn on the canvas`, (id) => {
      const n = window.bulkhead.cy.getElementById(id);
      const bb = n.renderedBoundingBox();
      return n.visible() && bb.w > 0 && bb.h > 0;
    }, id);
    const node = await page.evaluate((id) => {
      const n = window.bulkhead.cy.getElementById(id);
      return { kind: n.data('kind'), label: n.data('label'), edges: n.connectedEdges().length };
    }, id);
    if (node.kind !== 'world') fail(`${id} is drawn as ${node.kind}, not among the world`);
    if (!node.label.startsWith(namedWorld)) fail(`${id} is labelled ${JSON.stringify(node.label)}`);
    if (!node.edges) fail(`${id} has no edge`);
    const plain = await page.evaluate(() => window.bulkhead.state.map.nodes.filter((n) => n.id === 'world').map((n) => n.domain || ''));
    if (plain.some((d) => d)) fail('plain world carries a domain');
    await clickOnMap(page, id);
    await page.locator('#panel-body h2', { hasText: id }).waitFor({ timeout: 10000 })
      .catch(() => fail(`clicking ${id} opened no panel of it`));
    const about = await page.locator('#panel-body .muted').first().textContent();
    if (!about.includes(namedWorld)) fail(`the panel of ${id} says ${JSON.stringify(about)}`);
    await page.locator('#panel-body .flows tbody tr').first().waitFor({ timeout: 10000 })
      .catch(() => fail(`clicking ${id} showed no flows`));
    const paths = await page.locator('#panel-body .flows .path').allTextContents();
    if (!paths.some((p) => p.includes(`(${namedWorld}`))) fail(`no flow of ${id} names its peer: ${JSON.stringify(paths)}`);
    step(`named world node drawn and opened: ${id} (${node.edges} edge(s)); ${paths.length} flow(s), e.g. ${paths[0]}`);
  }

  if (remote) {
    await waitFor(page, `the node ${remote} on the map`, (id) => !window.bulkhead.cy.getElementById(id).empty(), remote);
    const node = await page.evaluate((id) => {
      const n = window.bulkhead.cy.getElementById(id);
      const ns = n.parent();
      const box = ns.parent();
      const locals = window.bulkhead.cy.nodes('[kind = "namespace"]').filter((x) => x.parent().empty()).map((x) => x.id());
      return {
        label: n.data('label'), cluster: n.data('cluster'), ns: ns.id(), nsParent: box.id(),
        box: box.nonempty() ? { kind: box.data('kind'), label: box.data('label'), children: box.children().map((x) => x.id()) } : null,
        locals, drawn: n.visible() && box.nonempty() && box.visible() && box.renderedBoundingBox().w > 0,
      };
    }, remote);
    const [cluster, namespace, , name] = remote.split('/');
    const wantLabel = `${cluster}/${namespace}/${name}`;
    if (!node.label.startsWith(`${wantLabel}\n`)) fail(`${remote} is labelled ${JSON.stringify(node.label)}, not ${wantLabel}`);
    if (node.cluster !== cluster) fail(`${remote} carries cluster ${JSON.stringify(node.cluster)}`);
    if (node.ns !== `ns:${cluster}/${namespace}`) fail(`${remote} is drawn in ${node.ns}`);
    if (!node.box || node.box.kind !== 'cluster' || node.box.label !== `cluster ${cluster}`) fail(`the namespace of ${remote} is in ${JSON.stringify(node.box)}, not a box of cluster ${cluster}`);
    if (!node.box.children.every((c) => c.startsWith(`ns:${cluster}/`))) fail(`the box of cluster ${cluster} holds ${JSON.stringify(node.box.children)}`);
    if (!node.locals.length) fail('no local namespace is drawn outside the cluster boxes');
    if (!node.drawn) fail(`${remote} or its cluster box is not drawn`);
    await clickOnMap(page, remote);
    await page.locator('#panel-body h2', { hasText: wantLabel }).waitFor({ timeout: 10000 })
      .catch(() => fail(`clicking ${remote} opened no panel of it`));
    const about = await page.locator('#panel-body .muted').first().textContent();
    if (!about.includes(`peer cluster ${cluster}`)) fail(`the panel of ${remote} says ${JSON.stringify(about)}`);
    await page.locator('#panel-body .flows tbody tr').first().waitFor({ timeout: 10000 })
      .catch(() => fail(`clicking ${remote} showed no flows`));
    const paths = await page.locator('#panel-body .flows .path').allTextContents();
    if (!paths.some((p) => p.includes(`${cluster}/${namespace}/`))) fail(`no flow of ${remote} names its pod: ${JSON.stringify(paths)}`);
    step(`remote workload drawn as ${wantLabel} in ${node.ns} in the box "${node.box.label}" (local namespaces: ${node.locals.join(', ')}); ${paths.length} flow(s), e.g. ${paths[0]}`);
  }

  if (quarantinePod) {
    const [ns, pod] = quarantinePod.split('/');
    const workload = await page.evaluate((p) => {
      const n = window.bulkhead.state.map.nodes.find((n) => n.pods.some((x) => x.pod === p));
      return n && n.id;
    }, quarantinePod);
    if (!workload) fail(`no workload on the map has the pod ${quarantinePod}`);
    await clickOnMap(page, workload);
    const button = page.locator(`button[data-action="quarantine"][data-pod="${quarantinePod}"]`);
    await button.waitFor({ timeout: 10000 }).catch(() => fail(`clicking ${workload} offered no quarantine for ${quarantinePod}`));
    await button.click();
    await page.locator('form.quarantine input[name="reason"]').fill(`port scan against the shop (seen in the UI e2e test, ${ns}/${pod})`);
    await page.locator('form.quarantine button[type="submit"]').click();
    await page.locator('#toast', { hasText: `quarantined ${quarantinePod}` }).waitFor({ timeout: 15000 })
      .catch(async () => fail(`no confirmation of the quarantine: ${await page.locator('#toast').textContent()}`));
    await page.locator(`button[data-action="release"][data-pod="${quarantinePod}"]`).waitFor({ timeout: 10000 })
      .catch(() => fail('the quarantined pod offers no release'));
    await waitFor(page, `${workload} drawn as quarantined`, (id) => window.bulkhead.cy.getElementById(id).hasClass('quarantined'), workload);
    const toastText = await page.locator('#toast').textContent();
    step(`quarantined from the UI: ${toastText}`);

    // Forensics in one click: what the pod talked to in the 24 h before its quarantine, from
    // the flow history (the quarantine reaches the history within a second: refresh until then).
    await page.locator(`button[data-action="history"][data-pod="${quarantinePod}"]`).first().click();
    const heading = `${quarantinePod}: flow history`;
    await page.locator('#panel-body h2', { hasText: heading }).waitFor({ timeout: 10000 })
      .catch(() => fail(`the history button of ${quarantinePod} opened no history panel`));
    let seen = null;
    for (let i = 0; i < 20 && !seen; i++) {
      await page.locator('#panel-body button[data-action="refresh-history"]').waitFor({ timeout: 30000 })
        .catch(() => fail('the history panel never finished reading'));
      const note = await page.locator('#panel-body .muted').first().textContent();
      const badges = await page.locator('#panel-body .flows .badge').allTextContents();
      if (note.includes('before its quarantine at') && badges.includes('quarantined') && badges.includes('denied')) {
        seen = { note, badges };
        break;
      }
      await page.waitForTimeout(500);
      await page.locator('#panel-body button[data-action="refresh-history"]').click();
    }
    if (!seen) fail(`the history panel of ${quarantinePod} never showed its quarantine and its denied flows`);
    if (!seen.note.includes("from the controller's flow history")) fail(`the panel did not read the history: ${seen.note}`);
    const peers = await page.locator('#panel-body .history-peers li').allTextContents();
    if (!peers.length) fail('the history panel lists no peer');
    step(`history before the quarantine: ${peers.length} peer(s) (${peers.join('; ')}), ${seen.badges.length} flow(s)`);
  }

  if (screenshot) {
    if (deniedEdge) {
      await page.waitForTimeout(1600); // let flows of the quarantine arrive and the map settle
      await clickOnMap(page, deniedEdge);
      await page.locator('#panel-body .flows tbody tr').first().waitFor({ timeout: 10000 });
    }
    await page.locator('#fit').click();
    await page.waitForTimeout(400);
    await page.mouse.move(0, 0);
    await page.locator('#toast.show').waitFor({ state: 'detached', timeout: 8000 }).catch(() => {});
    await page.waitForTimeout(500);
    await page.screenshot({ path: screenshot });
    step(`screenshot saved to ${screenshot}`);
  }
  if (pageErrors.length) fail(`the page logged errors: ${pageErrors.join(' | ')}`);
  step('all checks passed');
} catch (e) {
  failed = true;
  console.error(`ui: FAILED: ${e.message}`);
  const shot = join(tmpdir(), 'bulkhead-ui-failure.png');
  await page.screenshot({ path: shot }).then(() => console.error(`ui: the page at that moment: ${shot}`), () => {});
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
