// TLS for the cluster API (`[cluster] tls_certificate`, `tls_key`, `tls_ca`): the server presents its certificate;
// clients (other routers, remote CLIs) verify it against the cluster's CA. With a CA configured on the server, clients
// must present a certificate the CA signed too (mutual TLS), on top of the shared token. Host names are not checked:
// a certificate the cluster's own CA signed is what identifies a router (addresses in node records are often IPs).

import NIOCore
package import NIOSSL
package import VolumeCore

package struct ClusterTLS: Sendable, Hashable {
    /// PEM files: this router's certificate chain and key (for serving, and for client certificates).
    package var certificatePath: String?
    package var keyPath: String?
    /// The cluster's CA (PEM): what servers are verified against, and what client certificates must chain to.
    package var caPath: String?

    package init(certificatePath: String? = nil, keyPath: String? = nil, caPath: String? = nil) {
        self.certificatePath = certificatePath
        self.keyPath = keyPath
        self.caPath = caPath
    }

    private func chainAndKey() throws -> ([NIOSSLCertificateSource], NIOSSLPrivateKeySource)? {
        guard let certificatePath, let keyPath else { return nil }
        let chain = try NIOSSLCertificate.fromPEMFile(certificatePath).map { NIOSSLCertificateSource.certificate($0) }
        guard !chain.isEmpty else { throw VDError(.configuration, "\(certificatePath) holds no certificate") }
        return (chain, .privateKey(try NIOSSLPrivateKey(file: keyPath, format: .pem)))
    }

    /// The server's context: needs a certificate and key; with a CA, client certificates are required.
    package func makeServerContext() throws(VDError) -> NIOSSLContext {
        do {
            guard let (chain, key) = try chainAndKey() else {
                throw VDError(.configuration, "cluster TLS needs tls_certificate and tls_key")
            }
            var tls = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: key)
            tls.minimumTLSVersion = .tlsv12
            if let caPath {
                tls.certificateVerification = .noHostnameVerification
                tls.trustRoots = .file(caPath)
            }
            return try NIOSSLContext(configuration: tls)
        } catch let error as VDError {
            throw error
        } catch {
            throw VDError(.configuration, "cluster TLS: cannot load \(files): \(error)")
        }
    }

    /// A client's context: verifies the server against the CA; presents this router's certificate if it has one.
    package func makeClientContext() throws(VDError) -> NIOSSLContext {
        do {
            guard let caPath else { throw VDError(.configuration, "cluster TLS needs tls_ca to verify routers") }
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.minimumTLSVersion = .tlsv12
            tls.trustRoots = .file(caPath)
            tls.certificateVerification = .noHostnameVerification
            if let (chain, key) = try chainAndKey() {
                tls.certificateChain = chain
                tls.privateKey = key
            }
            return try NIOSSLContext(configuration: tls)
        } catch let error as VDError {
            throw error
        } catch {
            throw VDError(.configuration, "cluster TLS: cannot load \(files): \(error)")
        }
    }

    private var files: String {
        [certificatePath, keyPath, caPath].compactMap { $0 }.joined(separator: ", ")
    }
}
