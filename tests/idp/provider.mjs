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
//   OP_EXTRA_CLIENTS  more clients besides `portico`, `id:secret` comma-
//                     separated, with the same redirect URIs (apps' own)
//
// `GET /_test/requests` answers how many requests each path got (JSON),
// so a test can count the JWKS fetches of the edge. `GET /_test/clients`
// answers, per client id, how many authorization requests the provider
// accepted and how many codes it exchanged (`{"authorization": {id: n},
// "token": {id: n}}`).
//
// Prints `listening issuer=http://127.0.0.1:PORT` once it serves. Users sign
// in with any password through the dev interaction form; the login is
// `sub`. alice is in groups admins and devs; bob in none.
import { createPrivateKey, generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import Provider, { errors } from 'oidc-provider';

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
    clients: [client('portico', 'portico-secret'), ...extraClients],
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
    requests[path] = (requests[path] ?? 0) + 1;
    callback(req, res);
  });
  console.log(`listening issuer=${issuer}`);
});
process.on('SIGTERM', () => process.exit(0));
