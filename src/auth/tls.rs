//! Transport security: TLS (and mutual TLS) configuration from PEM files, the
//! calling service's identity from its client certificate, and a development
//! certificate authority (`carevault certs dev`).
//!
//! rustls (through tonic's `tls-ring` feature) negotiates TLS 1.2 or 1.3
//! only; older versions are not compiled in. Client certificates are verified
//! by rustls against the configured CA before any request is seen; this module
//! only reads the identity out of an already-verified certificate.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Whether clients must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A certificate is verified if presented; calls without one have no service identity.
    Optional,
    /// Connections without a valid client certificate are refused during the handshake.
    Required,
}

/// Server-side TLS settings.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA that signs client certificates (PEM); enables mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// Used only with `client_ca`.
    pub client_auth: ClientAuth,
}

/// TLS set-up failures (messages name files, never key material).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no PEM of the expected kind.
    #[error("{0} does not contain a PEM {1}")]
    NotPem(PathBuf, &'static str),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(String),
    /// Writing generated files failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn read_pem(path: &Path, kind: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })?;
    let marker = format!("-----BEGIN {kind}");
    let text = String::from_utf8_lossy(&bytes);
    let ok = if kind == "PRIVATE KEY" { text.contains("PRIVATE KEY-----") } else { text.contains(&marker) };
    if !ok {
        return Err(TlsError::NotPem(path.to_path_buf(), kind));
    }
    Ok(bytes)
}

impl ServerTls {
    /// Builds tonic's server TLS configuration, reading every file now.
    pub fn load(&self) -> Result<ServerTlsConfig, TlsError> {
        let cert = read_pem(&self.cert, "CERTIFICATE")?;
        let key = read_pem(&self.key, "PRIVATE KEY")?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &self.client_ca {
            let ca = read_pem(ca, "CERTIFICATE")?;
            config = config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(self.client_auth == ClientAuth::Optional);
        }
        Ok(config)
    }
}

/// Client-side TLS settings (CLI client, bench, tests).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA that signed the server certificate (PEM).
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Name to verify the server certificate against (default: the URL's host).
    pub domain: Option<String>,
}

impl ClientTls {
    /// Builds tonic's client TLS configuration, reading every file now.
    pub fn load(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(Certificate::from_pem(read_pem(ca, "CERTIFICATE")?));
        }
        if let Some((cert, key)) = &self.identity {
            let cert = read_pem(cert, "CERTIFICATE")?;
            let key = read_pem(key, "PRIVATE KEY")?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &self.domain {
            config = config.domain_name(d.clone());
        }
        Ok(config)
    }
}

/// Longest identity kept from a certificate (longer ones are treated as absent).
pub const MAX_IDENTITY_LEN: usize = 256;

/// The service identity in a verified client certificate (DER): its first URI
/// SAN (e.g. `spiffe://clinic.example/registration`), else its first DNS SAN,
/// else `None`. Identities with control characters or over
/// [`MAX_IDENTITY_LEN`] bytes are ignored.
pub fn service_identity(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let uri = names.iter().find_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None });
    let dns = names.iter().find_map(|n| if let GeneralName::DNSName(d) = n { Some(*d) } else { None });
    let id = uri.or(dns)?;
    (!id.is_empty() && id.len() <= MAX_IDENTITY_LEN && !id.chars().any(char::is_control)).then(|| id.to_string())
}

/// File names written by [`write_dev_certs`].
pub mod dev_files {
    /// The development CA certificate (trust it on clients and as the client CA).
    pub const CA_CERT: &str = "ca.pem";
    /// The CA's private key.
    pub const CA_KEY: &str = "ca.key";
    /// Server certificate (SANs: localhost, 127.0.0.1, ::1).
    pub const SERVER_CERT: &str = "server.pem";
    /// Server private key.
    pub const SERVER_KEY: &str = "server.key";
    /// Client certificate (URI SAN [`super::DEV_CLIENT_IDENTITY`]).
    pub const CLIENT_CERT: &str = "client.pem";
    /// Client private key.
    pub const CLIENT_KEY: &str = "client.key";
}

/// The URI SAN of the development client certificate.
pub const DEV_CLIENT_IDENTITY: &str = "spiffe://carevault.dev/client";

/// PEM text of a generated certificate and its key.
pub struct IssuedCert {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
}

/// A development CA that can issue server and client certificates.
pub struct DevCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    key_pem: String,
}

fn gen_err(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

impl DevCa {
    /// A new self-signed CA named `common_name`, valid for ten years.
    pub fn new(common_name: &str) -> Result<DevCa, TlsError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let (not_before, not_after) = validity(3650);
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().map_err(gen_err)?;
        let key_pem = key.serialize_pem();
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).map_err(gen_err)?;
        Ok(DevCa { issuer, key_pem })
    }

    /// The CA certificate and key.
    pub fn cert(&self) -> IssuedCert {
        IssuedCert { cert_pem: self.issuer.pem(), key_pem: self.key_pem.clone() }
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid for a year.
    pub fn server(&self, names: &[&str]) -> Result<IssuedCert, TlsError> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).map_err(gen_err)?;
        self.issue(params, "carevault server", rcgen::ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate whose identity is the URI SAN `uri` (e.g. spiffe://...), valid for a year.
    pub fn client(&self, uri: &str) -> Result<IssuedCert, TlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        let uri = rcgen::string::Ia5String::try_from(uri.to_string()).map_err(gen_err)?;
        params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
        self.issue(params, "carevault client", rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        mut params: rcgen::CertificateParams,
        common_name: &str,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> Result<IssuedCert, TlsError> {
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let (not_before, not_after) = validity(365);
        params.not_before = not_before;
        params.not_after = not_after;
        let key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn validity(days: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (now - time::Duration::days(1), now + time::Duration::days(days))
}

/// Generates a development CA, a server certificate for localhost and a
/// client certificate ([`DEV_CLIENT_IDENTITY`]) into `dir` (created if
/// needed; keys are written owner-only). Existing files are not overwritten.
pub fn write_dev_certs(dir: &Path) -> Result<Vec<PathBuf>, TlsError> {
    use dev_files::*;
    let write = |name: &str, text: &str, secret: bool| -> Result<PathBuf, TlsError> {
        let path = dir.join(name);
        let err = |source| TlsError::Write { path: path.clone(), source };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        if secret {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&path).map_err(err)?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(err)?;
        Ok(path)
    };
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.to_path_buf(), source })?;
    if dir.join(CA_CERT).exists() {
        return Err(TlsError::Write {
            path: dir.join(CA_CERT),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists; not overwriting"),
        });
    }
    let ca = DevCa::new("carevault development CA")?;
    let server = ca.server(&["localhost", "127.0.0.1", "::1"])?;
    let client = ca.client(DEV_CLIENT_IDENTITY)?;
    let ca_cert = ca.cert();
    Ok(vec![
        write(CA_CERT, &ca_cert.cert_pem, false)?,
        write(CA_KEY, &ca_cert.key_pem, true)?,
        write(SERVER_CERT, &server.cert_pem, false)?,
        write(SERVER_KEY, &server.key_pem, true)?,
        write(CLIENT_CERT, &client.cert_pem, false)?,
        write(CLIENT_KEY, &client.key_pem, true)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem_text: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem_text.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    }

    #[test]
    fn a_client_certificate_names_its_uri_identity() {
        let ca = DevCa::new("test ca").unwrap();
        let c = ca.client("spiffe://clinic.example/registration").unwrap();
        assert_eq!(service_identity(&der(&c.cert_pem)).as_deref(), Some("spiffe://clinic.example/registration"));
    }

    #[test]
    fn a_certificate_without_a_uri_falls_back_to_its_dns_name() {
        let ca = DevCa::new("test ca").unwrap();
        let s = ca.server(&["billing.clinic.example"]).unwrap();
        assert_eq!(service_identity(&der(&s.cert_pem)).as_deref(), Some("billing.clinic.example"));
        assert_eq!(service_identity(b"not a certificate"), None);
    }

    #[test]
    fn dev_certs_are_written_once_with_private_keys_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let files = write_dev_certs(dir.path()).unwrap();
        assert_eq!(files.len(), 6);
        let mode = std::fs::metadata(dir.path().join(dev_files::CA_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
        assert!(write_dev_certs(dir.path()).is_err(), "never overwrites");
    }
}
