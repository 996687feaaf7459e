// Drives a running Baton with fhir-kit-client, as a JavaScript integrator would; run by
// tests/clients.rs. Reads BATON_URL (the FHIR base) and BATON_TOKEN (an admin bearer token)
// from the environment and exits non-zero with a message on the first surprise.
import http from 'node:http';
import { Client } from 'fhir-kit-client';

function check(condition, message) {
  if (!condition) {
    console.error(`fhir-kit-client driver: ${message}`);
    process.exit(1);
  }
}

const client = new Client({ baseUrl: process.env.BATON_URL, bearerToken: process.env.BATON_TOKEN });

const created = [];
for (let n = 0; n < 5; n += 1) {
  const task = await client.create({
    resourceType: 'Task',
    body: {
      resourceType: 'Task', status: 'requested', intent: 'order',
      description: `fhir-kit task ${n}`, owner: { reference: 'Practitioner/fhirkit' },
    },
  });
  check(task.id, 'a created Task has no id');
  created.push(task);
}
const read = await client.read({ resourceType: 'Task', id: created[0].id });
check(read.description === 'fhir-kit task 0', `read back ${JSON.stringify(read)}`);

// Search: a total, and paging to the end with nextPage.
let bundle = await client.search({
  resourceType: 'Task', searchParams: { owner: 'Practitioner/fhirkit', _count: 2, _total: 'accurate' },
});
check(bundle.total === 5, `search total ${bundle.total}`);
const seen = [];
for (;;) {
  seen.push(...(bundle.entry ?? []).map((e) => e.resource.id));
  const next = await client.nextPage({ bundle });
  if (!next) break;
  bundle = next;
}
check(seen.length === 5 && new Set(seen).size === 5, `paging gave ${seen}`);

// Update, then fhir-kit-client's patch (JSON Patch), with If-Match.
const task = created[1];
const updated = await client.update({
  resourceType: 'Task', id: task.id, body: { ...task, description: 'updated by fhir-kit' },
});
check(updated.meta.versionId === '2', `update gave ${JSON.stringify(updated.meta)}`);
const patched = await client.patch({
  resourceType: 'Task', id: task.id,
  jsonPatch: [{ op: 'replace', path: '/status', value: 'accepted' }],
  options: { headers: { 'If-Match': 'W/"2"' } },
});
check(patched.status === 'accepted' && patched.meta.versionId === '3', `patch gave ${JSON.stringify(patched)}`);
let stale = null;
try {
  await client.patch({
    resourceType: 'Task', id: task.id,
    jsonPatch: [{ op: 'replace', path: '/status', value: 'in-progress' }],
    options: { headers: { 'If-Match': 'W/"2"' } },
  });
} catch (error) {
  stale = error;
}
check(stale && stale.response && stale.response.status === 412, `a stale If-Match gave ${stale}`);

// Delete, then a read fails with 410.
await client.delete({ resourceType: 'Task', id: created[2].id });
let gone = null;
try {
  await client.read({ resourceType: 'Task', id: created[2].id });
} catch (error) {
  gone = error;
}
check(gone && gone.response && gone.response.status === 410, `reading a deleted Task gave ${gone}`);

// The type-level history, paged with nextPage: 5 creates, an update, a patch, a delete.
let history = await client.history({ resourceType: 'Task' });
const entries = [];
for (;;) {
  check(history.type === 'history', `history type ${history.type}`);
  entries.push(...(history.entry ?? []));
  const next = await client.nextPage({ bundle: history });
  if (!next) break;
  history = next;
}
check(entries.length === 8, `history has ${entries.length} entries`);
const deletes = entries.filter((e) => e.request.method === 'DELETE');
check(deletes.length === 1 && !deletes[0].resource, `history deletes ${JSON.stringify(deletes)}`);
// A classic R4 subscription (criteria a search), received on a local endpoint.
const received = [];
const endpoint = http.createServer((request, response) => {
  let body = '';
  request.on('data', (chunk) => { body += chunk; });
  request.on('end', () => {
    received.push({ method: request.method, url: request.url, body });
    response.writeHead(200).end();
  });
});
await new Promise((resolve) => { endpoint.listen(0, '127.0.0.1', resolve); });
const subscription = await client.create({
  resourceType: 'Subscription',
  body: {
    resourceType: 'Subscription', status: 'requested', reason: 'fhir-kit classic subscription',
    criteria: 'Task?owner=Practitioner/fhirkit-classic',
    channel: { type: 'rest-hook', endpoint: `http://127.0.0.1:${endpoint.address().port}/hook` },
  },
});
check(subscription.status === 'active', `classic subscription is ${subscription.status}`);
await client.create({
  resourceType: 'Task',
  body: { resourceType: 'Task', status: 'requested', intent: 'order', owner: { reference: 'Practitioner/other' } },
});
await client.create({
  resourceType: 'Task',
  body: { resourceType: 'Task', status: 'requested', intent: 'order', owner: { reference: 'Practitioner/fhirkit-classic' } },
});
const deadline = Date.now() + 20000;
while (received.length === 0 && Date.now() < deadline) {
  await new Promise((resolve) => { setTimeout(resolve, 50); });
}
await new Promise((resolve) => { setTimeout(resolve, 200); });
check(received.length === 1, `classic endpoint received ${JSON.stringify(received)}`);
check(received[0].method === 'POST' && received[0].url === '/hook' && received[0].body === '',
  `a classic ping is a POST with no body: ${JSON.stringify(received[0])}`);
endpoint.closeAllConnections();
endpoint.close();
console.log('fhir-kit-client driver: ok');
