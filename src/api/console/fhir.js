// Baton's public FHIR API as the console uses it: the operator's token, requests, and pure
// readers of the resources that come back. Nothing here touches the page.

const TOKEN_KEY = 'baton.console.token';

/** The FHIR base beside the console: `/console/` → `/fhir`, under any proxy prefix. */
export const FHIR_BASE = new URL('../fhir', document.baseURI).href.replace(/\/$/, '');

const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/';
export const FILTER_EXTENSION = `${BACKPORT}backport-filter-criteria`;
export const CONTENT_EXTENSION = `${BACKPORT}backport-payload-content`;
export const EVENTS_DELIVERED_EXTENSION =
  'https://baton.dev/fhir/StructureDefinition/events-delivered';
export const LAST_DELIVERED_EXTENSION =
  'https://baton.dev/fhir/StructureDefinition/last-delivered';

// The token lives in this tab's sessionStorage only: never in a URL, a cookie or a log.
export const session = {
  token: () => sessionStorage.getItem(TOKEN_KEY),
  signIn: (token) => sessionStorage.setItem(TOKEN_KEY, token),
  signOut: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** A refusal or failure of the API, with the OperationOutcome's text. */
export class ApiError extends Error {
  constructor(status, text) {
    super(text ? `${status}: ${text}` : `HTTP ${status}`);
    this.status = status;
  }
}

/** Calls the FHIR API with the operator's token; the answer's JSON, or an ApiError. */
export async function api(path, { method = 'GET', body, keepalive = false } = {}) {
  const headers = { Accept: 'application/fhir+json' };
  const token = session.token();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/fhir+json';
  const response = await fetch(FHIR_BASE + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    keepalive,
    cache: 'no-store',
    credentials: 'omit',
  });
  let json = null;
  try {
    json = await response.json();
  } catch {
    // A 204 or a body that is not JSON: nothing to read.
  }
  if (!response.ok) throw new ApiError(response.status, outcomeText(json));
  return json;
}

/** The diagnostics of an OperationOutcome, joined. */
export function outcomeText(resource) {
  if (!resource || resource.resourceType !== 'OperationOutcome') return '';
  return (resource.issue || [])
    .map((i) => i.diagnostics || i.details?.text || i.code)
    .filter(Boolean)
    .join('; ');
}

/** The resources of a Bundle's entries. */
export const resources = (bundle) => (bundle?.entry || []).map((e) => e.resource);

/** The query of a Bundle's `next` link, to ask for the next page through FHIR_BASE. */
export function nextPage(bundle) {
  const next = (bundle?.link || []).find((l) => l.relation === 'next');
  if (!next) return null;
  const url = new URL(next.url);
  const base = new URL(FHIR_BASE);
  // The link names the server's public base; the console keeps to its own origin.
  const path = url.pathname.startsWith(base.pathname)
    ? url.pathname.slice(base.pathname.length)
    : url.pathname.replace(/^.*\/(?=[A-Z])/, '/');
  return path + url.search;
}

const named = (parameters, name) => (parameters?.parameter || []).filter((p) => p.name === name);

/** What a `$status` Parameters says about its subscription. */
export function readStatus(parameters) {
  const reference = named(parameters, 'subscription')[0]?.valueReference?.reference || '';
  const since = named(parameters, 'events-since-subscription-start')[0];
  const delivered = (since?.extension || []).find((e) => e.url === EVENTS_DELIVERED_EXTENSION);
  const error = named(parameters, 'error')[0];
  const lastDelivered = (error?.extension || []).find((e) => e.url === LAST_DELIVERED_EXTENSION);
  const counted = since ? Number(since.valueString) : null;
  const done = delivered ? Number(delivered.valueString) : null;
  return {
    id: reference.split('/').pop(),
    status: named(parameters, 'status')[0]?.valueCode || '',
    counted,
    delivered: done,
    backlog: counted !== null && done !== null ? Math.max(0, counted - done) : null,
    error: error?.valueCodeableConcept?.text || '',
    lastDelivered: lastDelivered?.valueInstant || '',
  };
}

/** The topic's id: the last segment of the subscription's topic canonical. */
export const topicOf = (subscription) => (subscription.criteria || '').split('/').pop();

/** The subscription's filters, as written. */
export const filtersOf = (subscription) =>
  (subscription._criteria?.extension || [])
    .filter((e) => e.url === FILTER_EXTENSION)
    .map((e) => e.valueString);

/** The endpoint's host (and port), never the rest of its URL, which may carry a secret. */
export function endpointHost(subscription) {
  const endpoint = subscription.channel?.endpoint;
  if (!endpoint) return '';
  const match = /^[a-z][a-z0-9+.-]*:\/\/(?:[^@/?#]*@)?([^/?#]+)/i.exec(endpoint);
  return match ? match[1] : '';
}

/** One delivery attempt of the ledger (an AuditEvent of type `transmit`). */
export function readAttempt(event) {
  const details = Object.fromEntries(
    (event.entity?.[0]?.detail || []).map((d) => [d.type, d.valueString]),
  );
  return {
    id: event.id,
    recorded: event.recorded,
    kind: event.subtype?.[0]?.code || details['notification-type'] || '',
    events: details.events || '',
    channel: details.channel || '',
    host: details['endpoint-host'] || '',
    durationMs: details['duration-ms'] || '',
    ok: event.outcome === '0',
    error: event.outcomeDesc || details.error || '',
  };
}

/**
 * Attempts per minute over the last `minutes` minutes up to `now` (ms): the x values
 * (seconds, for uPlot) and the delivered and failed counts per minute.
 */
export function perMinute(attempts, minutes, now) {
  const minute = 60_000;
  const end = Math.floor(now / minute) * minute;
  const start = end - (minutes - 1) * minute;
  const xs = [];
  const delivered = new Array(minutes).fill(0);
  const failed = new Array(minutes).fill(0);
  for (let i = 0; i < minutes; i += 1) xs.push((start + i * minute) / 1000);
  for (const attempt of attempts) {
    const at = Date.parse(attempt.recorded);
    const slot = Math.floor((at - start) / minute);
    if (slot < 0 || slot >= minutes) continue;
    if (attempt.ok) delivered[slot] += 1;
    else failed[slot] += 1;
  }
  return [xs, delivered, failed];
}

/**
 * A websocket subscription for the console's own live views: the same topic and filters as
 * `like` (or the given ones), id-only, ending by itself after an hour in case the page is
 * closed before it can remove it.
 */
export function liveSubscription({ criteria, filters, reason }) {
  const subscription = {
    resourceType: 'Subscription',
    status: 'requested',
    reason,
    criteria,
    end: new Date(Date.now() + 3_600_000).toISOString(),
    channel: {
      type: 'websocket',
      payload: 'application/fhir+json',
      _payload: { extension: [{ url: CONTENT_EXTENSION, valueCode: 'id-only' }] },
    },
  };
  if (filters.length > 0) {
    subscription._criteria = {
      extension: filters.map((f) => ({ url: FILTER_EXTENSION, valueString: f })),
    };
  }
  return subscription;
}

/** What one websocket notification Bundle says: its type and its events. */
export function readNotification(bundle) {
  const status = bundle?.entry?.[0]?.resource;
  if (!status || status.resourceType !== 'Parameters') return null;
  const events = named(status, 'notification-event').map((event) => {
    const part = (name) => (event.part || []).find((p) => p.name === name);
    const focus = part('focus')?.valueReference?.reference || '';
    return {
      number: part('event-number')?.valueString || '',
      timestamp: part('timestamp')?.valueInstant || '',
      task: focus.split('/').pop(),
    };
  });
  // The entries after the status say what happened to each Task (POST, PUT, DELETE).
  const requests = (bundle.entry || []).slice(1).map((e) => e.request?.method || '');
  events.forEach((event, i) => {
    event.interaction = { POST: 'created', PUT: 'updated', PATCH: 'updated', DELETE: 'deleted' }[
      requests[i]
    ] || '';
  });
  return { type: named(status, 'type')[0]?.valueCode || '', events };
}
