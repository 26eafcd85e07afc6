//! Optional TLS for every gRPC server and client (rustls, ring).
//!
//! - A server with a certificate and key (`CREDITS_TLS_CERT`, `CREDITS_TLS_KEY`) serves
//!   TLS only; given a CA too (`CREDITS_TLS_CA`), it requires a client certificate signed
//!   by it (mutual TLS).
//! - A client with a CA verifies servers against it (peer URLs are then `https://`), and
//!   presents its own certificate and key when it has them (for a server that requires
//!   mutual TLS): the daemons use the same three files for both sides.
//!
//! Files are read once, at start; a missing or unreadable file stops start-up naming the
//! setting.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Where the PEM files are; all `None` is plaintext.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) this daemon serves gRPC with, and presents to peers that
    /// require mutual TLS.
    #[arg(long, env = "CREDITS_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `CREDITS_TLS_CERT`.
    #[arg(long, env = "CREDITS_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate: peers are verified against it, and clients of this daemon must
    /// present a certificate it signed (mutual TLS).
    #[arg(long, env = "CREDITS_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
}

impl From<&TlsArgs> for Tls {
    fn from(a: &TlsArgs) -> Self {
        Tls {
            cert: a.tls_cert.clone(),
            key: a.tls_key.clone(),
            ca: a.tls_ca.clone(),
        }
    }
}

fn read(setting: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{setting} {}: {e}", path.display()))
}

impl Tls {
    pub fn is_off(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.ca.is_none()
    }

    fn identity(&self) -> anyhow::Result<Option<Identity>> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some(Identity::from_pem(
                read("CREDITS_TLS_CERT", c)?,
                read("CREDITS_TLS_KEY", k)?,
            ))),
            (None, None) => Ok(None),
            _ => anyhow::bail!(
                "CREDITS_TLS_CERT and CREDITS_TLS_KEY go together: set both or neither"
            ),
        }
    }

    fn ca_certificate(&self) -> anyhow::Result<Option<Certificate>> {
        self.ca
            .as_deref()
            .map(|p| read("CREDITS_TLS_CA", p).map(Certificate::from_pem))
            .transpose()
    }

    /// The server side: `None` without a certificate.
    pub fn server(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let Some(identity) = self.identity()? else {
            if self.ca.is_some() {
                anyhow::bail!(
                    "CREDITS_TLS_CA without CREDITS_TLS_CERT/KEY: a server needs its own certificate to serve TLS"
                );
            }
            return Ok(None);
        };
        let mut cfg = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = self.ca_certificate()? {
            cfg = cfg.client_ca_root(ca);
        }
        Ok(Some(cfg))
    }

    /// The client side: `None` without a CA (plaintext, or the system's roots are not
    /// used: peers are private).
    pub fn client(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        let Some(ca) = self.ca_certificate()? else {
            return Ok(None);
        };
        let mut cfg = ClientTlsConfig::new().ca_certificate(ca);
        if let Some(identity) = self.identity()? {
            cfg = cfg.identity(identity);
        }
        Ok(Some(cfg))
    }
}
