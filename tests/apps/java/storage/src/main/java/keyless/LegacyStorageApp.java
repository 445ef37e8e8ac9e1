package keyless;

import com.azure.core.util.BinaryData;
import com.azure.core.util.Context;
import com.azure.storage.blob.BlobClient;
import com.azure.storage.blob.BlobClientBuilder;
import com.azure.storage.blob.BlobContainerClient;
import com.azure.storage.blob.BlobServiceClient;
import com.azure.storage.blob.BlobServiceClientBuilder;
import com.azure.storage.blob.models.BlobItem;
import com.azure.storage.blob.models.BlobStorageException;
import com.azure.storage.blob.models.ParallelTransferOptions;
import com.azure.storage.blob.options.BlobParallelUploadOptions;
import com.azure.storage.common.policy.RequestRetryOptions;
import com.azure.storage.common.policy.RetryPolicyType;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.SecureRandom;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.UUID;

/**
 * A "legacy" Java app: azure-storage-blob with an account-key connection string, unchanged.
 *
 * <p>It knows nothing about keyless. Whatever routes it (a proxy, a truststore) comes from its
 * environment or JVM options (JAVA_TOOL_OPTIONS), never from this code; it builds its clients
 * with the SDK's defaults, so azure-core picks the HTTP client (the plug-in that its
 * AZURE_HTTP_CLIENT_IMPLEMENTATION names, else the first on the classpath) and reads the proxy
 * configuration itself. It reports the client class it got.
 *
 * <p>Input: AZURE_STORAGE_CONNECTION_STRING, BLOB_SIZE (bytes, default 8 MiB + 17),
 * SAS_SIGNATURE (the bogus {@code sig} of the SAS URL it reads with). Output: one JSON line on
 * stdout; exit code 0 on success, 1 on a refusal or any error.
 */
public final class LegacyStorageApp {
    private static final int BLOCK_SIZE = 4 * 1024 * 1024;

    public static void main(String[] args) {
        Map<String, Object> result = new LinkedHashMap<>();
        int exit = 0;
        try {
            run(result);
            result.put("ok", true);
        } catch (Throwable error) {
            result.put("ok", false);
            describe(error, result);
            exit = 1;
        }
        System.out.println(toJson(result));
        System.out.flush();
        System.exit(exit);
    }

    private static void run(Map<String, Object> result) throws Exception {
        // No retries: a connection keyless dropped or a request it mangled shows, not hidden.
        RequestRetryOptions once = new RequestRetryOptions(RetryPolicyType.FIXED, 1, (Integer) null,
                (Long) null, (Long) null, null);
        BlobServiceClient service = new BlobServiceClientBuilder()
                .connectionString(System.getenv("AZURE_STORAGE_CONNECTION_STRING"))
                .retryOptions(once)
                .buildClient();
        result.put("httpClient", service.getHttpPipeline().getHttpClient().getClass().getName());
        result.put("step", "create");
        BlobContainerClient container = service.getBlobContainerClient(
                "java-" + UUID.randomUUID().toString().substring(0, 12));
        container.create();
        result.put("container", container.getBlobContainerName());

        String size = System.getenv("BLOB_SIZE");
        byte[] payload = new byte[size == null ? 8 * 1024 * 1024 + 17 : Integer.parseInt(size)];
        new SecureRandom().nextBytes(payload);
        BlobClient blob = container.getBlobClient("payload.bin");
        // Blocks of 4 MiB: the payload goes up as staged blocks and a block list commit.
        ParallelTransferOptions blocks = new ParallelTransferOptions()
                .setBlockSizeLong((long) BLOCK_SIZE)
                .setMaxSingleUploadSizeLong((long) BLOCK_SIZE)
                .setMaxConcurrency(2);
        result.put("step", "upload");
        blob.uploadWithResponse(new BlobParallelUploadOptions(BinaryData.fromBytes(payload))
                .setParallelTransferOptions(blocks), null, Context.NONE);
        result.put("step", "download");
        byte[] downloaded = blob.downloadContent().toBytes();
        result.put("size", payload.length);
        result.put("uploadedSha256", sha256(payload));
        result.put("downloadedSha256", sha256(downloaded));
        result.put("blockCount", blob.getBlockBlobClient()
                .listBlocks(com.azure.storage.blob.models.BlockListType.COMMITTED)
                .getCommittedBlocks().size());

        // A SAS URL with a signature that is no signature at all: only keyless can make it work.
        result.put("step", "sas");
        byte[] note = "read through a SAS URL".getBytes(StandardCharsets.UTF_8);
        container.getBlobClient("sas.txt").upload(BinaryData.fromBytes(note));
        String sasUrl = container.getBlobClient("sas.txt").getBlobUrl()
                + "?sv=2021-08-06&ss=b&srt=o&sp=r&se=2099-01-01T00%3A00%3A00Z&spr=https,http"
                + "&sig=" + System.getenv().getOrDefault("SAS_SIGNATURE", "bm90LWEtc2lnbmF0dXJl");
        BlobClient viaSas = new BlobClientBuilder().endpoint(sasUrl).retryOptions(once)
                .buildClient();
        result.put("sasRead", new String(viaSas.downloadContent().toBytes(),
                StandardCharsets.UTF_8));

        result.put("step", "list");
        result.put("listed", names(container));
        blob.delete();
        container.getBlobClient("sas.txt").delete();
        result.put("afterDelete", names(container));
        container.delete();
        result.remove("step");
    }

    private static List<String> names(BlobContainerClient container) {
        List<String> names = new ArrayList<>();
        for (BlobItem item : container.listBlobs()) {
            names.add(item.getName());
        }
        return names;
    }

    private static String sha256(byte[] data) throws Exception {
        return HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(data));
    }

    /** status/code of a service refusal; else the exception chain's kinds (TLS, DNS, ...). */
    private static void describe(Throwable error, Map<String, Object> result) {
        if (error instanceof BlobStorageException refused) {
            result.put("status", refused.getStatusCode());
            result.put("code", refused.getErrorCode() == null ? null
                    : refused.getErrorCode().toString());
        } else {
            result.put("status", null);
            result.put("code", error.getClass().getSimpleName());
        }
        List<String> chain = new ArrayList<>();
        for (Throwable cause = error; cause != null && chain.size() < 8;
                cause = cause.getCause()) {
            chain.add(cause.getClass().getName());
        }
        result.put("causes", chain);
        String message = String.valueOf(error.getMessage());
        result.put("message", message.lines().findFirst().orElse(""));
    }

    // -- a JSON writer for strings, numbers, booleans, null and lists of those ------------

    private static String toJson(Object value) {
        if (value == null) {
            return "null";
        }
        if (value instanceof Map<?, ?> map) {
            StringBuilder out = new StringBuilder("{");
            for (Map.Entry<?, ?> entry : map.entrySet()) {
                if (out.length() > 1) {
                    out.append(',');
                }
                out.append(toJson(String.valueOf(entry.getKey()))).append(':')
                        .append(toJson(entry.getValue()));
            }
            return out.append('}').toString();
        }
        if (value instanceof List<?> list) {
            StringBuilder out = new StringBuilder("[");
            for (Object item : list) {
                if (out.length() > 1) {
                    out.append(',');
                }
                out.append(toJson(item));
            }
            return out.append(']').toString();
        }
        if (value instanceof Number || value instanceof Boolean) {
            return value.toString();
        }
        StringBuilder out = new StringBuilder("\"");
        for (char c : value.toString().toCharArray()) {
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                default -> {
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        return out.append('"').toString();
    }
}
