// The operator console: four pages behind hash routes, each drawn from Baton's public FHIR
// API with the operator's token. `#/` signs in, `#/subscriptions` lists the subscriptions,
// `#/subscription/ID` shows one with its delivery ledger and a live tail, `#/board` shows
// the Tasks of one owner or role queue by status, live.

import uPlot from './vendor/uPlot.esm.js';
import {
  ApiError, api, endpointHost, filtersOf, liveSubscription, nextPage, perMinute,
  readAttempt, readNotification, readStatus, resources, session, topicOf,
} from './fhir.js';

/** How often the tables are read again, in milliseconds. */
const REFRESH_MS = 3000;
/** The minutes the sparklines and the ledger chart cover. */
const SPARK_MINUTES = 30;

const main = document.getElementById('main');
const announce = (text) => { document.getElementById('announce').textContent = text; };

/** Builds an element: `h('td', { class: 'number' }, '3')`. Text is always text, never HTML. */
function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) element.addEventListener(name.slice(2), value);
    else if (name === 'dataset') Object.assign(element.dataset, value);
    else element.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

const time = (instant) => (instant ? new Date(instant).toLocaleTimeString() : '');
const dateTime = (instant) => (instant ? new Date(instant).toLocaleString() : '');
const statusBadge = (status) => h('span', { class: `status status-${status}` }, status);

function problem(error) {
  if (error instanceof ApiError && error.status === 401) {
    session.signOut();
    location.hash = '#/';
    return h('p', { class: 'problem', role: 'alert' }, 'The token was refused (401); sign in again.');
  }
  return h('p', { class: 'problem', role: 'alert' }, String(error.message || error));
}

/** What the page now showing must undo when the operator leaves it (timers, sockets). */
let leave = () => {};

/** Calls `work` now and every REFRESH_MS until the page is left; returns the stop function. */
function every(work) {
  let timer = null;
  let stopped = false;
  const run = async () => {
    await work();
    if (!stopped) timer = setTimeout(run, REFRESH_MS);
  };
  run();
  return () => { stopped = true; clearTimeout(timer); };
}

// ---------------------------------------------------------------- sign in

function signInPage() {
  const input = h('textarea', {
    id: 'token', name: 'token', required: true, autocomplete: 'off', spellcheck: 'false',
    'aria-describedby': 'token-hint',
  });
  const message = h('p', { id: 'sign-in-problem', role: 'alert' });
  const form = h('form', { class: 'stack', id: 'sign-in', method: 'post' },
    h('div', {},
      h('label', { for: 'token' }, 'Access token'),
      h('p', { class: 'hint', id: 'token-hint' },
        'A bearer token for this server (for example from `baton token --role admin`). ',
        'It is kept in this tab only, and sent only to this server\'s FHIR API.'),
      input),
    h('div', {}, h('button', { type: 'submit' }, 'Sign in')),
    message);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    session.signIn(input.value.trim());
    try {
      // Any authenticated read proves the token; every role may search its subscriptions.
      await api('/Subscription?_count=1');
      location.hash = '#/subscriptions';
    } catch (error) {
      session.signOut();
      message.textContent = `Sign-in failed: ${error.message}`;
      message.className = 'problem';
    }
  });
  main.replaceChildren(h('h1', {}, 'Sign in'), form);
  input.focus();
}

// ---------------------------------------------------------------- subscriptions table

/** A sparkline of delivered (and failed) attempts per minute, drawn by uPlot. */
function sparkline(target, data, label) {
  const plot = new uPlot({
    width: 140, height: 32, class: 'spark',
    legend: { show: false }, cursor: { show: false }, select: { show: false },
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max)] } },
    axes: [{ show: false }, { show: false }],
    series: [{}, { stroke: '#116329', width: 1.5 }, { stroke: '#a40e26', width: 1.5 }],
  }, data, target);
  plot.root.setAttribute('role', 'img');
  plot.root.setAttribute('aria-label', label);
  return plot;
}

function sparkLabel(data) {
  const delivered = data[1].reduce((a, b) => a + b, 0);
  const failed = data[2].reduce((a, b) => a + b, 0);
  return `${delivered} delivered and ${failed} failed attempts in the last ${SPARK_MINUTES} minutes`;
}

/** How far back each refresh of the table's ledger reads again, in milliseconds: attempts
 * can be written a little out of `recorded` order (the audit queue, other nodes). */
const LEDGER_OVERLAP_MS = 10_000;
/** The most pages of attempts one refresh of the table reads; the rest waits for the next. */
const LEDGER_PAGES = 5;

/**
 * The delivery attempts per minute of every subscription in the table, kept up to date with
 * ONE AuditEvent search per refresh for all of them (`entity` lists them, comma-separated)
 * rather than one per row: the first reads the sparkline window, each later one only what
 * was recorded since the newest attempt already counted (less a short overlap, whose
 * attempts are told apart by id).
 */
class LedgerTally {
  constructor(minutes) {
    this.minutes = minutes;
    this.forget([]);
  }

  /** Starts over for these subscriptions. */
  forget(ids) {
    this.ids = new Set(ids);
    /** Subscription id → minute (ms) → [delivered, failed]. */
    this.counts = new Map();
    /** The newest `recorded` counted, and the ids of the attempts counted since the overlap. */
    this.newest = null;
    this.recent = new Map();
  }

  /** Reads what is new for `ids` (subscription ids). */
  async refresh(ids) {
    if (ids.some((id) => !this.ids.has(id))) this.forget(ids);
    this.ids = new Set(ids);
    if (ids.length === 0) return;
    const windowStart = Date.now() - this.minutes * 60_000;
    const from = this.newest === null
      ? windowStart
      : Math.max(windowStart, Date.parse(this.newest) - LEDGER_OVERLAP_MS);
    let next = `/AuditEvent?${new URLSearchParams({
      entity: ids.map((id) => `Subscription/${id}`).join(','),
      type: 'transmit',
      date: `ge${new Date(from).toISOString()}`,
      _sort: 'date',
      _count: '1000',
    })}`;
    for (let page = 0; next && page < LEDGER_PAGES; page += 1) {
      const bundle = await api(next);
      for (const event of resources(bundle)) this.count(event);
      next = nextPage(bundle);
    }
    this.forgetBefore(windowStart);
  }

  count(event) {
    if (this.recent.has(event.id)) return;
    const attempt = readAttempt(event);
    const subscription = (event.entity?.[0]?.what?.reference || '').split('/').pop();
    const at = Date.parse(attempt.recorded);
    this.recent.set(attempt.id, at);
    if (this.newest === null || attempt.recorded > this.newest) this.newest = attempt.recorded;
    const minute = Math.floor(at / 60_000) * 60_000;
    if (!this.counts.has(subscription)) this.counts.set(subscription, new Map());
    const perMinute = this.counts.get(subscription);
    const slot = perMinute.get(minute) || [0, 0];
    slot[attempt.ok ? 0 : 1] += 1;
    perMinute.set(minute, slot);
  }

  forgetBefore(windowStart) {
    const overlap = this.newest === null ? 0 : Date.parse(this.newest) - LEDGER_OVERLAP_MS;
    for (const [id, at] of this.recent) if (at < overlap) this.recent.delete(id);
    for (const perMinute of this.counts.values()) {
      for (const minute of perMinute.keys()) if (minute + 60_000 <= windowStart) perMinute.delete(minute);
    }
    for (const id of this.counts.keys()) if (!this.ids.has(id)) this.counts.delete(id);
  }

  /** The sparkline data of one subscription, as `perMinute` gives it. */
  data(id, now) {
    const minute = 60_000;
    const end = Math.floor(now / minute) * minute;
    const start = end - (this.minutes - 1) * minute;
    const perMinute = this.counts.get(id) || new Map();
    const xs = [];
    const delivered = [];
    const failed = [];
    for (let i = 0; i < this.minutes; i += 1) {
      const at = start + i * minute;
      const [ok, bad] = perMinute.get(at) || [0, 0];
      xs.push(at / 1000);
      delivered.push(ok);
      failed.push(bad);
    }
    return [xs, delivered, failed];
  }
}

async function attemptsSince(id, minutes, count = 1000) {
  const since = new Date(Date.now() - minutes * 60_000).toISOString();
  const query = new URLSearchParams({
    entity: `Subscription/${id}`, type: 'transmit', date: `ge${since}`, _count: String(count),
  });
  return resources(await api(`/AuditEvent?${query}`)).map(readAttempt);
}

function subscriptionsPage() {
  const updated = h('p', { class: 'updated', id: 'subscriptions-updated' });
  const body = h('tbody');
  const empty = h('p', { hidden: true }, 'No subscriptions are visible to this token.');
  const failure = h('div');
  const headings = ['Subscription', 'Topic', 'Filter', 'Channel', 'Endpoint host', 'Status',
    'Events counted', 'Delivered', 'Backlog', 'Last error', `Attempts per minute (${SPARK_MINUTES} min)`];
  const table = h('table', { id: 'subscriptions' },
    h('caption', {}, 'Subscriptions this token may see, with delivery state from $status'),
    h('thead', {}, h('tr', {}, headings.map((t) => h('th', { scope: 'col' }, t)))),
    body);
  main.replaceChildren(h('h1', {}, 'Subscriptions'), updated, failure, table, empty);

  // One row per subscription, kept across refreshes so that keyboard focus stays put.
  const rows = new Map();
  const tally = new LedgerTally(SPARK_MINUTES);
  const row = (id) => {
    if (rows.has(id)) return rows.get(id);
    const cells = Object.fromEntries(['topic', 'filter', 'channel', 'host', 'status', 'counted',
      'delivered', 'backlog', 'error', 'spark'].map((k) => [k, h('td')]));
    for (const k of ['counted', 'delivered', 'backlog']) cells[k].className = 'number';
    cells.error.className = 'error-text';
    const tr = h('tr', { dataset: { subscription: id } },
      h('th', { scope: 'row' }, h('a', { href: `#/subscription/${encodeURIComponent(id)}` }, id)),
      Object.values(cells));
    const entry = { tr, cells, plot: null };
    rows.set(id, entry);
    return entry;
  };

  const refresh = async () => {
    try {
      const [found, statuses] = await Promise.all([
        api('/Subscription?_count=100'),
        api('/Subscription/$status'),
      ]);
      const byId = new Map(resources(statuses).map(readStatus).map((s) => [s.id, s]));
      const list = resources(found);
      const seen = new Set();
      // The row before the one being placed: rows already in their place are left where they
      // are, since moving a node (even onto itself) takes the keyboard focus out of it.
      let previous = null;
      for (const subscription of list) {
        const id = subscription.id;
        seen.add(id);
        const { tr, cells } = row(id);
        const status = byId.get(id) || readStatus(null);
        cells.topic.textContent = topicOf(subscription);
        cells.filter.textContent = filtersOf(subscription).join(' & ') || '(none)';
        cells.channel.textContent = subscription.channel?.type || '';
        cells.host.textContent = endpointHost(subscription);
        cells.status.replaceChildren(statusBadge(status.status || subscription.status));
        cells.counted.textContent = status.counted ?? '';
        cells.delivered.textContent = status.delivered ?? '';
        cells.backlog.textContent = status.backlog ?? '';
        cells.error.textContent = status.error || subscription.error || '';
        const place = previous ? previous.nextSibling : body.firstChild;
        if (place !== tr) body.insertBefore(tr, place);
        previous = tr;
      }
      for (const [id, entry] of rows) {
        if (!seen.has(id)) { entry.plot?.destroy(); entry.tr.remove(); rows.delete(id); }
      }
      empty.hidden = list.length > 0;
      failure.replaceChildren();
      updated.textContent = `Updated ${time(new Date().toISOString())}; refreshed every ${REFRESH_MS / 1000} s.`;
      // The sparklines, from the delivery ledger: one search for every row (websocket
      // deliveries are not audited).
      const charted = list.filter((s) => s.channel?.type !== 'websocket').map((s) => s.id);
      let unread = null;
      try {
        await tally.refresh(charted);
      } catch (error) {
        unread = error instanceof ApiError && error.status === 403
          ? 'ledger not readable with this token' : String(error.message);
      }
      const now = Date.now();
      for (const id of charted) {
        const entry = rows.get(id);
        if (unread !== null) {
          entry.plot?.destroy();
          entry.plot = null;
          entry.cells.spark.textContent = unread;
          continue;
        }
        const data = tally.data(id, now);
        if (entry.plot) entry.plot.setData(data);
        else {
          entry.cells.spark.replaceChildren();
          entry.plot = sparkline(entry.cells.spark, data, '');
        }
        entry.plot.root.setAttribute('aria-label', sparkLabel(data));
      }
    } catch (error) {
      failure.replaceChildren(problem(error));
    }
  };
  const stop = every(refresh);
  return () => { stop(); for (const entry of rows.values()) entry.plot?.destroy(); };
}

// ---------------------------------------------------------------- live views over a websocket

/**
 * Opens a websocket subscription of the console's own (same topic and filters as asked),
 * binds a socket to it with a binding token, and hands each notification's events to
 * `onEvents`. `stop()` closes the socket and deletes the subscription.
 */
function openLive({ criteria, filters, reason, onState, onEvents }) {
  let socket = null;
  let subscriptionId = null;
  let stopped = false;
  const start = async () => {
    onState('starting');
    const created = await api('/Subscription', {
      method: 'POST', body: liveSubscription({ criteria, filters, reason }),
    });
    subscriptionId = created.id;
    if (stopped) { remove(); return; }
    const binding = await api(`/Subscription/${subscriptionId}/$get-ws-binding-token`);
    const value = (name) => {
      const p = (binding.parameter || []).find((x) => x.name === name);
      return p?.valueString ?? p?.valueUrl ?? p?.valueUri ?? '';
    };
    socket = new WebSocket(value('websocket-url'));
    socket.addEventListener('open', () => socket.send(`bind-with-token ${value('token')}`));
    socket.addEventListener('message', (message) => {
      let bundle;
      try { bundle = JSON.parse(message.data); } catch { return; }
      if (bundle.resourceType === 'OperationOutcome') {
        onState(`failed: ${bundle.issue?.[0]?.diagnostics || 'refused'}`);
        return;
      }
      const notification = readNotification(bundle);
      if (!notification) return;
      if (notification.type === 'handshake') onState('listening');
      if (notification.type === 'event-notification') onEvents(notification.events);
    });
    socket.addEventListener('close', () => { if (!stopped) onState('closed'); });
  };
  const remove = () => {
    if (subscriptionId) {
      // keepalive lets the removal finish while the page unloads.
      api(`/Subscription/${subscriptionId}`, { method: 'DELETE', keepalive: true }).catch(() => {});
      subscriptionId = null;
    }
  };
  start().catch((error) => { onState(`failed: ${error.message}`); remove(); });
  return () => {
    stopped = true;
    socket?.close(1000);
    remove();
  };
}

// ---------------------------------------------------------------- one subscription

function subscriptionPage(id) {
  const facts = h('dl', { class: 'facts', id: 'subscription-facts' });
  const failure = h('div');
  const chart = h('div', { class: 'chart', id: 'ledger-chart' });
  const ledgerBody = h('tbody');
  const more = h('button', { type: 'button', class: 'secondary', hidden: true }, 'Load older attempts');
  const ledger = h('table', { id: 'ledger' },
    h('caption', {}, 'Delivery ledger: every delivery attempt, newest first (AuditEvents of type transmit)'),
    h('thead', {}, h('tr', {}, ['Recorded', 'Kind', 'Events', 'Outcome', 'Endpoint host',
      'Duration (ms)', 'Error'].map((t) => h('th', { scope: 'col' }, t)))),
    ledgerBody);
  const tailState = h('span', { id: 'tail-state' }, 'stopped');
  const tail = h('ol', { class: 'tail', id: 'tail', 'aria-live': 'polite', 'aria-label': 'Live notifications' });
  const tailButton = h('button', { type: 'button', id: 'tail-toggle' }, 'Start live tail');
  main.replaceChildren(
    h('p', {}, h('a', { href: '#/subscriptions' }, '← All subscriptions')),
    h('h1', {}, `Subscription ${id}`), failure, facts,
    h('h2', {}, `Attempts per minute (last ${SPARK_MINUTES} minutes)`), chart,
    h('h2', {}, 'Delivery ledger'), ledger, more,
    h('h2', {}, 'Live tail'),
    h('p', { class: 'hint' },
      'The tail opens a websocket subscription of your own with this subscription\'s topic and ',
      'filters, so it shows what this subscription is told about as it happens, numbered by ',
      'the tail. It is removed when you stop the tail or leave the page; if the tab dies first, it is switched off an hour later.'),
    h('p', {}, tailButton, ' Status: ', tailState),
    tail);

  let subscription = null;
  let plot = null;
  let olderQuery = null;
  const fact = (term, value) => [h('dt', {}, term), h('dd', {}, value)];
  const ledgerRow = (a) => h('tr', { dataset: { attempt: a.id } },
    h('td', {}, dateTime(a.recorded)), h('td', {}, a.kind), h('td', {}, a.events),
    h('td', { class: a.ok ? 'outcome-success' : 'outcome-failure' }, a.ok ? 'delivered' : 'failed'),
    h('td', {}, a.host), h('td', { class: 'number' }, a.durationMs),
    h('td', { class: 'error-text' }, a.error));

  const refresh = async () => {
    try {
      const [found, statusBundle] = await Promise.all([
        api(`/Subscription/${encodeURIComponent(id)}`),
        api(`/Subscription/${encodeURIComponent(id)}/$status`),
      ]);
      subscription = found;
      const status = readStatus(resources(statusBundle)[0]);
      facts.replaceChildren(...[
        fact('Topic', topicOf(found)),
        fact('Filter', filtersOf(found).join(' & ') || '(none)'),
        fact('Channel', found.channel?.type || ''),
        fact('Endpoint host', endpointHost(found) || '(none)'),
        fact('Status', statusBadge(status.status)),
        fact('Events counted', status.counted ?? ''),
        fact('Events delivered', status.delivered ?? ''),
        fact('Backlog', status.backlog ?? ''),
        fact('Last error', h('span', { id: 'last-error', class: 'error-text' }, status.error || '(none)')),
        fact('Last delivered', dateTime(status.lastDelivered) || '(not told while active)'),
      ].flat());
      const page = await api(`/AuditEvent?${new URLSearchParams({
        entity: `Subscription/${id}`, type: 'transmit', _count: '50' })}`);
      const attempts = resources(page).map(readAttempt);
      ledgerBody.replaceChildren(...attempts.map(ledgerRow));
      olderQuery = nextPage(page);
      more.hidden = !olderQuery;
      const recent = await attemptsSince(id, SPARK_MINUTES);
      const data = perMinute(recent, SPARK_MINUTES, Date.now());
      if (plot) plot.setData(data);
      else {
        plot = new uPlot({
          width: Math.min(900, main.clientWidth - 20), height: 180,
          scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max)] } },
          series: [{}, { label: 'delivered', stroke: '#116329', width: 2 },
            { label: 'failed', stroke: '#a40e26', width: 2 }],
        }, data, chart);
        plot.root.setAttribute('role', 'img');
      }
      plot.root.setAttribute('aria-label', sparkLabel(data));
      failure.replaceChildren();
    } catch (error) {
      failure.replaceChildren(problem(error));
    }
  };
  more.addEventListener('click', async () => {
    try {
      const page = await api(olderQuery);
      ledgerBody.append(...resources(page).map(readAttempt).map(ledgerRow));
      olderQuery = nextPage(page);
      more.hidden = !olderQuery;
    } catch (error) {
      failure.replaceChildren(problem(error));
    }
  });

  let stopTail = null;
  const setTail = (state) => { tailState.textContent = state; announce(`Live tail ${state}`); };
  tailButton.addEventListener('click', () => {
    if (stopTail) {
      stopTail();
      stopTail = null;
      tailButton.textContent = 'Start live tail';
      setTail('stopped');
      return;
    }
    if (!subscription) return;
    tailButton.textContent = 'Stop live tail';
    stopTail = openLive({
      criteria: subscription.criteria,
      filters: filtersOf(subscription),
      reason: `Baton console: live tail of Subscription/${id}`,
      onState: setTail,
      onEvents: (events) => {
        for (const e of events) {
          tail.prepend(h('li', { class: 'notification', dataset: { task: e.task } },
            `${time(e.timestamp)}  Task/${e.task} ${e.interaction}  (tail event ${e.number})`));
        }
      },
    });
  });

  const stop = every(refresh);
  return () => { stop(); stopTail?.(); plot?.destroy(); };
}

// ---------------------------------------------------------------- Task board

const TASK_STATUSES = ['draft', 'requested', 'received', 'accepted', 'ready', 'in-progress',
  'on-hold', 'completed', 'cancelled', 'failed', 'rejected', 'entered-in-error'];

function boardPage(params) {
  const owner = params.get('owner') || '';
  const performer = params.get('performer') || '';
  const form = h('form', { class: 'inline', id: 'board-form', method: 'post' },
    h('fieldset', {},
      h('legend', {}, 'Whose tasks'),
      h('div', {},
        h('label', { for: 'board-owner' }, 'Owner (reference)'),
        h('input', { id: 'board-owner', name: 'owner', value: owner, placeholder: 'Practitioner/123', autocomplete: 'off' })),
      h('p', { class: 'hint' }, 'or'),
      h('div', {},
        h('label', { for: 'board-performer' }, 'Role queue (performer type code, unowned tasks)'),
        h('input', { id: 'board-performer', name: 'performer', value: performer, placeholder: 'lab', autocomplete: 'off' }))),
    h('button', { type: 'submit' }, 'Show board'));
  const state = h('p', { class: 'updated', id: 'board-state' });
  const failure = h('div');
  const board = h('div', { class: 'board', id: 'board' });
  main.replaceChildren(h('h1', {}, 'Task board'), form, state, failure, board);
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const o = form.elements.owner.value.trim();
    const p = form.elements.performer.value.trim();
    const query = new URLSearchParams(o ? { owner: o } : p ? { performer: p } : {});
    location.hash = `#/board?${query}`;
  });
  if (!owner && !performer) {
    state.textContent = 'Choose an owner or a role queue.';
    return () => {};
  }
  // The search and the live filter of the same queue.
  const search = owner
    ? new URLSearchParams({ owner, _count: '200', _sort: '-_lastUpdated' })
    : new URLSearchParams({ 'owner:missing': 'true', performer, _count: '200', _sort: '-_lastUpdated' });
  const filter = owner ? `owner=${owner}` : `performer=${performer}`;
  const title = owner ? `owned by ${owner}` : `in the ${performer} queue`;

  let changed = new Set();
  const draw = (tasks) => {
    const byStatus = new Map(TASK_STATUSES.map((s) => [s, []]));
    for (const task of tasks) (byStatus.get(task.status) || byStatus.set(task.status, []).get(task.status)).push(task);
    const sections = [];
    for (const [status, list] of byStatus) {
      // The working states always show; the others only when they hold a task.
      if (list.length === 0 && !['requested', 'accepted', 'in-progress', 'completed'].includes(status)) continue;
      const headingId = `board-${status}`;
      sections.push(h('section', { 'aria-labelledby': headingId, dataset: { status } },
        h('h2', { id: headingId }, `${status} (${list.length})`),
        h('ul', {}, list.map((task) => h('li', {
          class: changed.has(task.id) ? 'card just-changed' : 'card', dataset: { task: task.id },
        },
        h('div', {}, task.description || task.code?.text || task.code?.coding?.[0]?.code || `Task/${task.id}`),
        h('div', { class: 'meta' }, `Task/${task.id} · ${task.priority || 'routine'} · ${dateTime(task.meta?.lastUpdated)}`))))));
    }
    board.replaceChildren(...sections);
  };
  const load = async () => {
    try {
      const bundle = await api(`/Task?${search}`);
      draw(resources(bundle));
      failure.replaceChildren();
    } catch (error) {
      failure.replaceChildren(problem(error));
    }
  };
  let pending = null;
  let stopLive = () => {};
  let left = false;
  // The topic's canonical URL is the server's (its public base URL), read from the topic.
  api('/SubscriptionTopic/task-changed').then((topic) => {
    if (left) return;
    stopLive = openLive({
    criteria: topic.url,
    filters: [filter],
    reason: `Baton console: Task board of tasks ${title}`,
    onState: (s) => {
      state.textContent = `Tasks ${title}: ${s === 'listening' ? 'live' : s}`;
      if (s === 'listening') load();
    },
    onEvents: (events) => {
      changed = new Set(events.map((e) => e.task));
      announce(`${events.length} task change${events.length === 1 ? '' : 's'}`);
      // Several notifications in a burst are read once.
      clearTimeout(pending);
      pending = setTimeout(load, 150);
    },
    });
  }).catch((error) => failure.replaceChildren(problem(error)));
  load();
  // A Task handed away from the board's owner may send no notification matching its filter;
  // a slow re-read removes it.
  const timer = setInterval(load, 30_000);
  return () => { left = true; stopLive(); clearInterval(timer); clearTimeout(pending); };
}

// ---------------------------------------------------------------- routing

function route() {
  leave();
  leave = () => {};
  const [path, query = ''] = location.hash.replace(/^#/, '').split('?');
  const signedIn = Boolean(session.token());
  document.getElementById('nav').hidden = !signedIn;
  if (!signedIn || path === '/' || path === '') {
    if (signedIn) { location.hash = '#/subscriptions'; return; }
    signInPage();
    return;
  }
  for (const link of document.querySelectorAll('nav a')) {
    link.toggleAttribute('aria-current', false);
    if (path.startsWith(link.getAttribute('href').slice(1).replace(/s$/, ''))) link.setAttribute('aria-current', 'page');
  }
  if (path === '/subscriptions') leave = subscriptionsPage();
  else if (path.startsWith('/subscription/')) leave = subscriptionPage(decodeURIComponent(path.slice('/subscription/'.length)));
  else if (path === '/board') leave = boardPage(new URLSearchParams(query));
  else main.replaceChildren(h('h1', {}, 'Not found'), h('p', {}, h('a', { href: '#/subscriptions' }, 'Subscriptions')));
  document.title = `${main.querySelector('h1')?.textContent || 'Baton'} · Baton console`;
  main.focus();
}

document.getElementById('sign-out').addEventListener('click', () => {
  leave();
  leave = () => {};
  session.signOut();
  location.hash = '#/';
  route();
});
// The skip link moves the focus to the page's content. Its `#main` is no route: followed as
// a link, it would send the hash router to a "Not found" page.
document.querySelector('.skip').addEventListener('click', (event) => {
  event.preventDefault();
  main.focus();
});
window.addEventListener('hashchange', route);
window.addEventListener('pagehide', () => leave());
route();
