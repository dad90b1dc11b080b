//! TLS of the main listener: server configuration with a client-certificate
//! verifier (CA bundle + CRLs), run-time reload, and the participant
//! identity taken from the verified peer certificate.
//!
//! Identity comes from the handshake and nothing else: no header, token or
//! body field can set or override it. One crypto provider (aws-lc-rs) is
//! used everywhere.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::TlsConfig;
use crate::pki::PARTICIPANT_URI_PREFIX;

/// The one crypto provider of the process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process default (for libraries that ask for
/// it). Safe to call more than once.
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Builds the main listener's server configuration. Every problem with the
/// files is reported.
pub fn server_config(cfg: &TlsConfig, production: bool) -> Result<Arc<ServerConfig>, Vec<String>> {
    build(cfg, production, true)
}

/// The public channel's configuration: the same server certificate, no
/// client certificate asked for.
pub fn public_server_config(
    cfg: &TlsConfig,
    production: bool,
) -> Result<Arc<ServerConfig>, Vec<String>> {
    build(cfg, production, false)
}

fn build(
    cfg: &TlsConfig,
    production: bool,
    client_auth: bool,
) -> Result<Arc<ServerConfig>, Vec<String>> {
    let mut errors = Vec::new();
    let mut roots = RootCertStore::empty();
    match CertificateDer::pem_file_iter(&cfg.client_ca) {
        Ok(iter) => {
            for cert in iter {
                match cert {
                    Ok(c) => {
                        if let Err(e) = roots.add(c) {
                            errors.push(format!("tls.client_ca: {}: {e}", cfg.client_ca.display()));
                        }
                    }
                    Err(e) => {
                        errors.push(format!("tls.client_ca: {}: {e}", cfg.client_ca.display()))
                    }
                }
            }
            if roots.is_empty() {
                errors.push(format!(
                    "tls.client_ca: {} holds no certificate",
                    cfg.client_ca.display()
                ));
            }
        }
        Err(e) => errors.push(format!("tls.client_ca: {}: {e}", cfg.client_ca.display())),
    }
    let mut crls = Vec::new();
    for (i, path) in cfg.crls.iter().enumerate() {
        match std::fs::read(path) {
            Ok(bytes) if bytes.starts_with(b"-----") => {
                for crl in CertificateRevocationListDer::pem_slice_iter(&bytes) {
                    match crl {
                        Ok(c) => crls.push(c),
                        Err(e) => errors.push(format!("tls.crls[{i}]: {}: {e}", path.display())),
                    }
                }
            }
            Ok(bytes) => crls.push(CertificateRevocationListDer::from(bytes)),
            Err(e) => errors.push(format!("tls.crls[{i}]: {}: {e}", path.display())),
        }
    }
    let chain: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(&cfg.cert) {
        Ok(iter) => iter
            .filter_map(|c| match c {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.push(format!("tls.cert: {}: {e}", cfg.cert.display()));
                    None
                }
            })
            .collect(),
        Err(e) => {
            errors.push(format!("tls.cert: {}: {e}", cfg.cert.display()));
            vec![]
        }
    };
    let key = match PrivateKeyDer::from_pem_file(&cfg.key) {
        Ok(k) => Some(k),
        Err(e) => {
            errors.push(format!("tls.key: {}: {e}", cfg.key.display()));
            None
        }
    };
    if let Err(e) = check_validity(production, cfg.min_validity_days, "tls.cert", &chain) {
        errors.push(e);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let Some(key) = key else {
        return Err(vec!["tls.key: missing".into()]);
    };
    let provider = provider();
    if !client_auth {
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| vec![format!("tls: {e}")])?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| vec![format!("tls.cert/tls.key: {e}")])?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        return Ok(Arc::new(config));
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        // Revocation is checked for the participant's own certificate;
        // certificates of CAs without a configured CRL are not refused for
        // that reason alone.
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| vec![format!("tls: client verifier: {e}")])?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| vec![format!("tls: {e}")])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| vec![format!("tls.cert/tls.key: {e}")])?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Days before expiry from which a warning is logged at start-up and reload.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Checks the leaf certificate of `chain` (found under config key `key`)
/// for its remaining validity: in production, less than `min_days` left
/// (or already expired) is an error; less than
/// [`EXPIRY_WARNING_DAYS`] (or `min_days`, if larger) is a warning.
pub fn check_validity(
    production: bool,
    min_days: u64,
    key: &str,
    chain: &[CertificateDer<'_>],
) -> Result<(), String> {
    let Some(leaf) = chain.first() else {
        return Err(format!("{key}: holds no certificate"));
    };
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| format!("{key}: not a valid X.509 certificate: {e}"))?;
    let not_after = cert.validity().not_after.timestamp();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let days_left = (not_after - now).div_euclid(86_400);
    let min_days = i64::try_from(min_days).unwrap_or(i64::MAX);
    if production && days_left < min_days {
        return Err(if days_left < 0 {
            format!(
                "{key}: the certificate expired {} day(s) ago; renew it",
                -days_left
            )
        } else {
            format!(
                "{key}: the certificate expires in {days_left} day(s), less than tls.min_validity_days ({min_days}); renew it"
            )
        });
    }
    if days_left < EXPIRY_WARNING_DAYS.max(min_days) {
        tracing::warn!(
            certificate = key,
            days_left,
            "certificate expires soon; renew it and send SIGHUP"
        );
    }
    Ok(())
}

/// The current server configuration, swappable at run time (certificate
/// renewal, new CRLs) without dropping connections.
#[derive(Debug)]
pub struct TlsState {
    current: ArcSwap<ServerConfig>,
    public: ArcSwap<ServerConfig>,
    cfg: TlsConfig,
    /// Production mode: certificates about to expire are refused.
    production: bool,
}

impl TlsState {
    /// Builds the initial configuration.
    pub fn new(cfg: TlsConfig, production: bool) -> Result<TlsState, Vec<String>> {
        let config = server_config(&cfg, production)?;
        Ok(TlsState {
            current: ArcSwap::new(config),
            public: ArcSwap::new(public_server_config(&cfg, production)?),
            cfg,
            production,
        })
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Re-reads certificates, key, CA bundle and CRLs; on error the old
    /// configuration stays in force.
    pub fn reload(&self) -> Result<(), Vec<String>> {
        let config = server_config(&self.cfg, self.production)?;
        let public = public_server_config(&self.cfg, self.production)?;
        self.current.store(config);
        self.public.store(public);
        Ok(())
    }

    /// The public channel's configuration for a new connection.
    pub fn public(&self) -> Arc<ServerConfig> {
        self.public.load_full()
    }

    /// Whether a SAN URI may name the participant.
    pub fn accept_san_uri(&self) -> bool {
        self.cfg.accept_san_uri
    }
}

/// The participant id named by a verified end-entity certificate: the SAN
/// URI `urn:credgate:participant:<id>` when allowed and present, otherwise
/// the subject common name.
pub fn participant_id(cert: &CertificateDer<'_>, accept_san_uri: bool) -> Option<String> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).ok()?;
    if accept_san_uri {
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    if let Some(id) = uri.strip_prefix(PARTICIPANT_URI_PREFIX) {
                        return Some(id.to_owned());
                    }
                }
            }
        }
    }
    let cn = x509.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
