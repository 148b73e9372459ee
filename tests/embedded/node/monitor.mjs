// Keep a Node.js `mongodb` client connected while its monitor streams awaitable hellos
// (exhaustAllowed), and report every heartbeat failure and topology change.
//
// Usage: node monitor.mjs <mongodb-uri> <awaited-heartbeats>
// Resolves the driver from $PLUGIN_HOST_NODE_PREFIX/node_modules. Prints one JSON line:
// {awaited, failures, topologyTypes, ping}.
import { createRequire } from 'node:module';
import { join } from 'node:path';

const prefix = process.env.PLUGIN_HOST_NODE_PREFIX;
if (!prefix) throw new Error('set PLUGIN_HOST_NODE_PREFIX to the npm --prefix directory');
const require = createRequire(join(prefix, 'package.json'));
const { MongoClient } = require('mongodb');

const [uri, wanted] = process.argv.slice(2);
const target = Number(wanted);
// 500 ms is the driver's minimum heartbeatFrequencyMS: the monitor's awaitable hello waits that long.
const client = new MongoClient(uri, { serverSelectionTimeoutMS: 10000, heartbeatFrequencyMS: 500 });
const failures = [];
const topologyTypes = [];
let awaited = 0;
const enough = new Promise((resolve) => {
  client.on('serverHeartbeatSucceeded', (event) => {
    if (event.awaited) awaited += 1;
    if (awaited >= target) resolve('awaited');
  });
  client.on('serverHeartbeatFailed', (event) => failures.push(String(event.failure)));
  client.on('topologyDescriptionChanged', (event) => topologyTypes.push(event.newDescription.type));
});
const deadline = new Promise((resolve) => {
  setTimeout(() => resolve('deadline'), 20000).unref();
});
try {
  await client.connect();
  const outcome = await Promise.race([enough, deadline]);
  const ping = await client.db('admin').command({ ping: 1 });
  process.stdout.write(`${JSON.stringify({ outcome, awaited, failures, topologyTypes, ping: ping.ok })}\n`);
} finally {
  await client.close();
}
