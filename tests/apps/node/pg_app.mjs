// A legacy node-postgres app: connects with the PG* environment variables (a password from
// its config), runs DDL, a bulk insert and read-back, a prepared statement and a pool of
// POOL concurrent connections, then prints one JSON line of what it saw.
import pg from "pg";

const rows = Number(process.env.ROWS ?? "1000");
const poolSize = Number(process.env.POOL ?? "20");

const client = new pg.Client({ connectionTimeoutMillis: 10000 });
await client.connect();
const who = await client.query(
  "SELECT current_user AS user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()");
await client.query("DROP TABLE IF EXISTS node_items");
await client.query("CREATE TABLE node_items (id int PRIMARY KEY, name text NOT NULL)");
await client.query(
  "INSERT INTO node_items SELECT i, 'row-' || i FROM unnest($1::int[]) AS i",
  [Array.from({ length: rows }, (_, i) => i)]);
const readBack = await client.query("SELECT id, name FROM node_items ORDER BY id");
const intact = readBack.rows.every((row, i) => row.id === i && row.name === `row-${i}`);
const sum = readBack.rows.reduce((total, row) => total + row.id, 0);
// a named (server-side) prepared statement, executed three times
const prepared = [];
for (const id of [7, 70, 700]) {
  const result = await client.query({ name: "by-id", text: "SELECT name FROM node_items WHERE id = $1", values: [id] });
  prepared.push(result.rows[0]?.name ?? null);
}
await client.query("DROP TABLE node_items");
await client.end();

const pool = new pg.Pool({ max: poolSize, connectionTimeoutMillis: 10000 });
const held = await Promise.all(Array.from({ length: poolSize }, () => pool.connect()));
const pids = await Promise.all(held.map(async (c) => (await c.query("SELECT pg_backend_pid() AS pid")).rows[0].pid));
held.forEach((c) => c.release());
await pool.end();

console.log(JSON.stringify({
  user: who.rows[0].user, ssl_upstream: who.rows[0].ssl, rows: intact ? readBack.rows.length : -1,
  sum, prepared, pool: held.length, pool_backends: new Set(pids).size,
}));
