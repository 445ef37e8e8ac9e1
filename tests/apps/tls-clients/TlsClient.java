// Connect to 127.0.0.1:PORT over TLS as HOST, trusting only CA_FILE; send GET / and print
// the answer's status line. Exit 0 when the handshake (PKIX path with name constraints,
// HTTPS host name check) succeeds, 1 otherwise.
import java.io.BufferedReader;
import java.io.FileInputStream;
import java.io.InputStreamReader;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.security.KeyStore;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManagerFactory;

public class TlsClient {
    public static void main(String[] args) throws Exception {
        String host = args[0];
        int port = Integer.parseInt(args[1]);
        X509Certificate ca;
        try (FileInputStream in = new FileInputStream(args[2])) {
            ca = (X509Certificate) CertificateFactory.getInstance("X.509").generateCertificate(in);
        }
        KeyStore trust = KeyStore.getInstance(KeyStore.getDefaultType());
        trust.load(null, null);
        trust.setCertificateEntry("ca", ca);
        TrustManagerFactory tmf = TrustManagerFactory.getInstance("PKIX");
        tmf.init(trust);
        SSLContext context = SSLContext.getInstance("TLS");
        context.init(null, tmf.getTrustManagers(), null);
        try (Socket plain = new Socket()) {
            plain.connect(new InetSocketAddress("127.0.0.1", port), 10000);
            plain.setSoTimeout(10000);
            SSLSocket socket = (SSLSocket) context.getSocketFactory()
                .createSocket(plain, host, port, true);
            SSLParameters params = socket.getSSLParameters();
            params.setEndpointIdentificationAlgorithm("HTTPS");
            socket.setSSLParameters(params);
            socket.startHandshake();
            socket.getOutputStream().write(("GET / HTTP/1.1\r\nHost: " + host
                + "\r\nConnection: close\r\n\r\n").getBytes(StandardCharsets.US_ASCII));
            socket.getOutputStream().flush();
            BufferedReader reader = new BufferedReader(
                new InputStreamReader(socket.getInputStream(), StandardCharsets.US_ASCII));
            System.out.println("ACCEPTED " + reader.readLine());
            socket.close();
        } catch (Exception e) {
            Throwable root = e;
            StringBuilder chain = new StringBuilder();
            while (root != null) {
                chain.append(" | ").append(root);
                root = root.getCause();
            }
            System.out.println("REJECTED" + chain);
            System.exit(1);
        }
    }
}
