//! TLS to PostgreSQL, with `sslmode` and `sslrootcert` read as libpq reads them (rustls, with ring):
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | if the server offers it | chain checked against `sslrootcert` when one is given, else not checked |
//! | `require` | always | as `prefer` |
//! | `verify-ca` | always | chain checked against `sslrootcert` (required), not the host name |
//! | `verify-full` | always | chain and host name (or IP address) checked |
//!
//! `sslrootcert` is a file of PEM certificates (libpq's `system` and its default `~/.postgresql/root.crt`
//! are not read). tokio-postgres parses `sslmode` `disable`, `prefer` and `require` only, so both
//! parameters are taken out of the URL before it does ([`split_url`]).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

/// `sslmode`, as libpq reads it (see the module's table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A database's `sslmode` and `sslrootcert`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

/// `url` (a `postgres://` URL or a `key=value` string) without its `sslmode` and `sslrootcert`, and
/// what they say. Errors never quote the URL (it holds a password).
pub fn split_url(url: &str) -> anyhow::Result<(String, TlsSettings)> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let (base, params, separator) = match url.split_once('?') {
        Some((base, query)) if is_url => (base, query, "&"),
        _ if is_url => (url, "", "&"),
        _ => ("", url, " "),
    };
    let decode = |value: &str| match is_url {
        true => percent_decode_str(value).decode_utf8_lossy().into_owned(),
        false => value.to_owned(),
    };
    let mut settings = TlsSettings::default();
    let mut kept = Vec::new();
    for param in params.split(separator).filter(|param| !param.is_empty()) {
        match param.split_once('=') {
            Some(("sslmode", mode)) => settings.mode = parse_mode(&decode(mode))?,
            Some(("sslrootcert", path)) => settings.root_cert = Some(decode(path).into()),
            _ => kept.push(param),
        }
    }
    if settings.root_cert.as_deref().is_some_and(|path| path.as_os_str() == "system") {
        bail!("sslrootcert=system is not supported: name a file of CA certificates");
    }
    if matches!(settings.mode, SslMode::VerifyCa | SslMode::VerifyFull) && settings.root_cert.is_none() {
        bail!("sslmode=verify-ca and verify-full need sslrootcert=<file of CA certificates>");
    }
    let kept = kept.join(separator);
    let rest = match (is_url, kept.is_empty()) {
        (true, false) => format!("{base}?{kept}"),
        (true, true) => base.to_owned(),
        (false, _) => kept,
    };
    Ok((rest, settings))
}

fn parse_mode(mode: &str) -> anyhow::Result<SslMode> {
    Ok(match mode {
        "disable" => SslMode::Disable,
        "prefer" => SslMode::Prefer,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        _ => bail!("sslmode must be disable, prefer, require, verify-ca or verify-full"),
    })
}

impl TlsSettings {
    /// The mode tokio-postgres negotiates with (it leaves the certificate to [`Tls`]).
    pub fn pg_mode(&self) -> PgSslMode {
        match self.mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        }
    }

    /// The connector that checks the server's certificate as `sslmode` says; reads `sslrootcert`.
    pub fn connector(&self) -> anyhow::Result<Tls> {
        let roots = match &self.root_cert {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(path)
                    .with_context(|| format!("cannot read sslrootcert {}", path.display()))?
                {
                    let cert = cert.with_context(|| format!("sslrootcert {} is not PEM", path.display()))?;
                    roots
                        .add(cert)
                        .with_context(|| format!("a certificate in {} is invalid", path.display()))?;
                }
                if roots.is_empty() {
                    bail!("sslrootcert {} holds no certificate", path.display());
                }
                Some(roots)
            }
            None => None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Verifier {
            roots,
            check_name: self.mode == SslMode::VerifyFull,
            algorithms: provider.signature_verification_algorithms,
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(Tls(MakeRustlsConnect::new(config)))
    }
}

/// The TLS connector of a database's connections (and their cancel requests).
#[derive(Clone)]
pub struct Tls(pub(super) MakeRustlsConnect);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

/// Where to connect, and with which TLS connector.
#[derive(Debug, Clone)]
pub struct Target {
    pub pg: tokio_postgres::Config,
    pub tls: Tls,
}

impl Target {
    /// A connection of its own (not a pooled one), its I/O driven by a task of the current runtime.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.pg.connect(self.tls.0.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "database connection ended");
            }
        });
        Ok(client)
    }
}

/// Whether connecting failed in the TLS handshake (a refused certificate, a protocol the server does not
/// speak), which no retry mends.
pub fn is_tls_error(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        // tokio-rustls hands rustls's error over inside an io::Error, whose `source` skips it.
        let inner = err.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref);
        if err.is::<rustls::Error>() || inner.is_some_and(|inner| inner.is::<rustls::Error>()) {
            return true;
        }
        source = err.source();
    }
    false
}

/// Checks the server's certificate as `sslmode` says: the chain against `roots` (none: no check, as
/// libpq's `prefer` and `require` without `sslrootcert`), and the name too with `check_name`. The
/// handshake's signatures are always checked, so the server holds the key of the certificate it sent.
#[derive(Debug)]
struct Verifier {
    roots: Option<RootCertStore>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(&cert, roots, intermediates, now, self.algorithms.all)?;
            if self.check_name {
                verify_server_name(&cert, server_name)?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, TlsSettings) {
        split_url(url).unwrap()
    }

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_urls_and_key_value_strings() {
        let (rest, tls) =
            split("postgres://u:p@db:5432/app?sslmode=verify-full&sslrootcert=%2Fca%20dir%2Fca.crt");
        assert_eq!(rest, "postgres://u:p@db:5432/app");
        assert_eq!(tls, TlsSettings { mode: SslMode::VerifyFull, root_cert: Some("/ca dir/ca.crt".into()) });
        let (rest, tls) = split("postgres://u:p@h1,h2/app?sslmode=require&target_session_attrs=read-write");
        assert_eq!(rest, "postgres://u:p@h1,h2/app?target_session_attrs=read-write");
        assert_eq!((tls.mode, tls.pg_mode()), (SslMode::Require, PgSslMode::Require));
        let (rest, tls) = split("host=db user=u sslmode=verify-ca sslrootcert=/ca.crt dbname=app");
        assert_eq!(rest, "host=db user=u dbname=app");
        assert_eq!((tls.mode, tls.pg_mode()), (SslMode::VerifyCa, PgSslMode::Require));
        let (rest, tls) = split("postgresql://u@db/app");
        assert_eq!((rest.as_str(), tls), ("postgresql://u@db/app", TlsSettings::default()));
        assert_eq!(TlsSettings::default().pg_mode(), PgSslMode::Prefer, "libpq's default");
    }

    #[test]
    fn a_mode_libpq_would_not_verify_with_or_a_verifying_mode_without_a_ca_is_refused() {
        for bad in ["sslmode=allow", "sslmode=verify_full", "sslmode=verify-full", "sslrootcert=system"] {
            let err = split_url(&format!("postgres://u:secret@db/app?{bad}")).unwrap_err().to_string();
            assert!(err.contains("ssl") && !err.contains("secret"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_an_error_that_names_it() {
        let settings = |path: &str| TlsSettings { mode: SslMode::VerifyFull, root_cert: Some(path.into()) };
        let err = settings("/nonexistent/ca.crt").connector().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.crt"), "{err}");
        let err = settings("/dev/null").connector().unwrap_err().to_string();
        assert!(err.contains("no certificate"), "{err}");
        assert!(TlsSettings::default().connector().is_ok(), "prefer without a CA checks nothing");
    }
}
