// Certificates for TLS tests, made with openssl: a CA, a server certificate, a client certificate and a router
// certificate (both usages: routers are each other's servers and clients) (CN and SAN localhost / 127.0.0.1), in the
// file names gnutls clients expect (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem,
// router-cert.pem, router-key.pem).

import Foundation

public enum TestCertificates {
    @discardableResult
    public static func make(in directory: String) throws -> ProcessResult {
        let script = """
            set -e
            cd '\(directory)'
            openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 30 -subj /CN=vd-test-ca \\
              -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
            for who in server client router; do
              openssl req -newkey rsa:2048 -nodes -keyout $who-key.pem -out $who.csr -subj /CN=localhost 2>/dev/null
              usage=serverAuth; [ $who = client ] && usage=clientAuth; [ $who = router ] && usage=serverAuth,clientAuth
              printf "subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=$usage\\nkeyUsage=critical,digitalSignature,keyEncipherment\\nbasicConstraints=CA:FALSE\\n" > $who.ext
              openssl x509 -req -in $who.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out $who-cert.pem -days 30 \\
                -extfile $who.ext 2>/dev/null
            done
            """
        return try ProcessRunner.run("/bin/bash", ["-c", script])
    }
}
