// Drives the official Stream JS SDK against a chatgate-protected server
// (tests/sdk_js_layer.rs starts the server and mints the tokens).
//
// env: BASE_URL (http://127.0.0.1:PORT), API_KEY, SCENARIO, and the tokens:
//   connect  VALID_TOKEN                connectUser succeeds, then a channel round trip
//   refresh  EXPIRED_TOKEN, VALID_TOKEN  a tokenProvider first returns an expired token
//   badsig   BAD_TOKEN                  connectUser fails with code 43, no reconnects
//   revoke   SECRET, OLD_TOKEN          a server client revokes alice's tokens, then the
//                                       app's, through PATCH /users and PATCH /app
//   live     SECRET, VALID_TOKEN        connected with a tokenProvider, alice is
//                                       revoked: the socket closes (4000), the SDK
//                                       refreshes its token (minted then) and recovers
// Prints one line `RESULT {...json...}` and exits 0, or prints the failure and exits 1.
'use strict';

const { StreamChat } = require('stream-chat');

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`missing env ${name}`);
  return value;
};

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function client() {
  return new StreamChat(env('API_KEY'), {
    baseURL: env('BASE_URL'),
    allowServerSideConnect: true,
    timeout: 5000,
  });
}

async function connect() {
  const chat = client();
  const me = await chat.connectUser({ id: 'alice', name: 'Alice' }, env('VALID_TOKEN'));
  const channel = chat.channel('messaging', 'general', { name: 'General' });
  await channel.watch();
  const sent = await channel.sendMessage({ text: 'hello through chatgate' });
  const result = {
    user: chat.user && chat.user.id,
    connection_id: me && me.connection_id,
    channel: channel.cid,
    message_user: sent.message.user.id,
    messages: channel.state.messages.length,
  };
  await chat.disconnectUser();
  return result;
}

async function refresh() {
  const chat = client();
  const handed = [];
  const provider = async () => {
    const token = handed.length === 0 ? env('EXPIRED_TOKEN') : env('VALID_TOKEN');
    handed.push(token === env('VALID_TOKEN') ? 'valid' : 'expired');
    return token;
  };
  const me = await chat.connectUser({ id: 'alice' }, provider);
  const result = { user: chat.user && chat.user.id, connection_id: me && me.connection_id, provided: handed };
  await chat.disconnectUser();
  return result;
}

async function badsig() {
  const chat = client();
  let error = null;
  try {
    await chat.connectUser({ id: 'alice' }, env('BAD_TOKEN'));
  } catch (e) {
    error = e;
  }
  // Give a reconnect loop, if there were one, time to show on the server's counter.
  await sleep(3000);
  let code = null;
  try {
    code = JSON.parse(error.message).code;
  } catch (_) {
    code = error && error.code;
  }
  const result = { failed: error !== null, code, message: error && String(error.message) };
  await chat.disconnectUser().catch(() => {});
  return result;
}

// connectUser with a static token: the user id on success, the error code on failure.
async function tryConnect(token) {
  const chat = client();
  try {
    await chat.connectUser({ id: 'alice' }, token);
    const id = chat.user && chat.user.id;
    await chat.disconnectUser();
    return { connected: id };
  } catch (error) {
    await chat.disconnectUser().catch(() => {});
    return { code: JSON.parse(error.message).code };
  }
}

async function revoke() {
  const server = new StreamChat(env('API_KEY'), env('SECRET'), {
    baseURL: env('BASE_URL'),
    timeout: 5000,
  });
  const old = env('OLD_TOKEN');
  const steps = {};
  steps.before = await tryConnect(old);
  await server.revokeUserToken('alice');
  steps.user_revoked = await tryConnect(old);
  await server.revokeUserToken('alice', null);
  steps.user_restored = await tryConnect(old);
  await server.revokeTokens(new Date());
  steps.app_revoked = await tryConnect(old);
  await server.revokeTokens(null);
  steps.app_restored = await tryConnect(old);
  return steps;
}

async function live() {
  const server = new StreamChat(env('API_KEY'), env('SECRET'), {
    baseURL: env('BASE_URL'),
    timeout: 5000,
  });
  const chat = client();
  // The refreshed token is minted when the SDK asks for it, as an app's backend would:
  // after the revocation, with iat one second on (cutoffs round up to whole seconds), so
  // however slowly this process started, the new token is never under the new cutoff.
  let provided = 0;
  const provider = async () =>
    provided++ === 0
      ? env('VALID_TOKEN')
      : server.createToken('alice', undefined, Math.floor(Date.now() / 1000) + 1);
  await chat.connectUser({ id: 'alice' }, provider);
  const first = chat._getConnectionID();
  const recovered = new Promise((resolve) => chat.on('connection.recovered', resolve));
  await server.revokeUserToken('alice');
  await Promise.race([
    recovered,
    sleep(30000).then(() => {
      throw new Error('the SDK did not recover after the revocation');
    }),
  ]);
  const result = { provided, first, second: chat._getConnectionID(), user: chat.user && chat.user.id };
  await chat.disconnectUser();
  return result;
}

const scenarios = { connect, refresh, badsig, revoke, live };

(async () => {
  const scenario = scenarios[env('SCENARIO')];
  if (!scenario) throw new Error(`unknown SCENARIO ${process.env.SCENARIO}`);
  const result = await scenario();
  console.log(`RESULT ${JSON.stringify(result)}`);
  process.exit(0);
})().catch((error) => {
  console.error(`FAILED ${error && error.stack ? error.stack : error}`);
  process.exit(1);
});
