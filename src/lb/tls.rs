//! TLS for `https` health checks: rustls with the ring provider.
//!
//! Without `caFile` the backend's certificate is not verified (as HAProxy's `verify none` in
//! kubeadm's HA guide): the check asks "is this API server ready", not "is it who it says",
//! and the proxied traffic is verified end to end by the clients anyway. The handshake's
//! signatures are still checked, so a peer without the certificate's key fails. With `caFile`
//! the certificate must chain to one of the file's CAs and name the backend's IP address.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{self, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The TLS client settings of one load balancer's checks.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let config = match ca_file {
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("caFile {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("caFile {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("caFile {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "caFile {}: no certificate in the file",
                    path.display()
                ));
            }
            let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("caFile {}: {e}", path.display()))?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// Accepts any certificate, but still checks the handshake's signatures with it.
struct NoVerify(WebPkiSupportedAlgorithms);

impl fmt::Debug for NoVerify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NoVerify")
    }
}

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_ca_file_says_why() {
        let e = client_config(Some(Path::new("/nonexistent/ca.pem"))).expect_err("missing");
        assert!(e.starts_with("caFile /nonexistent/ca.pem:"), "{e}");
        let dir = std::env::temp_dir().join(format!("kv-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let e = client_config(Some(&empty)).expect_err("no certs");
        assert!(e.contains("no certificate in the file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(client_config(None).is_ok());
    }
}
