// A legacy Node.js app with a WRONG database password (mysql2), for tests/mysql/test_e2e.py.
// Connects to MYSQL_HOST:MYSQL_PORT as MYSQL_USER with MYSQL_PASSWORD, prints one JSON line.
import fs from "node:fs";
import mysql from "mysql2/promise";

const config = {
  host: process.env.MYSQL_HOST,
  port: Number(process.env.MYSQL_PORT),
  user: process.env.MYSQL_USER,
  password: process.env.MYSQL_PASSWORD,
  database: process.env.MYSQL_DATABASE,
  connectTimeout: 10000,
};
if (process.env.MYSQL_SSL_CA) {
  // keyless' CA; its leaf names the Azure server, not 127.0.0.1: the chain is verified
  config.ssl = { ca: fs.readFileSync(process.env.MYSQL_SSL_CA), checkServerIdentity: () => undefined };
}

async function main() {
  const result = {};
  const connection = await mysql.createConnection(config);
  await connection.query("DROP TABLE IF EXISTS node_items");
  await connection.query("CREATE TABLE node_items (id INT PRIMARY KEY, name VARCHAR(64))");
  const rows = Array.from({ length: 1000 }, (_, i) => [i, `item-${i}`]);
  await connection.query("INSERT INTO node_items (id, name) VALUES ?", [rows]);
  const [count] = await connection.query("SELECT COUNT(*) AS n, SUM(id) AS total FROM node_items");
  result.count = Number(count[0].n);
  result.total = Number(count[0].total);
  // a server-side prepared statement (COM_STMT_PREPARE / COM_STMT_EXECUTE, binary rows)
  const [prepared] = await connection.execute(
    "SELECT id, name FROM node_items WHERE id BETWEEN ? AND ? ORDER BY id", [10, 14]);
  result.prepared = prepared.map((row) => [row.id, row.name]);
  result.app_tls = connection.connection.stream.encrypted === true;
  const [cipher] = await connection.query("SHOW STATUS LIKE 'Ssl_cipher'");
  result.ssl_cipher = cipher[0].Value;
  const [who] = await connection.query("SELECT CURRENT_USER() AS who");
  result.current_user = who[0].who;
  await connection.end();

  const pool = mysql.createPool({ ...config, connectionLimit: 20, waitForConnections: true });
  const ids = await Promise.all(Array.from({ length: 40 }, async () => {
    const [r] = await pool.query("SELECT CONNECTION_ID() AS id, SLEEP(0.05) AS s");
    return Number(r[0].id);
  }));
  result.pool_connections = new Set(ids).size;
  result.pool_queries = ids.length;
  await pool.end();
  console.log(JSON.stringify(result));
}

main().catch((error) => {
  console.log(JSON.stringify({ error: String(error.message), code: error.code ?? null,
                               errno: error.errno ?? null }));
  process.exitCode = 1;
});
