//! TLS material (rustls with the ring provider): PEM certificates and keys, root stores and
//! client connectors, with a client certificate for mutual TLS when asked.

use std::{path::Path, sync::Arc};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use tokio_rustls::TlsConnector;

use super::NetError;

/// A client certificate chain and its private key (PEM files), for mutual TLS.
#[derive(Debug, Clone, Copy)]
pub struct ClientIdentity<'a> {
    pub cert_file: &'a Path,
    pub key_file: &'a Path,
}

/// Reads a PEM certificate chain (at least one certificate).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| NetError::Tls(format!("reading {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NetError::Tls(format!("reading {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(NetError::Tls(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, NetError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| NetError::Tls(format!("reading the private key {}: {e}", path.display())))
}

/// The CAs in `ca_file` (PEM, one or more), else the system's roots.
pub fn root_store(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, NetError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|e| {
                    NetError::Tls(format!("certificate in {}: {e}", path.display()))
                })?;
            }
        }
        None => {
            // Unreadable system certificates are skipped: the ones that load still verify.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(NetError::Tls(
                    "no system CA certificates found; set ca_file".into(),
                ));
            }
        }
    }
    Ok(roots)
}

/// A connector trusting `ca_file` (else the system roots), presenting `identity` when the
/// server asks for a certificate.
pub fn connector(
    ca_file: Option<&Path>,
    identity: Option<ClientIdentity<'_>>,
) -> Result<TlsConnector, NetError> {
    Ok(TlsConnector::from(Arc::new(client_config(
        ca_file, identity,
    )?)))
}

/// The client configuration [`connector`] uses (also handed to the NATS client, so that it
/// verifies servers with the same provider, roots and client certificate).
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<ClientIdentity<'_>>,
) -> Result<rustls::ClientConfig, NetError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_root_certificates(root_store(ca_file)?);
    let config = match identity {
        Some(id) => config
            .with_client_auth_cert(read_certs(id.cert_file)?, read_key(id.key_file)?)
            .map_err(|e| {
                NetError::Tls(format!(
                    "client certificate {} / key {}: {e}",
                    id.cert_file.display(),
                    id.key_file.display()
                ))
            })?,
        None => config.with_no_client_auth(),
    };
    Ok(config)
}

/// The name (or IP address) the peer's certificate must carry.
pub fn server_name(name: &str) -> Result<ServerName<'static>, NetError> {
    ServerName::try_from(name.to_owned())
        .map_err(|e| NetError::Tls(format!("`{name}` is not a valid TLS server name: {e}")))
}
