// Connect to 127.0.0.1:PORT over TLS as HOST, trusting only CA_FILE; send GET / and print the answer's status line.
// Exit 0 when the handshake (chain and host name checks) succeeds, 1 otherwise.
"use strict";
const fs = require("fs");
const tls = require("tls");

const [host, port, caFile] = process.argv.slice(2);
const socket = tls.connect({
  host: "127.0.0.1", port: Number(port), servername: host, ca: fs.readFileSync(caFile),
  checkServerIdentity: (_, cert) => tls.checkServerIdentity(host, cert),
});
socket.setTimeout(10000, () => { console.log("REJECTED timeout"); process.exit(1); });
socket.on("secureConnect", () => {
  socket.write(`GET / HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`);
  socket.once("data", (data) => {
    console.log("ACCEPTED " + data.toString().split("\r\n")[0]);
    socket.destroy();
    process.exit(0);
  });
});
socket.on("error", (err) => { console.log("REJECTED " + (err.code || "") + " " + err.message); process.exit(1); });
