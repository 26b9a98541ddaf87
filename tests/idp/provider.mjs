// Portico's test IdP: npm oidc-provider on loopback (../shared/TEST-PEERS.md).
//
// Environment:
//   OP_PORT           port on 127.0.0.1 (0: any; the chosen one is printed)
//   OP_REDIRECT_URIS  the client's exact redirect URIs, comma-separated
//   OP_API            the audience of JWT access tokens for API clients
//   OP_SIGNING_KEY    a PEM private key (RSA) to sign with, so a test can
//                     sign tokens the provider's JWKS verifies; else a new one
//   OP_SIGNING_KID    its kid (default test-key-1)
//   OP_CONSENT=1      show the consent form (else every grant is given)
//   OP_TEST_TAMPER=1  serve /_test/tamper (below); off unless a test sets it
//   OP_EXTRA_CLIENTS  more clients besides `portico`, `id:secret` comma-
//                     separated, with the same redirect URIs (apps' own)
//
// `GET /_test/requests` answers how many requests each path got (JSON),
// so a test can count the JWKS fetches of the edge. `GET /_test/clients`
// answers, per client id, how many authorization requests the provider
// accepted and how many codes it exchanged (`{"authorization": {id: n},
// "token": {id: n}}`).
//
// With OP_TEST_TAMPER=1, `POST /_test/tamper` with `{"mode": M}` makes the
// next successful token response carry, instead of the real ID token, one
// crafted from its claims (see TAMPER below); `GET /_test/tamper` answers
// `{"pending": M|null, "applied": [M, ...]}`, the modes served so far.
//
// Prints `listening issuer=http://127.0.0.1:PORT` once it serves. Users sign
// in with any password through the dev interaction form; the login is
// `sub`. alice is in groups admins and devs; bob in none.
import { createHmac, createPrivateKey, createPublicKey, generateKeyPairSync, sign } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import Provider, { errors } from 'oidc-provider';

const CLIENT_SECRET = 'portico-secret';
const API = process.env.OP_API ?? 'https://api.apps.localhost';
const USERS = {
  alice: { email: 'alice@example.test', name: 'Alice Admin', groups: ['admins', 'devs'] },
  bob: { email: 'bob@example.test', name: 'Bob', groups: [] },
};
const claimsFor = (id) => {
  const u = USERS[id] ?? { email: `${id}@example.test`, name: id, groups: [] };
  return { sub: id, email: u.email, email_verified: true, name: u.name, groups: u.groups };
};
const privateKey = process.env.OP_SIGNING_KEY
  ? createPrivateKey(readFileSync(process.env.OP_SIGNING_KEY))
  : generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
const kid = process.env.OP_SIGNING_KID ?? 'test-key-1';
const jwk = { ...privateKey.export({ format: 'jwk' }), kid, use: 'sig', alg: 'RS256' };
const requests = {};

// The test-only tamper hook: how each mode turns the real ID token (its
// header and claims) into a crafted one. Each changes one thing; `resign`
// changes nothing but signs anew here, so a test can show that what this
// crafting signs verifies unless a mode changes it.
const tamperEnabled = process.env.OP_TEST_TAMPER === '1';
const otherKey = tamperEnabled ? generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey : null;
const publicPem = createPublicKey(privateKey).export({ type: 'spki', format: 'pem' });
const b64 = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');
const rs256 = (header, claims, key) => {
  const input = `${b64(header)}.${b64(claims)}`;
  return `${input}.${sign('sha256', Buffer.from(input), key).toString('base64url')}`;
};
const hs256 = (header, claims, key) => {
  const input = `${b64({ ...header, alg: 'HS256' })}.${b64(claims)}`;
  return `${input}.${createHmac('sha256', key).update(input).digest('base64url')}`;
};
const now = () => Math.floor(Date.now() / 1000);
const TAMPER = {
  resign: (h, c) => rs256(h, c, privateKey),
  alg_none: (h, c) => `${b64({ alg: 'none', typ: 'JWT', kid: h.kid })}.${b64(c)}.`,
  wrong_iss: (h, c) => rs256(h, { ...c, iss: 'https://evil.example' }, privateKey),
  iss_trailing_slash: (h, c) => rs256(h, { ...c, iss: `${c.iss}/` }, privateKey),
  wrong_aud: (h, c) => rs256(h, { ...c, aud: 'someone-else' }, privateKey),
  extra_aud: (h, c) => rs256(h, { ...c, aud: [c.aud, 'someone-else'].flat() }, privateKey),
  expired: (h, c) => rs256(h, { ...c, iat: now() - 1200, exp: now() - 600 }, privateKey),
  unknown_kid: (h, c) => rs256({ ...h, kid: 'rotated-1' }, c, otherKey),
  other_key: (h, c) => rs256(h, c, otherKey),
  bad_nonce: (h, c) => rs256(h, { ...c, nonce: 'not-this-sign-in' }, privateKey),
  no_nonce: (h, c) => { const { nonce, ...rest } = c; return rs256(h, rest, privateKey); },
  // HS256 keyed with the public key (algorithm confusion), and with the
  // client secret (an RP may take that, but this provider only announces
  // RS256 for ID tokens).
  hs256_pubkey: (h, c) => hs256(h, c, publicPem),
  hs256_client_secret: (h, c) => hs256(h, c, CLIENT_SECRET),
  // A claim changed after signing, under the real signature.
  swapped_sub: (h, c, real) => `${b64(h)}.${b64({ ...c, sub: 'carol' })}.${real.split('.')[2]}`,
};
const tamper = { pending: null, applied: [] };
const readBody = (req, max) => new Promise((resolve, reject) => {
  let body = '';
  req.setEncoding('utf8');
  req.on('data', (d) => {
    body += d;
    if (body.length > max) { reject(new Error('body too large')); req.destroy(); }
  });
  req.on('end', () => resolve(body));
  req.on('error', reject);
});
const serveTamper = async (req, res) => {
  res.setHeader('content-type', 'application/json');
  if (req.method === 'GET') {
    res.end(JSON.stringify(tamper));
    return;
  }
  if (req.method !== 'POST') {
    res.statusCode = 405;
    res.end(JSON.stringify({ error: 'GET or POST' }));
    return;
  }
  try {
    const { mode } = JSON.parse(await readBody(req, 1024));
    if (!Object.hasOwn(TAMPER, mode)) {
      throw new Error(`POST {"mode": M}, M one of ${Object.keys(TAMPER).join(', ')}`);
    }
    tamper.pending = mode;
    res.end(JSON.stringify(tamper));
  } catch (e) {
    res.statusCode = 400;
    res.end(JSON.stringify({ error: String(e.message ?? e) }));
  }
};
const redirectUris = (process.env.OP_REDIRECT_URIS ?? '').split(',').filter(Boolean);
const client = (client_id, client_secret) => ({
  client_id,
  client_secret,
  redirect_uris: redirectUris,
  grant_types: ['authorization_code'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
});
const extraClients = (process.env.OP_EXTRA_CLIENTS ?? '').split(',').filter(Boolean).map((pair) => {
  const at = pair.indexOf(':');
  if (at <= 0) throw new Error(`OP_EXTRA_CLIENTS: ${pair} is not id:secret`);
  return client(pair.slice(0, at), pair.slice(at + 1));
});
const clientUse = { authorization: {}, token: {} };
const count = (kind, ctx) => {
  const id = ctx.oidc?.client?.clientId;
  if (id) clientUse[kind][id] = (clientUse[kind][id] ?? 0) + 1;
};

const server = http.createServer();
server.listen(Number(process.env.OP_PORT ?? 0), '127.0.0.1', () => {
  const port = server.address().port;
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients: [client('portico', CLIENT_SECRET), ...extraClients],
    pkce: { required: () => true },
    jwks: { keys: [jwk] },
    cookies: { keys: ['portico-test-idp-cookie-key'] },
    scopes: ['openid', 'profile', 'email', 'groups'],
    claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name', 'groups'], groups: ['groups'] },
    conformIdTokenClaims: false,
    async findAccount(ctx, id) { return { accountId: id, async claims() { return claimsFor(id); } }; },
    features: {
      devInteractions: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (ctx, client, oneOf) =>
          oneOf ?? (String(ctx.oidc.params?.scope ?? '').split(' ').includes('api') ? API : undefined),
        useGrantedResource: async () => true,
        getResourceServerInfo: async (ctx, ind) => {
          if (ind !== API) throw new errors.InvalidTarget();
          return { scope: 'api', audience: API, accessTokenFormat: 'jwt', accessTokenTTL: 3600, jwt: { sign: { alg: 'RS256' } } };
        },
      },
    },
    async extraTokenClaims(ctx, t) {
      if (t.kind === 'AccessToken' && t.accountId) {
        const c = claimsFor(t.accountId);
        return { email: c.email, groups: c.groups };
      }
      return undefined;
    },
    // No consent page unless OP_CONSENT=1: every grant asked for is given.
    ...(process.env.OP_CONSENT === '1' ? {} : {
      async loadExistingGrant(ctx) {
        const grant = new provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
        grant.addOIDCScope('openid email profile groups');
        grant.addResourceScope(API, 'api');
        await grant.save();
        return grant;
      },
    }),
  });
  if (tamperEnabled) {
    // After the token endpoint answers: the pending mode, once.
    provider.use(async (ctx, next) => {
      await next();
      const mode = tamper.pending;
      if (mode && ctx.path === '/token' && ctx.status === 200 && typeof ctx.body?.id_token === 'string') {
        const real = ctx.body.id_token;
        const [h, c] = real.split('.').slice(0, 2).map((p) => JSON.parse(Buffer.from(p, 'base64url')));
        ctx.body = { ...ctx.body, id_token: TAMPER[mode](h, c, real) };
        tamper.pending = null;
        tamper.applied.push(mode);
      }
    });
  }
  provider.on('authorization.accepted', (ctx) => count('authorization', ctx));
  provider.on('grant.success', (ctx) => count('token', ctx));
  const callback = provider.callback();
  server.on('request', (req, res) => {
    const path = new URL(req.url, issuer).pathname;
    if (path === '/_test/clients') {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(clientUse));
      return;
    }
    if (path === '/_test/requests') {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(requests));
      return;
    }
    if (path === '/_test/tamper' && tamperEnabled) {
      serveTamper(req, res);
      return;
    }
    requests[path] = (requests[path] ?? 0) + 1;
    callback(req, res);
  });
  console.log(`listening issuer=${issuer}`);
});
process.on('SIGTERM', () => process.exit(0));
