// A real OpenID provider for tests/oidc.rs, built on the certified `oidc-provider` package.
//
// It issues JWT access tokens through the client_credentials grant with resource indicators,
// exactly as a confidential client would get them, and publishes its keys at /jwks (found
// through /.well-known/openid-configuration). Its test-only controls live under /_test:
//   GET  /_test/stats        {"jwks": <JWKS fetches so far>, "discovery": <discovery fetches>}
//   POST /_test/rotate       replaces the RSA signing key by a new one (the old kid is gone)
//   POST /_test/down         the JWKS and discovery endpoints answer 503 from now on
//   POST /_test/up           they answer again
//   POST /_test/sign         body {"claims": {...}, "alg": "RS256"|"ES256"}: signs exactly these
//                            claims with the provider's current key of that type (for tokens a
//                            provider would never issue: expired, not yet valid, wrong audience)
//   GET  /_test/public.pem   the current RSA public key as PEM (for the HS256 confusion forgery)
//
// Usage: node provider.mjs <audience> [port]. Prints "READY <port>" once it listens on
// 127.0.0.1 (on the port given, or any free one).

import http from 'node:http';
import crypto from 'node:crypto';
import Provider from 'oidc-provider';

const audience = process.argv[2] || 'https://baton.test/fhir';

// Every SMART scope the tests ask for; a client may request any of them.
const SCOPES = [
  'system/*.*', 'user/*.*', 'system/Task.cruds', 'system/Task.rs', 'system/Task.c', 'system/Task.u',
  'system/Task.d', 'system/Task.r', 'system/Task.s', 'user/Task.cruds', 'user/Task.rs',
  'user/Task.read', 'user/Task.write', 'user/Subscription.cruds', 'user/Subscription.rs',
  'system/Subscription.cruds', 'system/Subscription.rs', 'patient/Task.rs', 'launch/patient',
  'user/Task.c', 'user/Task.u', 'user/Task.d',
].join(' ');

// The claims each client's tokens carry, as Keycloak would put them (realm roles, fhirUser).
const CLIENTS = {
  'admin-app': { claims: { realm_access: { roles: ['admin', 'offline_access'] } } },
  'nurse-app': {
    claims: {
      realm_access: { roles: ['practitioner'] },
      fhirUser: 'Practitioner/n1',
      performer_types: ['http://x|lab'],
    },
  },
  'auditor-app': { claims: { realm_access: { roles: ['auditor'] } } },
  'norole-app': { claims: { realm_access: { roles: ['offline_access'] } } },
  'two-roles-app': { claims: { realm_access: { roles: ['admin', 'auditor'] } } },
  'template-app': { claims: { realm_access: { roles: ['practitioner'] } } },
  'es-app': { alg: 'ES256', claims: { realm_access: { roles: ['admin'] } } },
  'ps-app': { alg: 'PS256', claims: { realm_access: { roles: ['admin'] } } },
  // The browser page of tests/browser.rs (examples/browser): a board reading every Task.
  'board-app': { claims: { realm_access: { roles: ['auditor'] }, fhirUser: 'Practitioner/board' } },
  'patient-app': {
    claims: { realm_access: { roles: ['practitioner'] }, fhirUser: 'Practitioner/p1', patient: 'Patient/1' },
  },
};

function rsaKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { privateKey, kid: `rsa-${crypto.randomUUID()}` };
}
const ecPair = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
const ec = { privateKey: ecPair.privateKey, kid: `ec-${crypto.randomUUID()}` };
let rsa = rsaKey();

const stats = { jwks: 0, discovery: 0 };
let down = false;
let provider;
let issuer;

function jwk(key, alg) {
  return { ...key.privateKey.export({ format: 'jwk' }), kid: key.kid, use: 'sig', alg };
}

// A new provider with the current keys: how the test rotates keys. The RSA key signs both RS256
// and PS256 tokens, so it is published twice (one JWK per algorithm, as oidc-provider wants).
function buildProvider() {
  const p = new Provider(issuer, {
    scopes: ['openid', 'offline_access', ...SCOPES.split(' ')],
    jwks: { keys: [jwk(rsa, 'RS256'), { ...jwk(rsa, 'PS256'), kid: `${rsa.kid}-ps` }, jwk(ec, 'ES256')] },
    clients: Object.keys(CLIENTS).map((id) => ({
      client_id: id,
      client_secret: `${id}-secret`,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_post',
      scope: SCOPES,
    })),
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => audience,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource, client) => ({
          scope: SCOPES,
          audience: resource,
          accessTokenTTL: 600,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: CLIENTS[client.clientId]?.alg || 'RS256' } },
        }),
      },
    },
    extraTokenClaims: (ctx, token) => CLIENTS[token.clientId]?.claims ?? {},
    // Only the board's page calls the token endpoint from a browser (any loopback origin).
    clientBasedCORS: (ctx, origin, client) =>
      client.clientId === 'board-app' && new URL(origin).hostname === '127.0.0.1',
  });
  p.proxy = false;
  return p;
}

function b64url(data) {
  return Buffer.from(data).toString('base64url');
}

// Signs exactly `claims` with the current key of `alg`'s type.
function sign(claims, alg) {
  const key = alg === 'ES256' ? ec : rsa;
  const kid = alg === 'PS256' ? `${rsa.kid}-ps` : key.kid;
  const input = `${b64url(JSON.stringify({ alg, typ: 'at+jwt', kid }))}.${b64url(JSON.stringify(claims))}`;
  const options = { key: key.privateKey };
  if (alg === 'ES256') options.dsaEncoding = 'ieee-p1363';
  if (alg === 'PS256') {
    options.padding = crypto.constants.RSA_PKCS1_PSS_PADDING;
    options.saltLength = 32;
  }
  return `${input}.${b64url(crypto.sign('sha256', Buffer.from(input), options))}`;
}

function readBody(req) {
  return new Promise((resolve) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString()));
  });
}

function reply(res, status, body, type = 'application/json') {
  res.writeHead(status, { 'content-type': type });
  res.end(typeof body === 'string' ? body : JSON.stringify(body));
}

const server = http.createServer(async (req, res) => {
  const path = req.url.split('?')[0];
  if (path.startsWith('/_test/')) {
    if (path === '/_test/stats') return reply(res, 200, stats);
    if (path === '/_test/rotate' && req.method === 'POST') {
      rsa = rsaKey();
      provider = buildProvider();
      return reply(res, 200, { kid: rsa.kid });
    }
    if (path === '/_test/down') { down = true; return reply(res, 200, {}); }
    if (path === '/_test/up') { down = false; return reply(res, 200, {}); }
    if (path === '/_test/public.pem') {
      return reply(res, 200, crypto.createPublicKey(rsa.privateKey).export({ type: 'spki', format: 'pem' }), 'text/plain');
    }
    if (path === '/_test/sign' && req.method === 'POST') {
      const { claims, alg } = JSON.parse(await readBody(req));
      return reply(res, 200, { token: sign(claims, alg || 'RS256') });
    }
    return reply(res, 404, { error: 'unknown test control' });
  }
  if (path === '/jwks') stats.jwks += 1;
  if (path === '/.well-known/openid-configuration') stats.discovery += 1;
  if (down && (path === '/jwks' || path === '/.well-known/openid-configuration')) {
    return reply(res, 503, { error: 'down for the test' });
  }
  return provider.callback()(req, res);
});

server.listen(Number(process.argv[3] || 0), '127.0.0.1', () => {
  const { port } = server.address();
  issuer = `http://127.0.0.1:${port}`;
  provider = buildProvider();
  process.stdout.write(`READY ${port}\n`);
});

// The test kills this process; should the test die first, its end of stdin closes, which ends
// this process too (only when asked: a shell's background job has no such stdin).
if (process.env.EXIT_WITH_STDIN === '1') {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.resume();
}
