// Bulkhead's web UI: the live service map. Polls the controller's JSON API (`/api/map` every
// 1.5 s, the selection's flows from `/api/flows`), draws namespaces as compound nodes and
// workloads inside them with cytoscape (fcose layout), and quarantines or releases pods through
// `POST /api/quarantine` and `/api/quarantine/release`.
//
// When the controller requires authentication (`--http-auth tokens|kubernetes`), every `/api/*`
// request carries `Authorization: Bearer <token>`; a 401 stops the polling and shows the sign-in
// form. The token lives in sessionStorage (this tab only, gone when it closes): never in
// localStorage, a cookie or the URL.
import cytoscape from 'cytoscape';
import fcose from 'cytoscape-fcose';

cytoscape.use(fcose);

const POLL_MS = 1500;
const VERDICTS = ['allowed', 'denied', 'audit'];
const COLORS = { allowed: '#3fb950', denied: '#f85149', audit: '#d29922' };
const PROTOCOLS = { 1: 'ICMP', 6: 'TCP', 17: 'UDP', 58: 'ICMPv6', 132: 'SCTP' };

const state = {
  map: null,
  verdicts: new Set(VERDICTS),
  hiddenNamespaces: new Set(),
  knownNamespaces: new Set(),
  selection: null, // {type: 'edge'|'node'|'namespace'|'cluster'|'staged'|'history', id}
  layoutKey: '',
  firstLayout: true,
  openForm: null, // pod whose quarantine form is open
  flowsSeq: 0,
  // The flow history of the pod whose history panel is open: read once when it opens (a day
  // of a busy pod is many records), again on its Refresh button.
  history: null, // {pod, loading, error, quarantinedAt, since, until, flows, fromMemory}
  // Bumped whenever the credentials change (sign-in, sign-out, a 401): answers to requests
  // sent before are dropped, so no data of a signed-out session is drawn.
  authGen: 0,
  signInShown: false,
};

// ---------- small DOM helpers (no framework; text goes through textContent) ----------

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const $ = (sel) => document.querySelector(sel);

function toast(text, error = false) {
  const t = $('#toast');
  t.textContent = text;
  t.className = `show${error ? ' error' : ''}`;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.className = error ? 'error' : ''; }, error ? 6000 : 3500);
}

const proto = (p) => PROTOCOLS[p] || (p ? `proto ${p}` : '');
const shortName = (workload) => workload.replace(/^(Pod|Deployment|StatefulSet|DaemonSet|ReplicaSet|Job|CronJob)\//, '');
const kindOf = (workload) => (workload.includes('/') ? workload.split('/')[0] : '');

function clock(nanos) {
  const d = new Date(nanos / 1e6);
  return d.toLocaleTimeString([], { hour12: false });
}

function fmtBytes(n) {
  if (!n) return '0 B';
  const u = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

// ---------- authentication and the API ----------

const TOKEN_KEY = 'bulkhead.token';
// Where the token is when sessionStorage is unavailable (a sandboxed or storage-less page).
let memoryToken = '';

function getToken() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch { return memoryToken; }
}

function setToken(token) {
  memoryToken = token;
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
  } catch { /* memoryToken holds it */ }
}

// A request the server refused for want of a valid token (HTTP 401).
class AuthRequired extends Error {}

// The headers every /api request carries: the token, when there is one.
function authHeaders(headers = {}) {
  const token = getToken();
  return token ? { ...headers, Authorization: `Bearer ${token}` } : headers;
}

// fetch() of /api/*, with the token. A 401 stops the polling and shows the sign-in form (unless
// the credentials changed while the request was out), then throws AuthRequired.
async function api(path, init = {}) {
  const gen = state.authGen;
  const sentToken = !!getToken();
  const res = await fetch(path, { ...init, headers: authHeaders(init.headers) });
  if (res.status === 401) {
    const json = await res.json().catch(() => ({}));
    const message = json.error || 'HTTP 401';
    if (gen === state.authGen) showSignIn(sentToken ? `the token was refused: ${message}` : '');
    throw new AuthRequired(message);
  }
  return res;
}

// ---------- sign-in ----------

function showSignIn(error = '') {
  stopPolling();
  state.authGen += 1;
  state.flowsSeq += 1;
  state.signInShown = true;
  // Forget what the last session showed: the page holds no data while signed out.
  state.map = null;
  state.selection = null;
  state.openForm = null;
  state.panelKey = undefined;
  state.layoutKey = '';
  state.firstLayout = true;
  cy.elements().remove();
  $('#panel-body').replaceChildren();
  $('#stats').textContent = '';
  const nsBox = $('#namespace-filter');
  nsBox.replaceChildren();
  delete nsBox.dataset.key;
  $('#user').hidden = true;
  $('#user-name').textContent = '';
  const live = $('#live');
  live.textContent = 'sign-in required';
  live.className = 'live bad';
  document.body.classList.add('signed-out');
  $('#signin').hidden = false;
  signInError(error);
  const input = $('#token');
  input.value = '';
  input.focus();
}

function signInError(text) {
  const e = $('#signin-error');
  e.textContent = text;
  e.hidden = !text;
}

function hideSignIn() {
  state.signInShown = false;
  $('#signin').hidden = true;
  signInError('');
  document.body.classList.remove('signed-out');
  cy.resize();
}

// Tries the token on /api/map before keeping it: a rejected one shows the server's error here.
async function signIn(ev) {
  ev.preventDefault();
  const input = $('#token');
  const button = $('#signin-submit');
  const token = input.value.trim();
  if (!token) { signInError('paste an access token'); input.focus(); return; }
  // (An HTTP header carries printable ASCII only; tokens have no spaces.)
  if (!/^[\x21-\x7e]+$/.test(token)) { signInError('that is not a token: a token is one word of printable ASCII characters'); input.select(); return; }
  button.disabled = true;
  try {
    const res = await fetch('/api/map', { cache: 'no-store', headers: { Authorization: `Bearer ${token}` } });
    if (!res.ok) {
      const json = await res.json().catch(() => ({}));
      signInError(json.error || `HTTP ${res.status}`);
      input.select();
      return;
    }
    setToken(token);
    input.value = '';
    state.authGen += 1;
    hideSignIn();
    startPolling();
  } catch (e) {
    signInError(`cannot reach the controller: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

function signOut() {
  setToken('');
  showSignIn();
}

$('#signin-form').addEventListener('submit', signIn);
$('#sign-out').addEventListener('click', signOut);

// "signed in as NAME" when the server authenticated the request.
function showUser(map) {
  const user = typeof map.user === 'string' && map.user ? map.user : '';
  $('#user').hidden = !user;
  $('#user-name').textContent = user;
}

// The deciding rule as the controller reports it: kind, namespace/name, direction, rule index.
function ruleView(d, text) {
  if (!d || !d.kind || d.kind === 'Default' || !d.name) {
    return el('span', { class: 'rule' }, (d && d.text) || text || '');
  }
  const object = d.namespace ? `${d.namespace}/${d.name}` : d.name;
  return el('span', { class: 'rule', title: d.text },
    el('span', { class: 'kind' }, d.kind), ' ', object, ' ', d.direction, ' ',
    el('span', { class: 'idx' }, d.index === null || d.index === undefined ? 'default-deny' : `rule ${d.index}`));
}

// ---------- the map ----------

// Node boxes sized to their label (DejaVu Sans at 11 px: about 6.6 px a character).
const labelLines = (n) => String(n.data('label') || '').split('\n');
const labelWidth = (n) => Math.max(36, 6.6 * Math.max(...labelLines(n).map((l) => l.length)));
const labelHeight = (n) => 14 * labelLines(n).length;

const style = [
  { selector: 'node', style: {
    'background-color': '#1a2433', 'border-width': 1.5, 'border-color': '#3a4a60',
    label: 'data(label)', color: '#d7dee8', 'font-size': 11, 'text-wrap': 'wrap',
    'text-valign': 'center', 'text-halign': 'center', shape: 'round-rectangle',
    width: labelWidth, height: labelHeight, padding: '10px', 'font-family': 'DejaVu Sans, sans-serif',
  } },
  { selector: 'node[kind = "namespace"]', style: {
    'background-color': '#58a6ff', 'background-opacity': 0.06, 'border-color': '#2f4a6e',
    'border-style': 'dashed', 'border-width': 1.5, shape: 'round-rectangle',
    label: 'data(label)', 'text-valign': 'top', 'text-halign': 'center', 'font-size': 12,
    'font-weight': 'bold', color: '#79b8ff', 'text-margin-y': -4, padding: '18px',
  } },
  // A peer cluster: a box around its namespaces, in another colour than theirs.
  { selector: 'node[kind = "cluster"]', style: {
    'background-color': '#d2a8ff', 'background-opacity': 0.05, 'border-color': '#8957e5',
    'border-style': 'double', 'border-width': 4, shape: 'round-rectangle',
    label: 'data(label)', 'text-valign': 'top', 'text-halign': 'center', 'font-size': 13,
    'font-weight': 'bold', color: '#d2a8ff', 'text-margin-y': -4, padding: '22px',
  } },
  { selector: 'node[kind = "world"], node[kind = "host"]', style: {
    shape: 'ellipse', 'background-color': '#2a2f3a', 'border-color': '#6e7681',
    padding: '14px', 'font-weight': 'bold',
  } },
  { selector: 'node.quarantined', style: {
    'border-color': '#ff7b72', 'border-style': 'dashed', 'border-width': 2.5,
    'background-color': '#3a1618',
  } },
  { selector: 'edge', style: {
    width: 'data(width)', 'line-color': 'data(color)', 'target-arrow-color': 'data(color)',
    'target-arrow-shape': 'triangle', 'arrow-scale': 0.9, 'curve-style': 'bezier',
    'control-point-step-size': 26, opacity: 0.85, label: 'data(label)', 'font-size': 9,
    color: '#aab6c5', 'text-opacity': 0, 'text-background-color': '#0d1117', 'text-background-opacity': 0,
    'text-background-padding': '2px', 'text-rotation': 'autorotate',
    'font-family': 'DejaVu Sans, sans-serif',
  } },
  // (An edge without a label gets no bounding box and is culled: hide labels, never drop them.)
  { selector: 'edge.labelled', style: { 'text-opacity': 1, 'text-background-opacity': 0.85 } },
  { selector: 'edge[verdict = "denied"]', style: { 'line-style': 'dashed', 'line-dash-pattern': [7, 4] } },
  { selector: 'edge[verdict = "audit"]', style: { 'line-style': 'dotted' } },
  { selector: '.filtered', style: { display: 'none' } },
  { selector: ':selected', style: { 'overlay-color': '#58a6ff', 'overlay-opacity': 0.18, 'overlay-padding': 6 } },
  { selector: 'node:selected', style: { 'border-color': '#58a6ff', 'border-width': 2.5 } },
  { selector: 'edge:selected', style: { opacity: 1, 'z-index': 10 } },
  { selector: '.faded', style: { opacity: 0.3 } },
];

const cy = cytoscape({
  container: $('#map'),
  style,
  minZoom: 0.2,
  maxZoom: 3,
  boxSelectionEnabled: false,
});
// For the end-to-end test and for poking around from the console.
window.bulkhead = { cy, state };

// The peer cluster of each remote namespace (`cluster/namespace`), as the controller names it
// on the namespace's workloads (their `cluster`): the page never parses names for it.
function clustersOf(map) {
  const of = new Map();
  for (const n of map.nodes) if (n.cluster) of.set(n.namespace, n.cluster);
  return of;
}

function elementsOf(map) {
  const out = [];
  // A peer cluster's namespaces sit in a box of their cluster, apart from the local ones.
  const clusterOf = clustersOf(map);
  for (const c of [...new Set(clusterOf.values())].sort()) {
    out.push({ group: 'nodes', data: { id: `cluster:${c}`, label: `cluster ${c}`, kind: 'cluster', cluster: c } });
  }
  for (const ns of map.namespaces) {
    const c = clusterOf.get(ns);
    out.push({ group: 'nodes', data: { id: `ns:${ns}`, label: ns, kind: 'namespace', namespace: ns, cluster: c, parent: c ? `cluster:${c}` : undefined } });
  }
  for (const n of map.nodes) {
    const kind = kindOf(n.workload);
    // A remote workload reads `cluster/namespace/name` wherever it is seen; a world peer named
    // by DNS, its domain, then `world` (drawn as the world is).
    const name = n.cluster ? `${n.namespace}/${shortName(n.workload)}` : shortName(n.workload);
    const label = n.kind === 'workload' ? `${name}\n${kind}${n.quarantined ? ' · quarantined' : ''}`
      : n.domain ? `${n.domain}\nworld` : n.workload;
    out.push({
      group: 'nodes',
      data: { id: n.id, label, kind: n.kind, domain: n.domain, namespace: n.namespace, cluster: n.cluster, parent: n.namespace ? `ns:${n.namespace}` : undefined },
      classes: n.quarantined ? 'quarantined' : '',
    });
  }
  // One drawn edge per (source, destination, verdict): the ports it covers in its label.
  const drawn = new Map();
  for (const e of map.edges) {
    const counts = { allowed: e.allowed, denied: e.denied, audit: e.audit_would_deny };
    for (const v of VERDICTS) {
      const count = counts[v];
      if (!count) continue;
      const id = `${e.src}|${e.dst}|${v}`;
      const d = drawn.get(id) || { id, source: e.src, target: e.dst, verdict: v, color: COLORS[v], count: 0, bytes: 0, ports: [] };
      d.count += count;
      d.bytes += e.bytes;
      d.ports.push({ port: e.port, protocol: e.protocol, count });
      drawn.set(id, d);
    }
  }
  for (const d of drawn.values()) {
    d.ports.sort((a, b) => a.protocol - b.protocol || a.port - b.port);
    const byProto = new Map();
    for (const p of d.ports) byProto.set(p.protocol, [...(byProto.get(p.protocol) || []), p.port || '*']);
    const ports = [...byProto].map(([pr, list]) => `${list.join(', ')}/${proto(pr)}`).join(' · ');
    d.label = `${ports}${d.count > 1 ? `  ×${d.count}` : ''}`;
    d.width = Math.min(12, 1.5 + 1.4 * Math.log2(1 + d.count + d.bytes / 4096));
    out.push({ group: 'edges', data: d });
  }
  return out;
}

// Port labels on every edge while the map is small, else on the selection's edges only.
function labelEdges() {
  cy.batch(() => {
    const edges = cy.edges().not('.filtered');
    const sel = state.selection && !['namespace', 'cluster'].includes(state.selection.type) ? cy.getElementById(state.selection.id) : cy.collection();
    const focus = sel.nonempty() ? (sel.isEdge() ? sel : sel.connectedEdges()) : cy.collection();
    cy.edges().removeClass('labelled');
    (edges.length <= 14 ? edges : focus).addClass('labelled');
  });
}

function applyFilters() {
  cy.batch(() => {
    cy.elements().removeClass('filtered');
    cy.nodes().forEach((n) => {
      if (n.data('namespace') && state.hiddenNamespaces.has(n.data('namespace'))) n.addClass('filtered');
    });
    cy.edges().forEach((e) => {
      if (!state.verdicts.has(e.data('verdict')) || e.source().hasClass('filtered') || e.target().hasClass('filtered')) {
        e.addClass('filtered');
      }
    });
    // A cluster's box shows while one of its namespaces does.
    cy.nodes('[kind = "cluster"]').forEach((c) => {
      if (c.children().filter((n) => !n.hasClass('filtered')).empty()) c.addClass('filtered');
    });
    // world/host show only while a visible edge touches them.
    cy.nodes('[kind = "world"], [kind = "host"]').forEach((n) => {
      if (n.connectedEdges().filter((e) => !e.hasClass('filtered')).empty()) n.addClass('filtered');
    });
  });
  labelEdges();
}

function runLayout() {
  const visible = cy.elements().not('.filtered');
  if (visible.empty()) return;
  // Big maps: a faster layout, no animation.
  const big = visible.nodes().length > 300;
  const layout = visible.layout({
    name: 'fcose',
    quality: big ? 'draft' : 'proof',
    randomize: state.firstLayout || big,
    animate: !state.firstLayout && !big,
    animationDuration: 400,
    fit: true,
    padding: 40,
    nodeDimensionsIncludeLabels: true,
    nodeSeparation: 110,
    idealEdgeLength: () => 120,
    nodeRepulsion: () => 12000,
    edgeElasticity: () => 0.3,
    nestingFactor: 0.6,
    gravity: 0.3,
    tile: true,
    tilingPaddingVertical: 30,
    tilingPaddingHorizontal: 30,
  });
  // Whatever moved meanwhile (a filter, the window), end with the whole map in view.
  layout.one('layoutstop', () => cy.fit(cy.elements().not('.filtered'), 40));
  layout.run();
  state.firstLayout = false;
}

function render(map) {
  const wanted = elementsOf(map);
  const ids = new Set(wanted.map((w) => w.data.id));
  cy.batch(() => {
    cy.elements().filter((e) => !ids.has(e.id())).remove();
    // Nodes before edges, parents before children.
    for (const w of wanted) {
      const have = cy.getElementById(w.data.id);
      if (have.empty()) {
        cy.add(w);
      } else {
        // id, source, target and parent are structure, not data: never rewrite them in place.
        const { id, source, target, parent, ...rest } = w.data;
        have.data(rest);
        if (w.group === 'nodes' && (have.data('parent') || undefined) !== parent) have.move({ parent: parent ?? null });
        have.toggleClass('quarantined', w.classes === 'quarantined');
      }
    }
  });
  renderNamespaceFilter(map.namespaces);
  applyFilters();
  highlight();
  const key = cy.nodes().not('.filtered').map((n) => n.id()).sort().join(',');
  if (key !== state.layoutKey) {
    state.layoutKey = key;
    runLayout();
  }
  const denied = map.edges.reduce((a, e) => a + e.denied, 0);
  $('#stats').textContent = `${map.nodes.filter((n) => n.kind === 'workload').length} workloads · ${map.edges.length} edges · ${denied} denied · ${map.quarantines.length} quarantined`;
  $('#map').classList.toggle('empty', map.nodes.length === 0);
}

function renderNamespaceFilter(namespaces) {
  const box = $('#namespace-filter');
  const key = namespaces.join(',');
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  box.replaceChildren(...namespaces.map((ns) => el('button', {
    class: `chip ns${state.hiddenNamespaces.has(ns) ? '' : ' on'}`,
    'data-namespace': ns,
    'aria-pressed': String(!state.hiddenNamespaces.has(ns)),
    onclick: (ev) => {
      if (state.hiddenNamespaces.has(ns)) state.hiddenNamespaces.delete(ns); else state.hiddenNamespaces.add(ns);
      ev.currentTarget.classList.toggle('on', !state.hiddenNamespaces.has(ns));
      ev.currentTarget.setAttribute('aria-pressed', String(!state.hiddenNamespaces.has(ns)));
      applyFilters();
      state.layoutKey = '';
      render(state.map);
    },
  }, ns)));
}

for (const b of document.querySelectorAll('#verdict-filter .chip')) {
  b.addEventListener('click', () => {
    const v = b.dataset.verdict;
    if (state.verdicts.has(v)) state.verdicts.delete(v); else state.verdicts.add(v);
    b.classList.toggle('on', state.verdicts.has(v));
    b.setAttribute('aria-pressed', String(state.verdicts.has(v)));
    applyFilters();
    if (state.selection) refreshPanel(true);
  });
}
$('#fit').addEventListener('click', () => cy.animate({ fit: { eles: cy.elements().not('.filtered'), padding: 40 } }, { duration: 300 }));

cy.on('tap', 'edge', (ev) => select({ type: 'edge', id: ev.target.id() }));
cy.on('tap', 'node', (ev) => {
  const n = ev.target;
  const kind = n.data('kind');
  select(kind === 'namespace' ? { type: 'namespace', id: n.data('namespace') }
    : kind === 'cluster' ? { type: 'cluster', id: n.data('cluster') } : { type: 'node', id: n.id() });
});
cy.on('tap', (ev) => { if (ev.target === cy) select(null); });

// The selection and what touches it stay bright; the rest fades.
function highlight() {
  const sel = state.selection;
  cy.batch(() => {
    cy.elements().removeClass('faded');
    if (sel && sel.type === 'staged') {
      // A staged policy: the edges it would deny, and their ends.
      const p = (state.map && state.map.staged || []).find((x) => x.policy === sel.id);
      let keep = cy.collection();
      for (const e of (p ? p.edges : [])) keep = keep.union(cy.getElementById(`${e.src}|${e.dst}|audit`));
      keep = keep.union(keep.connectedNodes());
      if (keep.nonempty()) cy.elements().not(keep).not(keep.ancestors()).not(':parent').addClass('faded');
    } else if (sel && sel.type !== 'namespace' && sel.type !== 'cluster') {
      const target = cy.getElementById(sel.id);
      if (target.nonempty()) {
        const keep = target.isEdge() ? target.union(target.connectedNodes()) : target.closedNeighborhood();
        cy.elements().not(keep).not(keep.ancestors()).not(':parent').addClass('faded');
      }
    }
  });
  labelEdges();
}

function select(sel) {
  state.selection = sel;
  state.openForm = null;
 
  highlight();
  refreshPanel(true);
}

// ---------- the side panel ----------

function section(title, ...children) {
  return [el('h3', {}, title), ...children];
}

function legend() {
  return el('div', { class: 'legend' },
    el('span', { class: 'line', style: `border-color: ${COLORS.allowed}` }), el('span', {}, 'allowed connections (width: traffic)'),
    el('span', { class: 'line', style: `border-color: ${COLORS.denied}; border-top-style: dashed` }), el('span', {}, 'denied'),
    el('span', { class: 'line', style: `border-color: ${COLORS.audit}; border-top-style: dotted` }), el('span', {}, 'would be denied by a staged (or audit-mode) policy'),
    el('span', { class: 'box ns' }), el('span', {}, 'namespace'),
    el('span', { class: 'box cluster' }), el('span', {}, 'peer cluster (its workloads read cluster/namespace/name)'),
    el('span', { class: 'box' }), el('span', {}, 'workload (owner, else the pod)'),
    el('span', { class: 'box world' }), el('span', {}, 'world / host: addresses of no pod'),
    el('span', { class: 'box q' }), el('span', {}, 'quarantined'));
}

function actionsNote() {
  const a = state.map && state.map.actions;
  if (!a || a.enabled) return null;
  return el('div', { class: 'note' }, `Quarantine is read-only here: ${a.why}`);
}

async function post(path, body) {
  const res = await api(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'X-Bulkhead-Action': '1' },
    body: JSON.stringify(body),
  });
  const json = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(json.error || `HTTP ${res.status}`);
  return json;
}

async function doQuarantine(pod, form) {
  const data = new FormData(form);
  const reason = String(data.get('reason') || '').trim();
  if (!reason) { toast('say why: a quarantine needs a reason', true); return; }
  const allow = String(data.get('allow') || '').split(/[\s;]+/).filter(Boolean);
  const body = { pod, reason, allow };
  if (data.get('for')) body.for = data.get('for');
  form.querySelector('button[type=submit]').disabled = true;
  try {
    const r = await post('/api/quarantine', body);
    const nodes = Object.keys(r.nodes).length;
    toast(`quarantined ${pod}: ${r.enforced ? 'enforced' : 'sent'} on ${nodes} node(s) in ${r.elapsed_ms.toFixed(1)} ms`);
    state.openForm = null;
   
    await tick();
  } catch (e) {
    toast(`quarantine failed: ${e.message}`, true);
    form.querySelector('button[type=submit]').disabled = false;
  }
}

async function doRelease(pod, button) {
  button.disabled = true;
  try {
    const r = await post('/api/quarantine/release', { pod });
    toast(`released ${pod}: ${r.enforced ? 'enforced' : 'sent'} on ${Object.keys(r.nodes).length} node(s) in ${r.elapsed_ms.toFixed(1)} ms`);
   
    await tick();
  } catch (e) {
    toast(`release failed: ${e.message}`, true);
    button.disabled = false;
  }
}

function quarantineForm(pod) {
  const form = el('form', { class: 'quarantine', 'data-pod': pod, onsubmit: (ev) => { ev.preventDefault(); doQuarantine(pod, ev.currentTarget); } },
    el('label', { for: 'q-reason' }, `Isolate ${pod}: it reaches and is reached by nothing but the exceptions`),
    el('input', { id: 'q-reason', name: 'reason', placeholder: 'reason (required), e.g. port scan against the shop', required: true, autocomplete: 'off' }),
    el('input', { name: 'allow', placeholder: 'exceptions (optional): ns=security,app=forensics@22/TCP 10.0.0.53/32@53/UDP', autocomplete: 'off' }),
    el('div', { class: 'row' },
      el('select', { name: 'for', 'aria-label': 'duration' },
        el('option', { value: '' }, 'until released'),
        el('option', { value: '15m' }, 'for 15 minutes'),
        el('option', { value: '1h' }, 'for 1 hour'),
        el('option', { value: '24h' }, 'for 24 hours')),
      el('button', { type: 'submit', class: 'danger' }, 'Quarantine now'),
      el('button', { type: 'button', class: 'ghost', onclick: () => { state.openForm = null; refreshPanel(false); } }, 'Cancel')));
  setTimeout(() => form.querySelector('input').focus(), 0);
  return form;
}

function podsList(pods) {
  const enabled = state.map.actions.enabled;
  const quarantines = new Map(state.map.quarantines.map((q) => [q.pod, q]));
  return el('ul', { class: 'pods' }, pods.map((p) => {
    const q = quarantines.get(p.pod);
    const isQ = p.quarantined || !!q;
    const action = isQ
      ? el('button', { class: 'primary', 'data-action': 'release', 'data-pod': p.pod, disabled: !enabled || !q, onclick: (ev) => doRelease(p.pod, ev.currentTarget) }, 'Release')
      : el('button', { class: 'danger', 'data-action': 'quarantine', 'data-pod': p.pod, disabled: !enabled, onclick: () => { state.openForm = p.pod; refreshPanel(false); } }, 'Quarantine…');
    return [
      el('li', { 'data-pod': p.pod },
        el('div', {},
          el('div', { class: 'name' }, p.pod, ' ', isQ ? el('span', { class: 'badge quarantined' }, 'quarantined') : null),
          el('div', { class: 'meta' }, `${p.node} · ${p.ips.join(', ')}${q ? ` · ${q.reason}` : ''}`),
          historyButton(p.pod, isQ)),
        action),
      state.openForm === p.pod ? quarantineForm(p.pod) : null,
    ];
  }));
}

// Opens the pod's flow history: the 24 h before its latest quarantine, else the last 24 h.
function historyButton(pod, quarantined) {
  return el('button', { class: 'link', 'data-action': 'history', 'data-pod': pod, onclick: () => { state.history = null; select({ type: 'history', id: pod }); } },
    quarantined ? 'what it talked to before its quarantine' : 'its last 24 h of flows');
}

const DAY_NANOS = 24 * 3600 * 1e9;

// The pod's flows from the controller's flow history (on disk, across restarts): the 24 h
// before its latest quarantine there, else the last 24 h. A controller that keeps no history
// answers from the records it holds in memory, and the panel says so.
async function loadHistory(pod) {
  const base = { pod, history: 'true' };
  let fromMemory = false;
  const get = async (params) => {
    try {
      return await fetchFlows(fromMemory ? params : { ...base, ...params });
    } catch (e) {
      if (!fromMemory && /keeps no flow history/.test(e.message)) {
        fromMemory = true;
        return fetchFlows(params);
      }
      throw e;
    }
  };
  const latest = await get({ pod, verdict: 'quarantined', limit: '1' });
  const quarantinedAt = latest.length ? latest[0].time_unix_nanos : null;
  const until = quarantinedAt ?? Date.now() * 1e6;
  const since = Math.max(0, until - DAY_NANOS);
  const params = { pod, since: String(Math.floor(since)), limit: fromMemory ? '1000' : '10000' };
  // Nanoseconds since 1970 do not fit a double exactly (they come back rounded to 256 ns):
  // a microsecond more keeps the quarantine itself inside the window.
  if (quarantinedAt !== null) params.until = String(quarantinedAt + 1000);
  const flows = await get(params);
  return { pod, quarantinedAt, since, until, flows, fromMemory };
}

// Who the pod talked to in the window: each peer with its ports and verdict counts.
function peersOf(pod, flows) {
  const by = new Map();
  for (const f of flows) {
    if (!f.src) continue;
    const peer = f.src_pod === pod ? (f.dst_pod || withNames(f, f.dst, true)) : (f.src_pod || withNames(f, f.src, true));
    const way = f.src_pod === pod ? '→' : '←';
    const key = `${way} ${peer}`;
    const r = by.get(key) || { way, peer, ports: new Set(), allowed: 0, denied: 0, audit: 0 };
    r.ports.add(`${f.dst_port}/${proto(f.protocol)}`);
    if (f.verdict === 'allowed') r.allowed += 1;
    else if (f.verdict === 'denied') r.denied += 1;
    else r.audit += 1;
    by.set(key, r);
  }
  return [...by.values()].sort((a, b) => (b.allowed + b.denied + b.audit) - (a.allowed + a.denied + a.audit));
}

function historyPanel(h) {
  const window = h.quarantinedAt !== null
    ? `the 24 h before its quarantine at ${clock(h.quarantinedAt)}`
    : 'the last 24 h (no quarantine of it in the history)';
  const peers = peersOf(h.pod, h.flows);
  return [
    el('h2', {}, `${h.pod}: flow history`),
    el('div', { class: 'muted' }, `${window}; ${h.fromMemory ? 'from the records the controller holds in memory (it keeps no flow history)' : 'from the controller\'s flow history'}`),
    el('div', { class: 'row' }, el('button', { class: 'ghost', 'data-action': 'refresh-history', onclick: () => { state.history = null; refreshPanel(true); } }, 'Refresh')),
    el('div', { class: 'counts' },
      el('div', { class: 'count' }, el('b', {}, peers.length), 'peers'),
      el('div', { class: 'count allowed' }, el('b', {}, h.flows.filter((f) => f.verdict === 'allowed').length), 'allowed'),
      el('div', { class: 'count denied' }, el('b', {}, h.flows.filter((f) => f.verdict === 'denied').length), 'denied')),
    ...section('Peers', peers.length
      ? el('ul', { class: 'history-peers' }, peers.map((r) => el('li', { 'data-peer': r.peer },
        `${r.way} ${r.peer}`, ' ', el('span', { class: 'muted' }, [...r.ports].join(', ')), ' ',
        r.allowed ? el('span', { class: 'badge allowed' }, `${r.allowed} allowed`) : null, ' ',
        r.denied ? el('span', { class: 'badge denied' }, `${r.denied} denied`) : null)))
      : el('p', { class: 'hint' }, 'No connection in this window.')),
    ...section('Flows, newest first', el('div', { class: 'flows-box' }, flowsTable(h.flows))),
  ];
}

// The rules that decided these flows, with how often (most frequent first).
function ruleSummary(flows) {
  const by = new Map();
  for (const f of flows) {
    if (!f.src) continue;
    const r = by.get(f.rule) || { n: 0, d: f.decided_by };
    r.n += 1;
    by.set(f.rule, r);
  }
  if (!by.size) return el('p', { class: 'hint' }, 'No recent flows.');
  return el('ul', { class: 'rules' }, [...by].sort((a, b) => b[1].n - a[1].n).map(([text, r]) =>
    el('li', {}, ruleView(r.d, text), el('span', { class: 'muted' }, `×${r.n}`))));
}

// An address of no pod, with the DNS names its endpoint had learned for it when it is the peer.
function withNames(f, addr, isPeer) {
  return isPeer && f.peer_names && f.peer_names.length ? `${addr} (${f.peer_names.join(', ')})` : addr;
}

function flowsTable(flows) {
  if (!flows.length) return el('p', { class: 'hint' }, 'No recent flows match.');
  return el('table', { class: 'flows' },
    el('thead', {}, el('tr', {}, el('th', {}, 'time'), el('th', {}, 'connection'), el('th', {}, 'verdict · decided by'))),
    el('tbody', {}, flows.map((f) => {
      if (!f.src) {
        return el('tr', {}, el('td', { class: 'time' }, clock(f.time_unix_nanos)),
          el('td', { class: 'path' }, f.endpoint),
          el('td', {}, el('span', { class: `badge ${f.verdict}` }, f.verdict), ' ', el('span', { class: 'muted' }, f.reason), el('div', { class: 'rule' }, f.rule)));
      }
      const from = f.src_pod || withNames(f, f.src, f.direction === 'ingress');
      const to = f.dst_pod || withNames(f, f.dst, f.direction !== 'ingress');
      return el('tr', {},
        el('td', { class: 'time' }, clock(f.time_unix_nanos)),
        el('td', { class: 'path' }, el('div', {}, from), el('div', {}, `→ ${to}:${f.dst_port}/${proto(f.protocol)}`),
          el('div', { class: 'muted' }, `${f.node}, at ${f.endpoint}'s ${f.direction}`)),
        el('td', {}, el('span', { class: `badge ${f.verdict}` }, f.verdict), el('div', {}, ruleView(f.decided_by, f.rule))));
    })));
}

async function fetchFlows(params) {
  const q = new URLSearchParams({ limit: '40', ...params });
  const res = await api(`/api/flows?${q}`);
  if (!res.ok) throw new Error((await res.json().catch(() => ({}))).error || `HTTP ${res.status}`);
  return res.json();
}

function overview() {
  const m = state.map;
  const body = [
    el('h2', {}, 'Service map'),
    el('p', { class: 'hint' }, 'Who talks to whom, live from every agent\'s flows. Click a connection to see its recent flows and the rule that decided each; click a workload to see its pods and quarantine one.'),
    actionsNote(),
    ...section('Legend', legend()),
  ];
  if (m && m.nodes.length) {
    // The map's workloads as a list too: reachable from the keyboard, and searchable.
    const byNs = new Map();
    for (const n of m.nodes) {
      const ns = n.cluster ? `${n.namespace} (peer cluster ${n.cluster})` : n.namespace || '(outside the cluster)';
      byNs.set(ns, [...(byNs.get(ns) || []), n]);
    }
    body.push(...section('Workloads', el('dl', { class: 'workloads' }, [...byNs].map(([ns, list]) => [
      el('dt', {}, ns),
      el('dd', {}, list.map((n) => el('button', {
        class: `link${n.quarantined ? ' quarantined' : ''}`, 'data-workload': n.id,
        onclick: () => { cy.elements().unselect(); cy.getElementById(n.id).select(); select({ type: 'node', id: n.id }); },
      }, n.kind === 'workload' ? shortName(n.workload) : n.workload))),
    ]))));
  }
  if (m && m.staged && m.staged.length) {
    // What each staged policy would deny if it were enforced (`bulkhead policy promote`).
    body.push(...section('Staged policies: would deny', el('ul', { class: 'staged' }, m.staged.map((p) => el('li', {},
      el('button', { class: 'link', 'data-staged': p.policy, onclick: () => select({ type: 'staged', id: p.policy }) }, p.policy),
      ' ', el('span', { class: 'badge audit-would-deny' }, `${p.flows} flow${p.flows === 1 ? '' : 's'} on ${p.edges.length} edge${p.edges.length === 1 ? '' : 's'}`))))));
  }
  if (m && m.quarantines.length) {
    body.push(...section('Quarantined pods', el('ul', { class: 'pods' }, m.quarantines.map((q) => el('li', { 'data-pod': q.pod },
      el('div', {}, el('div', { class: 'name' }, q.pod, ' ', el('span', { class: 'badge quarantined' }, 'quarantined')),
        el('div', { class: 'meta' }, `${q.reason} · by ${q.actor} · since ${q.created_at}${q.expires_at ? ` · until ${q.expires_at}` : ''}${Object.keys(q.enforced_at).length ? ` · enforced on ${Object.keys(q.enforced_at).length} node(s), ${q.connections_cut} connection(s) cut` : ''}`),
        historyButton(q.pod, true)),
      el('button', { class: 'primary', 'data-action': 'release', 'data-pod': q.pod, disabled: !m.actions.enabled, onclick: (ev) => doRelease(q.pod, ev.currentTarget) }, 'Release'))))));
  }
  if (m && m.agents.length) {
    body.push(...section('Nodes', el('dl', { class: 'kv' }, m.agents.map((a) => [
      el('dt', {}, a.node),
      el('dd', {}, a.connected ? `agent connected, version ${a.realized}/${a.version} realized` : 'agent not connected'),
    ]))));
  }
  return body;
}

// Replaces the panel's content only when what it shows changed (a poll that brings nothing
// new leaves the text, its selection and its scroll position alone).
function paint(key, rebuild, children) {
  const k = JSON.stringify([key, state.openForm, [...state.verdicts], state.map.actions]);
  if (!rebuild && k === state.panelKey) return;
  state.panelKey = k;
  $('#panel-body').replaceChildren(...children.filter(Boolean));
}

async function refreshPanel(rebuild) {
  const sel = state.selection;
  const m = state.map;
  if (!m) return;
  if (!sel) {
    paint(['overview', m.nodes.map((n) => [n.id, n.quarantined]), m.quarantines, m.agents, m.staged], rebuild, overview());
    return;
  }
  const seq = ++state.flowsSeq;
  if (sel.type === 'edge') {
    const e = cy.getElementById(sel.id);
    if (e.empty()) { select(null); return; }
    const d = e.data();
    const verdict = d.verdict === 'audit' ? 'audit-would-deny' : d.verdict;
    const graphEdges = m.edges.filter((x) => x.src === d.source && x.dst === d.target);
    const edge = graphEdges.length ? graphEdges.reduce((a, x) => {
      a.allowed += x.allowed; a.denied += x.denied; a.audit_would_deny += x.audit_would_deny; a.bytes += x.bytes;
      a.first_seen_unix_nanos = Math.min(a.first_seen_unix_nanos, x.first_seen_unix_nanos);
      a.last_seen_unix_nanos = Math.max(a.last_seen_unix_nanos, x.last_seen_unix_nanos);
      return a;
    }, { allowed: 0, denied: 0, audit_would_deny: 0, bytes: 0, first_seen_unix_nanos: Infinity, last_seen_unix_nanos: 0 }) : null;
    const flows = await fetchFlows({ src: d.source, dst: d.target, verdict }).catch((err) => { if (!(err instanceof AuthRequired)) toast(err.message, true); return []; });
    if (seq !== state.flowsSeq) return;
    const ends = [d.source, d.target].map((id) => m.nodes.find((n) => n.id === id)).filter((n) => n && n.pods.length);
    const pods = ends.flatMap((n) => n.pods);
    paint(['edge', sel.id, edge, flows, pods, m.quarantines], rebuild, [
      el('h2', {}, `${d.source} → ${d.target}`),
      el('div', {}, el('span', { class: `badge ${verdict}` }, verdict), ' ', el('span', { class: 'muted' }, `ports ${d.label.replace(/ +×\d+$/, '')}`)),
      edge && el('div', { class: 'counts' },
        el('div', { class: 'count allowed' }, el('b', {}, edge.allowed), 'allowed'),
        el('div', { class: 'count denied' }, el('b', {}, edge.denied), 'denied'),
        el('div', { class: 'count audit' }, el('b', {}, edge.audit_would_deny), 'audit'),
        el('div', { class: 'count' }, el('b', {}, fmtBytes(edge.bytes)), 'bytes')),
      edge && el('dl', { class: 'kv' }, el('dt', {}, 'first seen'), el('dd', {}, clock(edge.first_seen_unix_nanos)), el('dt', {}, 'last seen'), el('dd', {}, clock(edge.last_seen_unix_nanos))),
      ...section('Deciding rules', ruleSummary(flows)),
      ...section('Recent flows', el('div', { class: 'flows-box' }, flowsTable(flows))),
      ...(pods.length ? section('Pods at either end', actionsNote(), el('div', { class: 'pods-box' }, podsList(pods))) : []),
    ]);
    return;
  }
  if (sel.type === 'history') {
    if (!state.history || state.history.pod !== sel.id) {
      state.history = { pod: sel.id, loading: true };
      paint(['history', sel.id, 'loading'], true, [el('h2', {}, `${sel.id}: flow history`), el('p', { class: 'hint' }, 'Reading the flow history…')]);
      try {
        // Polls go on meanwhile (and find it loading): only another selection drops the answer.
        const h = await loadHistory(sel.id);
        if (state.selection !== sel) return;
        state.history = h;
      } catch (err) {
        if (state.selection !== sel) return;
        state.history = { pod: sel.id, error: err.message };
        if (!(err instanceof AuthRequired)) toast(err.message, true);
      }
    }
    const h = state.history;
    if (h.loading) return;
    if (h.error) {
      paint(['history', sel.id, h.error], rebuild, [el('h2', {}, `${sel.id}: flow history`), el('p', { class: 'hint' }, `The history could not be read: ${h.error}`)]);
      return;
    }
    paint(['history', sel.id, h.quarantinedAt, h.flows.length, h.until], rebuild, historyPanel(h));
    return;
  }
  if (sel.type === 'staged') {
    const p = (m.staged || []).find((x) => x.policy === sel.id);
    if (!p) { select(null); return; }
    paint(['staged', p], rebuild, [
      el('h2', {}, p.policy),
      el('div', { class: 'muted' }, 'staged: enforces nothing; these connections are allowed now and would be denied once it is promoted (bulkhead policy promote)'),
      el('div', { class: 'counts' },
        el('div', { class: 'count audit' }, el('b', {}, p.flows), 'would deny'),
        el('div', { class: 'count' }, el('b', {}, p.edges.length), 'edges')),
      ...section('Connections it would deny', el('ul', { class: 'staged-edges' }, p.edges.map((e) => el('li', {},
        el('button', { class: 'link', 'data-edge': `${e.src}|${e.dst}|audit`, onclick: () => { cy.elements().unselect(); cy.getElementById(`${e.src}|${e.dst}|audit`).select(); select({ type: 'edge', id: `${e.src}|${e.dst}|audit` }); } },
          `${e.src} → ${e.dst}:${e.port}/${proto(e.protocol)}`),
        ' ', el('span', { class: 'muted' }, `×${e.flows}`))))),
    ]);
    return;
  }
  if (sel.type === 'node') {
    const n = m.nodes.find((x) => x.id === sel.id);
    if (!n) { select(null); return; }
    const params = { workload: n.id };
    const flows = await fetchFlows(params).catch((err) => { if (!(err instanceof AuthRequired)) toast(err.message, true); return []; });
    if (seq !== state.flowsSeq) return;
    const shown = flows.filter((f) => !f.src || state.verdicts.has(f.verdict === 'audit-would-deny' ? 'audit' : f.verdict));
    const edges = m.edges.filter((e) => e.src === n.id || e.dst === n.id);
    paint(['node', n, edges, shown, m.quarantines], rebuild, [
      el('h2', {}, n.kind === 'workload' ? `${n.cluster ? `${n.namespace}/` : ''}${shortName(n.workload)}` : n.workload),
      el('div', { class: 'muted' }, n.kind === 'workload' && n.cluster ? `${kindOf(n.workload)} in namespace ${n.namespace.slice(n.cluster.length + 1)} of peer cluster ${n.cluster}`
        : n.kind === 'workload' ? `${kindOf(n.workload)} in namespace ${n.namespace}`
        : n.domain ? `addresses outside the cluster that pods learned from DNS for ${n.domain}` : 'addresses of no pod in the cluster', ' ', n.quarantined ? el('span', { class: 'badge quarantined' }, 'quarantined') : null),
      el('div', { class: 'counts' },
        el('div', { class: 'count allowed' }, el('b', {}, edges.reduce((a, e) => a + e.allowed, 0)), 'allowed'),
        el('div', { class: 'count denied' }, el('b', {}, edges.reduce((a, e) => a + e.denied, 0)), 'denied'),
        el('div', { class: 'count' }, el('b', {}, edges.length), 'edges')),
      ...(n.pods.length ? section('Pods', actionsNote(), el('div', { class: 'pods-box' }, podsList(n.pods))) : []),
      ...section('Recent flows', el('div', { class: 'flows-box' }, flowsTable(shown))),
    ]);
    return;
  }
  if (sel.type === 'namespace') {
    const flows = await fetchFlows({ namespace: sel.id }).catch(() => []);
    if (seq !== state.flowsSeq) return;
    const shown = flows.filter((f) => state.verdicts.has(f.verdict === 'audit-would-deny' ? 'audit' : f.verdict));
    const workloads = m.nodes.filter((x) => x.namespace === sel.id);
    paint(['namespace', sel.id, workloads, shown], rebuild, [
      el('h2', {}, `namespace ${sel.id}`),
      el('div', { class: 'muted' }, `${workloads.length} workload(s), ${workloads.reduce((a, w) => a + w.pods.length, 0)} pod(s)`),
      ...section('Recent flows', flowsTable(shown))]);
    return;
  }
  if (sel.type === 'cluster') {
    const flows = await fetchFlows({ cluster: sel.id }).catch(() => []);
    if (seq !== state.flowsSeq) return;
    const shown = flows.filter((f) => state.verdicts.has(f.verdict === 'audit-would-deny' ? 'audit' : f.verdict));
    const workloads = m.nodes.filter((x) => x.cluster === sel.id);
    paint(['cluster', sel.id, workloads, shown], rebuild, [
      el('h2', {}, `cluster ${sel.id}`),
      el('div', { class: 'muted' }, `peer cluster: ${workloads.length} workload(s) seen in flows with this cluster`),
      ...section('Recent flows', flowsTable(shown))]);
  }
}

// ---------- polling ----------

async function tick() {
  const live = $('#live');
  const gen = state.authGen;
  try {
    const res = await api('/api/map', { cache: 'no-store' });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const map = await res.json();
    // Signed out (or in as someone else) meanwhile: this answer is not for the page any more.
    if (gen !== state.authGen) return;
    state.map = map;
    showUser(map);
    render(state.map);
    live.textContent = `live · ${new Date(state.map.time_unix_ms).toLocaleTimeString([], { hour12: false })}`;
    live.className = 'live ok';
    // Keep the panel current, but never under the user's fingers (an open quarantine form).
    if (!state.openForm) await refreshPanel(false);
  } catch (e) {
    if (e instanceof AuthRequired || gen !== state.authGen) return; // the sign-in form is up
    live.textContent = `controller unreachable (${e.message})`;
    live.className = 'live bad';
  }
}

// One polling loop at a time: a sign-in starts a new one, a 401 or a sign-out ends it.
let pollTimer = null;
let pollGen = 0;

function stopPolling() {
  pollGen += 1;
  clearTimeout(pollTimer);
  pollTimer = null;
}

function startPolling() {
  stopPolling();
  const gen = pollGen;
  const loop = async () => {
    await tick();
    if (gen === pollGen) pollTimer = setTimeout(loop, POLL_MS);
  };
  refreshPanel(true);
  loop();
}

startPolling();
