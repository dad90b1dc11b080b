//! Development PKI (rcgen): a dev CA, a server certificate for
//! `localhost`/`127.0.0.1`, one client certificate per participant, and CRLs.
//!
//! For development and tests only. Production certificates come from the
//! province's CA (see `certs/README.md`); nothing here is used when
//! `mode = "production"`.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// SAN URI prefix that names a participant.
pub const PARTICIPANT_URI_PREFIX: &str = "urn:credgate:participant:";

/// Errors of certificate generation and file handling.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File at fault.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A PKCS#12 bundle could not be made.
    #[error("PKCS#12 bundle {path}: {reason}")]
    Bundle {
        /// Bundle at fault.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// The password of the development PKCS#12 bundles (`<id>.p12`), which
/// browsers and key stores ask for on import (some refuse an empty one).
pub const DEV_P12_PASSWORD: &str = "credgate";

/// Writes `out`: a PKCS#12 bundle of a certificate, its PKCS#8 key and the
/// CA certificate, for importing a participant's identity into a browser
/// (PBES2 with AES-256 and an HMAC-SHA-256 MAC, as OpenSSL 3 writes).
pub fn write_p12(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    alias: &str,
    password: &str,
    out: &Path,
) -> Result<(), PkiError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
    let fail = |reason: String| PkiError::Bundle {
        path: out.to_owned(),
        reason,
    };
    let der = |pem: &str| {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| fail(format!("certificate: {e}")))
            .and_then(|d| {
                p12_keystore::Certificate::from_der(d.as_ref())
                    .map_err(|e| fail(format!("certificate: {e}")))
            })
    };
    let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| fail(format!("key: {e}")))?;
    let key = p12_keystore::PrivateKey::from_der(key.secret_pkcs8_der())
        .map_err(|e| fail(format!("key: {e}")))?;
    let leaf = der(cert_pem)?;
    let chain = p12_keystore::PrivateKeyChain::new(alias.as_bytes(), key, [leaf, der(ca_pem)?]);
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry(alias, p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    let bytes = store
        .writer(password)
        .write()
        .map_err(|e| fail(e.to_string()))?;
    let mut f = std::fs::OpenOptions::new();
    f.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        f.mode(0o600);
    }
    let io = |source| PkiError::Io {
        path: out.to_owned(),
        source,
    };
    let mut file = f.open(out).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PKCS#8 PEM).
    pub key_pem: String,
    /// Serial number, for revocation.
    pub serial: Vec<u8>,
}

/// A certificate authority able to issue dev certificates and CRLs.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM).
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

/// Longest validity of a development certificate (CA, server, clients):
/// 825 days, the CA/Browser Forum's former ceiling for server certificates.
pub const MAX_DEV_VALIDITY_DAYS: i64 = 825;

/// A random positive 128-bit serial (RFC 5280 §4.1.2.2: positive, at most
/// 20 octets), encoded without a leading zero octet.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

impl DevCa {
    /// A new self-signed CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<DevCa, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "credgate development");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(MAX_DEV_VALIDITY_DAYS);
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(DevCa {
            issuer: Issuer::new(params, key),
            cert_pem,
            key_pem,
        })
    }

    /// Loads a CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<DevCa, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(DevCa {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn issue_server(&self, names: &[&str]) -> Result<Issued, PkiError> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("localhost"),
        );
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        self.sign(
            params,
            now - Duration::days(1),
            now + Duration::days(MAX_DEV_VALIDITY_DAYS),
        )
    }

    /// A client certificate naming `participant_id` as subject CN (and, if
    /// `with_uri`, as SAN URI), valid until `not_after`.
    pub fn issue_client_until(
        &self,
        participant_id: &str,
        with_uri: bool,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, participant_id);
        dn.push(DnType::OrganizationName, "credgate development");
        params.distinguished_name = dn;
        if with_uri {
            params.subject_alt_names = vec![SanType::URI(
                format!("{PARTICIPANT_URI_PREFIX}{participant_id}").try_into()?,
            )];
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, not_before, not_after)
    }

    /// A client certificate valid from yesterday for
    /// [`MAX_DEV_VALIDITY_DAYS`].
    pub fn issue_client(&self, participant_id: &str) -> Result<Issued, PkiError> {
        let now = OffsetDateTime::now_utc();
        self.issue_client_until(
            participant_id,
            true,
            now - Duration::days(1),
            now + Duration::days(MAX_DEV_VALIDITY_DAYS),
        )
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        // Always explicit: rcgen's default validity starts in 1975.
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: serial.to_bytes(),
        })
    }

    /// A CRL (PEM) revoking the given serial numbers.
    pub fn crl(&self, revoked: &[Vec<u8>]) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(7),
            crl_number: random_serial(),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: now - Duration::minutes(5),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// Writes `contents` to `path`, creating parent folders; key files get
/// mode 0600.
pub fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Creates what is missing of the dev PKI in `dir`: `ca.pem`/`ca.key`,
/// `server.pem`/`server.key`, `gateway.pem`/`gateway.key` (the client
/// certificate credgate presents to push endpoints), and
/// `<id>.pem`/`<id>.key` per participant, with `<id>.p12` (a PKCS#12
/// bundle for a browser, password [`DEV_P12_PASSWORD`]).
/// Existing files are kept. Returns the files written.
pub fn init_dir(dir: &Path, participant_ids: &[String]) -> Result<Vec<PathBuf>, PkiError> {
    let mut written = Vec::new();
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| PkiError::Io {
            path: p.to_owned(),
            source,
        })
    };
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca = if ca_cert.is_file() && ca_key.is_file() {
        DevCa::from_pem(&read(&ca_cert)?, &read(&ca_key)?)?
    } else {
        let ca = DevCa::generate("credgate dev CA (development only)")?;
        write_file(&ca_cert, &ca.cert_pem, false)?;
        write_file(&ca_key, &ca.key_pem, true)?;
        written.extend([ca_cert, ca_key]);
        ca
    };
    let mut wanted: Vec<(String, bool)> = vec![("server".into(), true), ("gateway".into(), false)];
    wanted.extend(participant_ids.iter().map(|id| (id.clone(), false)));
    for (name, server) in wanted {
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        if !(cert.is_file() && key.is_file()) {
            let issued = if server {
                ca.issue_server(&["localhost", "127.0.0.1", "::1"])?
            } else if name == "gateway" {
                ca.issue_client("credgate-gateway")?
            } else {
                ca.issue_client(&name)?
            };
            write_file(&cert, &issued.cert_pem, false)?;
            write_file(&key, &issued.key_pem, true)?;
            written.extend([cert.clone(), key.clone()]);
        }
        // Participants get a bundle to import into a browser too (the
        // console), also beside certificates made before bundles were.
        let bundle = dir.join(format!("{name}.p12"));
        if name != "server" && name != "gateway" && !bundle.is_file() {
            write_p12(
                &read(&cert)?,
                &read(&key)?,
                &ca.cert_pem,
                &name,
                DEV_P12_PASSWORD,
                &bundle,
            )?;
            written.push(bundle);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    use x509_parser::prelude::{FromDer, X509Certificate};

    #[test]
    fn dev_certificates_are_short_lived_with_positive_serials() {
        let dir = tempfile::tempdir().expect("tmp");
        init_dir(dir.path(), &["dept-market".to_owned()]).expect("init");
        let now = OffsetDateTime::now_utc().unix_timestamp();
        for name in ["ca", "server", "gateway", "dept-market"] {
            let der =
                CertificateDer::from_pem_file(dir.path().join(format!("{name}.pem"))).expect("pem");
            let (_, cert) = X509Certificate::from_der(der.as_ref()).expect("x509");
            let v = cert.validity();
            let (from, until) = (v.not_before.timestamp(), v.not_after.timestamp());
            let days = (until - from) / 86_400;
            assert!(
                days <= MAX_DEV_VALIDITY_DAYS + 1,
                "{name}: valid for {days} days"
            );
            assert!(
                from >= now - 2 * 86_400 && from <= now,
                "{name}: starts at {from}"
            );
            let serial = cert.tbs_certificate.raw_serial();
            assert!(
                !serial.is_empty() && serial[0] & 0x80 == 0,
                "{name}: negative serial"
            );
            assert!(serial[0] != 0, "{name}: serial with a leading zero octet");
            assert!(serial.len() <= 20, "{name}: serial longer than 20 octets");
        }
    }
}
