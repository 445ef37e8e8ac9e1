// A "legacy" Node.js app: @azure/storage-blob with an account-key connection string, unchanged.
//
// It knows nothing about keyless. Everything keyless needs comes from the environment that
// any Node.js process honours without code:
//   HTTPS_PROXY           read by @azure/core-rest-pipeline (getDefaultProxySettings, called by
//                         BlobServiceClient.fromConnectionString; the proxyPolicy tunnels with
//                         CONNECT through https-proxy-agent)
//   NODE_EXTRA_CA_CERTS   read by Node.js itself at start-up: keyless' CA joins the root store
//
// Input:  AZURE_STORAGE_CONNECTION_STRING, BLOB_SIZE (bytes, default 3 MiB + 17).
// Output: one JSON line on stdout; exit code 0 on success, 1 on a refusal or any error.
import { createHash, randomBytes, randomUUID } from "node:crypto";

import { BlobServiceClient } from "@azure/storage-blob";

const sha256 = (data) => createHash("sha256").update(data).digest("hex");

async function main() {
  const service = BlobServiceClient.fromConnectionString(
    process.env.AZURE_STORAGE_CONNECTION_STRING,
  );
  const container = service.getContainerClient(`node-${randomUUID().slice(0, 12)}`);
  await container.create();

  const payload = randomBytes(Number(process.env.BLOB_SIZE || 3 * 1024 * 1024 + 17));
  const blob = container.getBlockBlobClient("payload.bin");
  await blob.uploadData(payload);
  const downloaded = await blob.downloadToBuffer();

  const listed = [];
  for await (const item of container.listBlobsFlat()) listed.push(item.name);
  await blob.delete();
  const afterDelete = [];
  for await (const item of container.listBlobsFlat()) afterDelete.push(item.name);
  await container.delete();

  return {
    ok: true,
    container: container.containerName,
    size: payload.length,
    uploadedSha256: sha256(payload),
    downloadedSha256: sha256(downloaded),
    listed,
    afterDelete,
  };
}

try {
  console.log(JSON.stringify(await main()));
} catch (error) {
  console.log(JSON.stringify({
    ok: false,
    status: error.statusCode ?? null,
    code: error.code ?? error.details?.errorCode ?? null,
    message: String(error.message ?? error).split("\n")[0],
  }));
  process.exitCode = 1;
}
