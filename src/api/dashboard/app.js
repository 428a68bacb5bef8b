// The opmesh dashboard. Plain JavaScript, no dependencies: it reads the public api
// (/v1/cluster, /v1/routes, /v1/metrics, /v1/failures) and follows the node's live events
// (/v1/events: metrics:collected about every second, operation:failure as they happen).
// If the event stream is down it polls /v1/metrics every second until it is back.
// When the node checks API tokens and answers 401, the page asks for a token and keeps it
// in this tab only (sessionStorage); it is sent as `Authorization: Bearer` with every
// request, the event stream included (read with fetch, since EventSource cannot send
// headers).
//
// Every figure has a stable id or data-* attribute (data-node-id, data-route-type,
// data-op-type, data-failure-id, #throughput, #completed...) for tests and scripts.
'use strict';

const MAX_FAILURES = 100;
const SPARK_POINTS = 60;
const SLOW_REFRESH_MS = 3000;

const state = {
  config: { node: null, jaeger_ui_url: null },
  metrics: null,
  cluster: null,
  routes: null,
  failures: [], // newest first
  failureIds: new Set(),
  throughput: [], // the last SPARK_POINTS samples
  stream: null, // the AbortController of the open event stream
  pollTimer: null,
  renderTimer: null,
};

// ---------------------------------------------------------------------------------------
// Helpers

const $ = (id) => document.getElementById(id);

/** Builds an element: el('td', {class: 'num', dataset: {field: 'p50'}}, 'text', child). */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function setText(id, text) {
  const e = $(id);
  if (e && e.textContent !== String(text)) e.textContent = text;
}

const intFmt = new Intl.NumberFormat('en-US');
const int = (n) => intFmt.format(Math.round(n || 0));

function rate(n) {
  if (!n) return '0';
  if (n < 10) return n.toFixed(2);
  if (n < 100) return n.toFixed(1);
  return int(n);
}

function percent(x) {
  return (x * 100).toFixed(x >= 0.9995 || x === 0 ? 0 : 1) + ' %';
}

function micros(us) {
  if (us === null || us === undefined) return '–';
  if (us < 1000) return us + ' µs';
  if (us < 1e6) return (us / 1000).toFixed(us < 10_000 ? 2 : 1) + ' ms';
  return (us / 1e6).toFixed(2) + ' s';
}

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return s + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
  if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
  return Math.floor(s / 86400) + ' d ' + Math.floor((s % 86400) / 3600) + ' h';
}

function clock(ms) {
  const d = new Date(ms);
  const p = (n, w = 2) => String(n).padStart(w, '0');
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

function replaceRows(tbody, rows, emptyText, colspan) {
  tbody.replaceChildren(...(rows.length ? rows
    : [el('tr', { class: 'empty' }, el('td', { colspan }, emptyText))]));
}

const TOKEN_KEY = 'opmesh-token';

function headers(accept) {
  const h = { accept };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h.authorization = `Bearer ${token}`;
  return h;
}

/**
 * The node refused a request sent with `sent` (this tab's token then, or none): ask for a
 * token, unless the tab has had another one since (an answer to an older request).
 */
function askForToken(status, sent) {
  if (sessionStorage.getItem(TOKEN_KEY) !== sent) return;
  const form = $('token-form');
  if (!form.hidden) return;
  form.hidden = false;
  showError(status === 403
    ? 'the token of this tab may not read this node: give a token with scope read'
    : 'this node asks for an API token');
  $('token-input').focus();
}

async function getJson(path) {
  const sent = sessionStorage.getItem(TOKEN_KEY);
  const r = await fetch(path, { headers: headers('application/json'), cache: 'no-store' });
  if (r.status === 401 || r.status === 403) askForToken(r.status, sent);
  if (!r.ok) throw new Error(`${path} answered ${r.status}`);
  return r.json();
}

function showError(message) {
  const b = $('error');
  b.hidden = !message;
  b.textContent = message || '';
}

// ---------------------------------------------------------------------------------------
// Rendering

function renderHeadline() {
  const m = state.metrics;
  if (!m) return;
  const t = $('throughput');
  t.dataset.value = m.throughput;
  setText('throughput', rate(m.throughput));
  const c = $('completed');
  c.dataset.value = m.completedOperations;
  setText('completed', int(m.completedOperations));
  setText('succeeded', int(m.succeededOperations));
  setText('failed', int(m.failedOperations));
  setText('expired', int(m.expiredOperations));
  setText('rejected', int(m.rejectedOperations));
  setText('success-rate', m.completedOperations ? percent(m.successRate) : '–');
  const cache = m.cacheStats || {};
  const lookups = (cache.hits || 0) + (cache.misses || 0);
  setText('cache-hit-rate', lookups ? percent(m.cacheHitRate) : '–');
  $('cache-hit-rate').title = lookups ? `${int(lookups)} lookups`
    : 'no operation with an idempotency key yet';
  setText('cache-hits', int(cache.hits));
  setText('cache-joined', int(cache.joined));
  setText('in-flight', int(m.inFlightOperations));
  setText('running', int(m.activeOperations));
  setText('queued', int(m.queuedOperations));
  const l = m.latency || {};
  setText('latency-p50', l.count ? micros(l.p50_us) : '–');
  setText('latency-p95', l.count ? micros(l.p95_us) : '–');
  setText('latency-p99', l.count ? micros(l.p99_us) : '–');
  setText('uptime', duration(m.uptimeSeconds || 0));
  renderSpark();
}

function renderSpark() {
  const pts = state.throughput;
  const svg = $('throughput-chart');
  const [line, area] = [svg.querySelector('.line'), svg.querySelector('.area')];
  if (pts.length < 2) {
    line.setAttribute('d', '');
    area.setAttribute('d', '');
    return;
  }
  // The samples span the whole width: the last minute, or since the page opened.
  const max = Math.max(...pts, 1);
  const step = 300 / (pts.length - 1);
  const xy = pts.map((v, i) => [i * step, 46 - (v / max) * 42]);
  const d = xy.map(([x, y], i) => `${i ? 'L' : 'M'}${x.toFixed(1)},${y.toFixed(1)}`).join('');
  line.setAttribute('d', d);
  area.setAttribute('d', `${d}L300,48L0,48Z`);
}

/** A type's circuit breaker: quiet while closed, loud while open or half-open. */
function breakerBadge(state) {
  switch (state) {
    case 'open':
      return el('span', { class: 'badge breaker-open', title: 'submissions refused (503 circuit_open)' }, 'open');
    case 'half_open':
      return el('span', { class: 'badge breaker-half', title: 'trial operations go through' }, 'half-open');
    case 'closed':
      return el('span', { class: 'badge quiet' }, 'closed');
    default:
      return el('span', { class: 'dim' }, '–');
  }
}

function renderTypes() {
  const m = state.metrics;
  if (!m) return;
  const types = Object.entries(m.perType || {});
  const deepest = Math.max(1, ...types.map(([, s]) => s.queued));
  const rows = types.map(([name, s]) => {
    const l = s.latency || {};
    const lat = (v) => (l.count ? micros(v) : '–');
    return el('tr', { dataset: { opType: name } },
      el('td', { class: 'mono' }, name),
      el('td', { class: 'num', dataset: { field: 'succeeded' } }, int(s.succeeded)),
      el('td', { class: 'num' + (s.failed ? ' bad' : ''), dataset: { field: 'failed' } }, int(s.failed)),
      el('td', { class: 'num' + (s.expired ? ' warn' : ''), dataset: { field: 'expired' } }, int(s.expired)),
      el('td', { class: 'num', dataset: { field: 'retries' } }, int(s.retries)),
      el('td', {
        class: 'num' + (s.running >= s.maxConcurrent && s.queued ? ' warn' : ''),
        dataset: { field: 'running', value: s.running },
        title: s.ownSlots ? 'slots of its own (types.<type>.max_concurrent)'
          : 'its share of the shared slots (engine.type_share_percent)',
      }, `${int(s.running)} / ${int(s.maxConcurrent)}`),
      el('td', { class: 'queue-col', dataset: { field: 'queued', value: s.queued } },
        el('div', { class: 'queue' },
          el('div', { class: 'bar' }, el('span', { style: `width:${(100 * s.queued) / deepest}%` })),
          el('span', { class: 'num' }, int(s.queued)))),
      el('td', { class: 'num', dataset: { field: 'p50' } }, lat(l.p50_us)),
      el('td', { class: 'num', dataset: { field: 'p95' } }, lat(l.p95_us)),
      el('td', { class: 'num', dataset: { field: 'p99' } }, lat(l.p99_us)),
      el('td', { dataset: { field: 'breaker', state: s.breaker || 'none' } }, breakerBadge(s.breaker)));
  });
  replaceRows($('types'), rows, 'no operation types', 11);
}

function renderCluster() {
  const c = state.cluster;
  if (!c) return;
  setText('leader', c.leader || 'none');
  $('leader').classList.toggle('bad', !c.leader);
  const up = c.nodes.filter((n) => n.status === 'up').length;
  const summary = c.raft_state === 'single'
    ? 'single node'
    : `${up} of ${c.nodes.length} up · term ${c.term} · this node is ${c.raft_state}`;
  setText('cluster-summary', summary);
  const rows = c.nodes.map((n) => {
    const leader = n.id === c.leader;
    return el('tr', { dataset: { nodeId: n.id, status: n.status, role: n.role, leader: String(leader) } },
      el('td', {},
        el('span', { class: `dot ${n.status}`, title: n.status }),
        el('span', { class: 'mono' }, n.id),
        leader ? el('span', { class: 'badge', title: 'Raft leader' }, 'leader') : null,
        n.id === state.config.node ? el('span', { class: 'badge quiet' }, 'this node') : null),
      el('td', { class: 'status ' + n.status }, n.status),
      el('td', {}, n.role),
      el('td', { class: 'num' }, int(n.load)),
      el('td', { class: 'mono dim' }, n.http_addr || (n.link === 'self' ? location.host : '–')),
      el('td', { class: 'dim' }, n.link + (n.last_heard_ms != null && n.link !== 'self'
        ? ` · ${n.last_heard_ms} ms ago` : '')));
  });
  replaceRows($('nodes'), rows, 'no nodes', 6);
}

function renderRoutes() {
  const r = state.routes;
  if (!r) return;
  setText('routes-version', `version ${r.version}`);
  const rows = Object.entries(r.routes).map(([type, route]) =>
    el('tr', { dataset: { routeType: type, strategy: route.strategy } },
      el('td', { class: 'mono' }, type),
      el('td', {}, el('span', { class: 'tag' }, route.strategy.replace('_', ' '))),
      el('td', { class: 'mono' }, route.nodes.length ? route.nodes.join(', ')
        : el('span', { class: 'dim' }, 'every node serving it'))));
  replaceRows($('routes'), rows,
    'no explicit routes: each type goes to the nodes that serve it', 3);
}

function traceLink(f, content) {
  const base = state.config.jaeger_ui_url;
  if (!base || !f.trace_id) return content;
  return el('a', {
    class: 'trace-link', href: `${base}/trace/${f.trace_id}`, target: '_blank', rel: 'noopener',
    title: `trace ${f.trace_id} in Jaeger`,
  }, content);
}

function renderFailures() {
  const rows = state.failures.map((f) =>
    el('tr', { dataset: { failureId: f.id, status: f.status, traceId: f.trace_id || null } },
      el('td', { class: 'mono dim' }, clock(f.timestamp)),
      el('td', { class: 'mono' }, traceLink(f, f.id)),
      el('td', { class: 'mono' }, f.type),
      el('td', { class: 'status ' + f.status }, f.status),
      el('td', { class: 'error', title: f.error || '' }, f.error || '–'),
      el('td', { class: 'mono dim' }, f.executed_by || f.node),
      el('td', { class: 'num' }, micros(f.duration_us))));
  replaceRows($('failures'), rows, 'no failed operations', 7);
  const shown = state.failures.length;
  setText('failures-summary', shown ? `${shown} shown, newest first` : '');
}

function render() {
  state.renderTimer = null;
  renderHeadline();
  renderTypes();
  renderCluster();
  renderRoutes();
  renderFailures();
}

/** Renders soon, at most a few times a second however fast events come. */
function scheduleRender() {
  if (state.renderTimer === null) state.renderTimer = setTimeout(render, 100);
}

// ---------------------------------------------------------------------------------------
// Data

function takeMetrics(m) {
  state.metrics = m;
  if (m.cluster) state.cluster = m.cluster;
  state.throughput.push(m.throughput || 0);
  if (state.throughput.length > SPARK_POINTS) state.throughput.shift();
  scheduleRender();
}

/** Adds failures (from /v1/failures or the stream), keeping the newest MAX_FAILURES. */
function takeFailures(list) {
  let added = false;
  for (const f of list) {
    if (state.failureIds.has(f.id)) continue;
    state.failureIds.add(f.id);
    state.failures.push(f);
    added = true;
  }
  if (!added) return;
  state.failures.sort((a, b) => b.timestamp - a.timestamp);
  for (const f of state.failures.splice(MAX_FAILURES)) state.failureIds.delete(f.id);
  scheduleRender();
}

function setStreamState(s, text) {
  const e = $('stream-status');
  e.dataset.state = s;
  e.textContent = text;
}

async function pollMetrics() {
  try {
    takeMetrics(await getJson('/v1/metrics'));
    showError(null);
  } catch (e) {
    showError(`cannot reach the node: ${e.message}`);
  }
}

function startPolling() {
  if (state.pollTimer !== null) return;
  setStreamState('polling', 'polling');
  state.pollTimer = setInterval(pollMetrics, 1000);
}

function stopPolling() {
  clearInterval(state.pollTimer);
  state.pollTimer = null;
}

const STREAM_RETRY_MS = 2000;

function onEvent(name, data) {
  if (name === 'metrics:collected') takeMetrics(JSON.parse(data));
  else if (name === 'operation:failure') takeFailures([JSON.parse(data)]);
  else if (name === 'events:dropped') {
    const n = JSON.parse(data).dropped;
    setText('failures-summary', `this page missed ${int(n)} events; reloading the list`);
    getJson('/v1/failures').then((r) => takeFailures(r.failures)).catch(() => {});
  }
}

/** Hands each complete server-sent event in `buf` to onEvent; returns what is left. */
function takeFrames(buf) {
  let end;
  while ((end = buf.indexOf('\n\n')) >= 0) {
    const frame = buf.slice(0, end);
    buf = buf.slice(end + 2);
    let name = 'message';
    const data = [];
    for (const line of frame.split('\n')) {
      if (line.startsWith('event:')) name = line.slice(6).trim();
      else if (line.startsWith('data:')) data.push(line.slice(5).trimStart());
    }
    if (data.length) onEvent(name, data.join('\n'));
  }
  return buf;
}

/** Follows /v1/events; when it ends or fails, polls until it opens again. */
async function openStream() {
  const abort = new AbortController();
  state.stream = abort;
  const sent = sessionStorage.getItem(TOKEN_KEY);
  try {
    const r = await fetch('/v1/events?types=metrics:collected,operation:failure', {
      headers: headers('text/event-stream'), cache: 'no-store', signal: abort.signal,
    });
    if (r.status === 401 || r.status === 403) askForToken(r.status, sent);
    if (!r.ok || !r.body) throw new Error(`/v1/events answered ${r.status}`);
    stopPolling();
    setStreamState('live', 'live');
    showError(null);
    const reader = r.body.getReader();
    const text = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf = takeFrames(buf + text.decode(value, { stream: true }));
    }
  } catch (e) {
    if (abort.signal.aborted) return;
  }
  if (state.stream !== abort) return;
  startPolling();
  setTimeout(() => { if (state.stream === abort) openStream(); }, STREAM_RETRY_MS);
}

function useToken(event) {
  event.preventDefault();
  const token = $('token-input').value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $('token-input').value = '';
  $('token-form').hidden = true;
  showError(null);
  if (state.stream) state.stream.abort();
  start();
}

async function refreshSlow() {
  try {
    const [cluster, routes] = await Promise.all([getJson('/v1/cluster'), getJson('/v1/routes')]);
    // A clustered node's metrics events carry the cluster too; a lone node's do not.
    state.cluster = cluster;
    state.routes = routes;
    scheduleRender();
  } catch (e) {
    showError(`cannot reach the node: ${e.message}`);
  }
}

async function start() {
  openStream();
  try {
    state.config = await getJson('/v1/dashboard/config');
  } catch (e) {
    showError(`cannot reach the node: ${e.message}`);
  }
  setText('node-id', state.config.node || '?');
  document.title = `opmesh · ${state.config.node || ''}`;
  setText('trace-note', state.config.jaeger_ui_url
    ? `operation ids link to their traces in ${state.config.jaeger_ui_url}`
    : 'set telemetry.jaeger_ui_url to link operations to their traces');
  await Promise.all([
    pollMetrics(),
    refreshSlow(),
    getJson('/v1/failures').then((r) => takeFailures(r.failures)).catch(() => {}),
  ]);
  render();
  if (state.slowTimer === undefined) state.slowTimer = setInterval(refreshSlow, SLOW_REFRESH_MS);
}

$('token-form').addEventListener('submit', useToken);
start();
