//! The coordinator's TLS: a certificate chain and key read from PEM files, swapped in place on
//! SIGHUP (connections being set up keep the configuration they started with).

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("TLS {file}: {message}")]
pub struct TlsError {
    /// The file.
    pub file: String,
    /// What is wrong.
    pub message: String,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    // Certificates and keys are small: a path to a device or a FIFO is an error, not a hang.
    drover_desired::file::read_capped(path, 1 << 20).map_err(|e| TlsError {
        file: path.display().to_string(),
        message: format!("cannot read it: {e}"),
    })
}

/// A server configuration from `files`. The key must not be readable by others.
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |p: &Path, m: String| TlsError {
        file: p.display().to_string(),
        message: m,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&files.cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| fail(&files.cert, format!("not a PEM certificate chain ({e:?})")))?;
    if certs.is_empty() {
        return Err(fail(&files.cert, "holds no PEM certificate".into()));
    }
    let mode = std::fs::metadata(&files.key)
        .map_err(|e| fail(&files.key, format!("cannot read it: {e}")))?
        .permissions()
        .mode();
    if mode & 0o007 != 0 {
        return Err(fail(
            &files.key,
            format!(
                "the private key is readable by every user (mode {:o}); chmod 600 it (or 640 with the drover group)",
                mode & 0o777
            ),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|e| fail(&files.key, format!("not a PEM private key ({e:?})")))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(&files.cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            fail(
                &files.key,
                format!("does not go with the certificate ({e})"),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The configuration in use, replaced on reload.
#[derive(Clone)]
pub struct TlsSlot(Arc<RwLock<Arc<ServerConfig>>>);

impl TlsSlot {
    /// A slot holding `config`.
    pub fn new(config: Arc<ServerConfig>) -> TlsSlot {
        TlsSlot(Arc::new(RwLock::new(config)))
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swaps in a new configuration.
    pub fn set(&self, config: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = config;
    }
}
