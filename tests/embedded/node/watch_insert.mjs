// Drive the embedded server with the Node.js `mongodb` driver: a change stream with
// fullDocument: 'updateLookup', inserts, an update, a delete, then CRUD and a unique index.
//
// Usage: node watch_insert.mjs <mongodb-uri> <database>
// The driver is resolved from $PLUGIN_HOST_NODE_PREFIX/node_modules (tests/.node), as ESM
// ignores NODE_PATH. Prints one JSON line per change event ({kind: "event", event}) and per
// CRUD result ({kind: "result", op, ...}), in relaxed Extended JSON.
import { createRequire } from 'node:module';
import { join } from 'node:path';

const prefix = process.env.PLUGIN_HOST_NODE_PREFIX;
if (!prefix) throw new Error('set PLUGIN_HOST_NODE_PREFIX to the npm --prefix directory');
const require = createRequire(join(prefix, 'package.json'));
const { MongoClient, BSON } = require('mongodb');

const [uri, dbName] = process.argv.slice(2);
const emit = (doc) => process.stdout.write(`${BSON.EJSON.stringify(doc, { relaxed: true })}\n`);

const client = new MongoClient(uri, { serverSelectionTimeoutMS: 10000 });
try {
  await client.connect();
  const coll = client.db(dbName).collection('items');

  // watch() is lazy in the Node driver: tryNext() sends the aggregate (and one short getMore),
  // so the stream is open before the first write.
  const stream = coll.watch([], { fullDocument: 'updateLookup', maxAwaitTimeMS: 200 });
  const none = await stream.tryNext();
  emit({ kind: 'result', op: 'tryNext', value: none });

  const one = await coll.insertOne({ _id: 1, name: 'a', n: 1 });
  emit({ kind: 'result', op: 'insertOne', acknowledged: one.acknowledged, insertedId: one.insertedId });
  const many = await coll.insertMany([
    { _id: 2, name: 'b', n: 2 },
    { _id: 3, name: 'c', n: 3 },
  ]);
  emit({ kind: 'result', op: 'insertMany', insertedCount: many.insertedCount });
  const upd = await coll.updateOne({ _id: 1 }, { $set: { n: 10, tags: ['x'] }, $unset: { name: '' } });
  emit({ kind: 'result', op: 'updateOne', matchedCount: upd.matchedCount, modifiedCount: upd.modifiedCount });
  const del = await coll.deleteOne({ _id: 3 });
  emit({ kind: 'result', op: 'deleteOne', deletedCount: del.deletedCount });

  for (let i = 0; i < 5; i += 1) {
    const event = await stream.next();
    emit({ kind: 'event', event });
  }
  emit({ kind: 'result', op: 'resumeToken', hasToken: stream.resumeToken != null });
  await stream.close();

  emit({ kind: 'result', op: 'find', docs: await coll.find({}).sort({ _id: 1 }).toArray() });
  emit({ kind: 'result', op: 'countDocuments', n: await coll.countDocuments({}) });
  emit({ kind: 'result', op: 'countDocumentsFiltered', n: await coll.countDocuments({ n: { $gte: 5 } }) });
  emit({ kind: 'result', op: 'estimatedDocumentCount', n: await coll.estimatedDocumentCount() });
  const after = await coll.findOneAndUpdate({ _id: 2 }, { $inc: { n: 1 } }, { returnDocument: 'after' });
  emit({ kind: 'result', op: 'findOneAndUpdate', value: after });
  emit({ kind: 'result', op: 'createIndex', name: await coll.createIndex({ name: 1 }, { unique: true }) });
  try {
    await coll.insertOne({ _id: 4, name: 'b' });
    emit({ kind: 'result', op: 'duplicate', code: null });
  } catch (err) {
    emit({ kind: 'result', op: 'duplicate', code: err.code, errorName: err.name, keyValue: err.keyValue ?? null });
  }
  const indexes = await coll.listIndexes().toArray();
  emit({ kind: 'result', op: 'listIndexes', names: indexes.map((ix) => ix.name).sort() });
  const colls = await client.db(dbName).listCollections().toArray();
  emit({ kind: 'result', op: 'listCollections', names: colls.map((c) => c.name) });
  const dbs = await client.db('admin').admin().listDatabases();
  emit({ kind: 'result', op: 'listDatabases', names: dbs.databases.map((d) => d.name) });
  await client.db(dbName).dropDatabase();
} finally {
  await client.close();
}
