//! TLS 1.3 (rustls) on migration connections, each end verifying the
//! other: the credentials directory is laid out as QEMU's `tls-creds-x509`
//! and Cloud Hypervisor's (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`, `client-cert.pem`, `client-key.pem`), so an existing
//! PKI works unchanged. The destination (server) requires a client
//! certificate the CA signed; the source (client) checks the destination's
//! certificate against the CA and the name it connected to.
//!
//! With a pre-shared key instead ([`super::psk`]) each end runs TLS 1.3
//! with an ephemeral certificate nobody checks, and then proves the key
//! bound to the session. ALPN names which of the two a peer speaks, so a
//! certificate end and a key end refuse each other by name.
//!
//! A connection's handles ([`super::transport::Stream::try_clone`]) share
//! one rustls state behind a mutex, held only to move bytes through it:
//! a reader waits for the socket without it, so one thread can block
//! reading while another writes (post-copy does).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, ServerConfig,
    ServerConnection, SignatureScheme,
};
use smudge::migration::frame::{Ack, Frame, FrameWriter, MAGIC};

use super::psk::{self, Binding, DestinationKeys, PskError, SourceKey};

/// The CA both ends trust.
pub const CA_CERT: &str = "ca-cert.pem";
/// The destination's certificate and key.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The destination's key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The source's certificate.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The source's key.
pub const CLIENT_KEY: &str = "client-key.pem";

/// Why TLS could not be set up or the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file could not be read or holds no usable PEM.
    #[error("{}: {why}", path.display())]
    Creds {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// rustls refused the credentials.
    #[error("TLS credentials in {}: {source}", dir.display())]
    Config {
        /// The directory.
        dir: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// The name to verify the destination by is not one a certificate holds.
    #[error("{0:?} cannot be checked against a certificate (a DNS name or an IP address)")]
    Name(String),
    /// The handshake failed (the peer's certificate, its alert, the stream).
    #[error("TLS handshake: {0}")]
    Handshake(#[source] std::io::Error),
    /// The peer connected and then sent nothing for this many seconds.
    #[error("TLS handshake: the peer sent nothing for {0} s; giving up on it")]
    Stalled(u64),
    /// The peer sent a plain migration stream instead of a TLS handshake.
    #[error("TLS handshake: the {0} sent a plain migration stream: {1}")]
    Plain(&'static str, &'static str),
    /// The peer authenticates the other way (certificates against a key).
    #[error("TLS handshake: the {peer} uses {}, this {us} {}", theirs.says(), theirs.other().says())]
    Mode {
        /// Which end the peer is.
        peer: &'static str,
        /// Which end this is.
        us: &'static str,
        /// What the peer uses.
        theirs: Mode,
    },
    /// The pre-shared key could not be loaded, or a peer did not prove it.
    #[error(transparent)]
    Psk(#[from] PskError),
}

/// How the two ends authenticate each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Certificates a CA signed (`--tls-creds`).
    Certs,
    /// A pre-shared key (`--tls-psk`).
    Psk,
}

impl Mode {
    /// The mode of an end that holds a key (`--tls-psk`) or not.
    fn keyed(psk: bool) -> Mode {
        match psk {
            true => Mode::Psk,
            false => Mode::Certs,
        }
    }

    fn says(self) -> &'static str {
        match self {
            Mode::Certs => "certificates (--tls-creds)",
            Mode::Psk => "a pre-shared key (--tls-psk)",
        }
    }

    fn other(self) -> Mode {
        match self {
            Mode::Certs => Mode::Psk,
            Mode::Psk => Mode::Certs,
        }
    }

    /// The ALPN protocol a peer of this mode offers.
    fn alpn(self) -> Vec<u8> {
        match self {
            Mode::Certs => b"smudge-migration/x509".to_vec(),
            Mode::Psk => b"smudge-migration/psk".to_vec(),
        }
    }

    /// What a destination tells a plain source (in a plain `Ack`).
    fn plain_source(self) -> &'static str {
        match self {
            Mode::Certs => "this destination requires TLS: migrate with --tls-creds",
            Mode::Psk => "this destination requires TLS: migrate with --tls-psk",
        }
    }

    /// What a source says of a plain destination.
    fn plain_destination(self) -> &'static str {
        match self {
            Mode::Certs => "it was started without --tls-creds",
            Mode::Psk => "it was started without --tls-psk",
        }
    }
}

/// The socket during a handshake, keeping the first bytes read: a peer
/// that speaks the plain stream is told apart from a broken handshake.
struct Recorder<S> {
    sock: S,
    first: Vec<u8>,
}

impl<S: Read> Read for Recorder<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.sock.read(buf)?;
        let want = MAGIC.len().saturating_sub(self.first.len()).min(n);
        self.first.extend_from_slice(&buf[..want]);
        Ok(n)
    }
}

impl<S: Write> Write for Recorder<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// ring, with AES-128-GCM first: as safe for a migration stream, and
/// with AES-NI fewer rounds per block than AES-256 (both ends prefer it,
/// and a rustls server follows the client's order).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(p)
}

fn certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = dir.join(name);
    let bad = |why: String| TlsError::Creds { path: path.clone(), why };
    let all = CertificateDer::pem_file_iter(&path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    match all.is_empty() {
        true => Err(bad("holds no certificate".into())),
        false => Ok(all),
    }
}

fn key(dir: &Path, name: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let path = dir.join(name);
    PrivateKeyDer::from_pem_file(&path).map_err(|e| TlsError::Creds { path, why: e.to_string() })
}

fn roots(dir: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(dir, CA_CERT)? {
        roots.add(c).map_err(|source| TlsError::Config { dir: dir.to_path_buf(), source })?;
    }
    Ok(roots)
}

/// The source's side: its certificate, and the CA it checks the
/// destination's by.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    /// With a pre-shared key: the key it proves.
    psk: Option<Arc<SourceKey>>,
}

impl TlsClient {
    /// Loads `ca-cert.pem`, `client-cert.pem` and `client-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<TlsClient, TlsError> {
        let cfg = |source| TlsError::Config { dir: dir.to_path_buf(), source };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_root_certificates(roots(dir)?)
            .with_client_auth_cert(certs(dir, CLIENT_CERT)?, key(dir, CLIENT_KEY)?)
            .map_err(cfg)?;
        config.alpn_protocols = vec![Mode::Certs.alpn()];
        Ok(TlsClient { config: Arc::new(config), psk: None })
    }

    /// With the pre-shared key of `identity` (or the first) in the
    /// `keys.psk` file `path`; the destination's certificate is not
    /// checked, its proof of the key is.
    pub fn psk(path: &Path, identity: Option<&str>) -> Result<TlsClient, TlsError> {
        let key = SourceKey::load(path, identity)?;
        let cfg = |source| TlsError::Config { dir: path.to_path_buf(), source };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(KeyProvesIt(provider())))
            .with_no_client_auth();
        config.alpn_protocols = vec![Mode::Psk.alpn()];
        Ok(TlsClient { config: Arc::new(config), psk: Some(Arc::new(key)) })
    }

    pub(super) fn mode(&self) -> Mode {
        Mode::keyed(self.psk.is_some())
    }

    pub(super) fn key(&self) -> Option<&SourceKey> {
        self.psk.as_deref()
    }

    /// A connection's client state for a destination known as `name`
    /// (the host of `HOST:PORT`, `localhost` for a unix socket).
    pub(super) fn start(&self, name: &str) -> Result<rustls::Connection, TlsError> {
        let server = ServerName::try_from(name.to_string()).map_err(|_| TlsError::Name(name.to_string()))?;
        ClientConnection::new(self.config.clone(), server)
            .map(Into::into)
            .map_err(|e| TlsError::Handshake(std::io::Error::other(e)))
    }
}

/// The destination's side: its certificate, and the CA a source's must
/// be signed by.
#[derive(Debug, Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
    /// With a pre-shared key: the keys a source may prove.
    psk: Option<Arc<DestinationKeys>>,
}

impl TlsServer {
    /// Loads `ca-cert.pem`, `server-cert.pem` and `server-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<TlsServer, TlsError> {
        let cfg = |source| TlsError::Config { dir: dir.to_path_buf(), source };
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), provider())
            .build()
            .map_err(|e| cfg(rustls::Error::General(e.to_string())))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(dir, SERVER_CERT)?, key(dir, SERVER_KEY)?)
            .map_err(cfg)?;
        // Nothing resumes a migration connection.
        config.send_tls13_tickets = 0;
        config.alpn_protocols = vec![Mode::Certs.alpn()];
        Ok(TlsServer { config: Arc::new(config), psk: None })
    }

    /// With the pre-shared keys of the `keys.psk` file `path` (only
    /// `identity`'s if given), behind a certificate made for this run.
    pub fn psk(path: &Path, identity: Option<&str>) -> Result<TlsServer, TlsError> {
        let keys = DestinationKeys::load(path, identity)?;
        let cfg = |source| TlsError::Config { dir: path.to_path_buf(), source };
        let made = rcgen::generate_simple_self_signed(vec!["smudge-migration".to_string()])
            .map_err(|e| cfg(rustls::Error::General(format!("an ephemeral certificate: {e}"))))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.key_pair.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_no_client_auth()
            .with_single_cert(vec![made.cert.der().clone()], key)
            .map_err(cfg)?;
        config.send_tls13_tickets = 0;
        config.alpn_protocols = vec![Mode::Psk.alpn()];
        Ok(TlsServer { config: Arc::new(config), psk: Some(Arc::new(keys)) })
    }

    /// What `migrate-recv`'s flags ask for: certificates from `creds`, a
    /// key from `psk` (`identity`'s only, if given), or nothing.
    pub fn from_flags(
        creds: Option<&Path>,
        psk: Option<&Path>,
        identity: Option<&str>,
    ) -> anyhow::Result<Option<TlsServer>> {
        use anyhow::Context;
        match (creds, psk) {
            (Some(dir), _) => TlsServer::load(dir).map(Some).context("--tls-creds"),
            (_, Some(file)) => TlsServer::psk(file, identity).map(Some).context("--tls-psk"),
            (None, None) => Ok(None),
        }
    }

    pub(super) fn mode(&self) -> Mode {
        Mode::keyed(self.psk.is_some())
    }

    pub(super) fn keys(&self) -> Option<&DestinationKeys> {
        self.psk.as_deref()
    }

    pub(super) fn start(&self) -> Result<rustls::Connection, TlsError> {
        ServerConnection::new(self.config.clone())
            .map(Into::into)
            .map_err(|e| TlsError::Handshake(std::io::Error::other(e)))
    }
}

/// A pre-shared-key source's check of the destination's certificate:
/// none (it was made for the run), only that the handshake is signed by
/// its key. The key proof after the handshake authenticates.
#[derive(Debug)]
struct KeyProvesIt(Arc<CryptoProvider>);

impl ServerCertVerifier for KeyProvesIt {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The name a source checks the destination's certificate against: the
/// host of `HOST:PORT` (brackets of an IPv6 address taken off), or
/// `localhost` for `unix:PATH`.
pub fn server_name(to: &str) -> &str {
    if to.starts_with("unix:") {
        return "localhost";
    }
    let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// The rustls state of one connection and the bytes read off the socket
/// that it has not taken yet.
struct Shared {
    conn: rustls::Connection,
    pending: Vec<u8>,
}

/// The most one socket read takes (decrypted under the connection's lock
/// before the next).
const SCRATCH: usize = 128 << 10;

/// One handle on a TLS connection.
pub(super) struct Secure {
    shared: Arc<Mutex<Shared>>,
    /// This handle's buffer for socket reads.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Secure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secure")
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn invalid(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// Why a handshake failed, in the words each end should see: a plain
/// peer, a peer of the other mode (ALPN told them apart), or rustls'.
fn refusal<S: Write>(e: std::io::Error, mut rec: Recorder<S>, server: bool, mode: Mode) -> TlsError {
    let (peer, us) = match server {
        true => ("source", "destination"),
        false => ("destination", "source"),
    };
    let other_mode = matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(
            rustls::Error::NoApplicationProtocol
                | rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol)
        )
    );
    match (rec.first == MAGIC, server) {
        (false, _) if other_mode => TlsError::Mode { peer, us, theirs: mode.other() },
        (false, _) => TlsError::Handshake(e),
        (true, false) => TlsError::Plain("destination", mode.plain_destination()),
        (true, true) => {
            let mut w = FrameWriter::new(&mut rec.sock, false);
            let _ = w.send(&Frame::Ack(Ack::refused(mode.plain_source()))).and_then(|_| w.flush());
            TlsError::Plain("source", mode.plain_source())
        }
    }
}

/// Decrypts what `input` holds (taking it as rustls does) into `buf`,
/// after the plaintext rustls already held, until `buf` is full or
/// `input` is used up; `out` sends what rustls must answer. Returns the
/// bytes put in `buf` (0 also at a clean end of the stream, when rustls
/// no longer wants to read).
fn decrypt_into(
    conn: &mut rustls::Connection,
    input: &mut &[u8],
    buf: &mut [u8],
    mut out: impl Write,
) -> std::io::Result<usize> {
    let mut got = 0;
    loop {
        match conn.reader().read(&mut buf[got..]) {
            Ok(0) => return Ok(got),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if got == buf.len() || input.is_empty() {
            return Ok(got);
        }
        conn.read_tls(input)?;
        conn.process_new_packets().map_err(invalid)?;
        flush(conn, &mut out)?;
    }
}

/// Writes what rustls has to send.
fn flush(conn: &mut rustls::Connection, mut sock: impl Write) -> std::io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    Ok(())
}

impl Secure {
    /// Runs the handshake of `conn` over `sock` (its timeouts bound it),
    /// this end authenticating by `mode`. A destination that gets a plain
    /// stream's first frame instead answers it with a plain refusal, so
    /// the source can say why.
    pub(super) fn handshake<S>(mut conn: rustls::Connection, sock: S, mode: Mode) -> Result<Secure, TlsError>
    where
        S: Read + Write,
    {
        let server = matches!(conn, rustls::Connection::Server(_));
        let mut rec = Recorder { sock, first: Vec::new() };
        let mut run = || {
            while conn.is_handshaking() {
                flush(&mut conn, &mut rec)?;
                if !conn.wants_read() {
                    continue;
                }
                if conn.read_tls(&mut rec)? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection in the handshake",
                    ));
                }
                if let Err(e) = conn.process_new_packets() {
                    // Tell a TLS peer why (its alert); a plain one gets a
                    // plain answer below instead.
                    if rec.first != MAGIC {
                        let _ = flush(&mut conn, &mut rec);
                    }
                    return Err(invalid(e));
                }
            }
            flush(&mut conn, &mut rec)
        };
        if let Err(e) = run() {
            return Err(refusal(e, rec, server, mode));
        }
        Ok(Secure { shared: Arc::new(Mutex::new(Shared { conn, pending: Vec::new() })), scratch: vec![0; SCRATCH] })
    }

    /// The values this session's pre-shared-key proofs are bound to.
    pub(super) fn binding(&self) -> Result<Binding, TlsError> {
        let g = lock(&self.shared);
        let export = |context| {
            g.conn
                .export_keying_material([0u8; 32], psk::EXPORTER_LABEL, Some(context))
                .map_err(|e| TlsError::Handshake(invalid(e)))
        };
        Ok(Binding { source: export(psk::SOURCE_CONTEXT)?, destination: export(psk::DESTINATION_CONTEXT)? })
    }

    /// Another handle on the same connection.
    pub(super) fn handle(&self) -> Secure {
        Secure { shared: self.shared.clone(), scratch: vec![0; SCRATCH] }
    }

    /// Reads plaintext, reading the socket (`sock`, without the lock) when
    /// rustls has none; `out` sends what rustls must answer. What one
    /// socket read brought is decrypted straight into `buf`; only what
    /// does not fit is kept for the next call.
    pub(super) fn read<R: Read, W: Write>(
        &mut self,
        mut sock: R,
        mut out: W,
        buf: &mut [u8],
    ) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut g = lock(&self.shared);
                let s = &mut *g;
                let mut input = &s.pending[..];
                let n = decrypt_into(&mut s.conn, &mut input, buf, &mut out);
                let used = s.pending.len() - input.len();
                s.pending.drain(..used);
                match n? {
                    0 if s.conn.wants_read() => {}
                    n => return Ok(n),
                }
            }
            let n = sock.read(&mut self.scratch)?;
            let mut g = lock(&self.shared);
            let s = &mut *g;
            if n == 0 {
                // End of stream: rustls tells a clean close from a cut one.
                s.conn.read_tls(&mut &[][..])?;
                s.conn.process_new_packets().map_err(invalid)?;
                continue;
            }
            let mut input = &self.scratch[..n];
            let got = decrypt_into(&mut s.conn, &mut input, buf, &mut out);
            s.pending.extend_from_slice(input);
            match got? {
                0 => {}
                n => return Ok(n),
            }
        }
    }

    /// Encrypts `buf` (as much as rustls takes) and sends it.
    pub(super) fn write<W: Write>(&self, out: W, buf: &[u8]) -> std::io::Result<usize> {
        let mut g = lock(&self.shared);
        let n = g.conn.writer().write(buf)?;
        flush(&mut g.conn, out)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    use super::*;
    use crate::migrate::transport::{Address, Listener, Stream};

    /// A CA: its certificate (PEM) and what signs with it.
    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        Ca { cert: p.self_signed(&key).unwrap(), key }
    }

    /// Writes a QEMU-style credentials directory: `ca` trusted, the
    /// server's certificate for `names` and the client's signed by
    /// `signer`.
    fn creds(dir: &Path, ca: &Ca, names: &[&str], signer: &Ca) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(CA_CERT), ca.cert.pem()).unwrap();
        for (cert, key, names, by) in
            [(SERVER_CERT, SERVER_KEY, names.to_vec(), signer), (CLIENT_CERT, CLIENT_KEY, vec!["source"], signer)]
        {
            let k = KeyPair::generate().unwrap();
            let p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
            let c = p.signed_by(&k, &by.cert, &by.key).unwrap();
            std::fs::write(dir.join(cert), c.pem()).unwrap();
            std::fs::write(dir.join(key), k.serialize_pem()).unwrap();
        }
    }

    /// A destination on loopback that takes one connection with TLS from
    /// `server`, echoes what it reads, and returns how that ended.
    fn destination(server: TlsServer) -> (Address, std::thread::JoinHandle<Result<(), String>>) {
        let l = Listener::bind(&Address::listen_on("0").unwrap()).unwrap();
        let at = l.local().clone();
        let t = std::thread::spawn(move || {
            let conn = loop {
                match l.accept() {
                    Ok((c, _)) => break c,
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            };
            conn.set_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(30))).unwrap();
            let mut s = conn.secure_server(&server).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 1 << 16];
            let mut w = s.try_clone().unwrap();
            loop {
                let n = s.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    return Ok(());
                }
                w.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            }
        });
        (at, t)
    }

    fn source(at: &Address, client: &TlsClient, name: &str) -> Result<Stream, TlsError> {
        let c = Stream::connect(at, Duration::from_secs(5)).unwrap();
        c.set_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(30))).unwrap();
        c.secure_client(client, name)
    }

    #[test]
    fn both_ends_verified_the_bytes_cross_both_ways_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("test CA");
        creds(dir.path(), &ca, &["localhost", "127.0.0.1"], &ca);
        let (at, dest) = destination(TlsServer::load(dir.path()).unwrap());
        let s = source(&at, &TlsClient::load(dir.path()).unwrap(), server_name(&at.to_string())).unwrap();
        // A writer and a reader on two handles at once, 8 MiB each way.
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut w = s.try_clone().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&sent).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        let mut r = s;
        let err = r.read_to_end(&mut back).unwrap_err();
        // The destination echoed every byte, then the stream ended without
        // a TLS close: both ends tell that from a clean end.
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
        writer.join().unwrap();
        let d = dest.join().unwrap().unwrap_err();
        assert!(d.contains("close_notify"), "{d}");
        assert!(back == data, "{} bytes came back, not the {} sent", back.len(), data.len());
    }

    #[test]
    fn a_source_whose_certificate_another_ca_signed_is_refused_and_told() {
        let dir = tempfile::tempdir().unwrap();
        let (good, rogue) = (ca("test CA"), ca("rogue CA"));
        creds(&dir.path().join("dest"), &good, &["localhost"], &good);
        creds(&dir.path().join("src"), &good, &["localhost"], &rogue);
        let (at, dest) = destination(TlsServer::load(&dir.path().join("dest")).unwrap());
        let client = TlsClient::load(&dir.path().join("src")).unwrap();
        // TLS 1.3: the client's handshake ends before the server judged its
        // certificate; the refusal is the first thing it reads.
        let mut s = source(&at, &client, "localhost").unwrap();
        let e = s.read(&mut [0u8; 16]).unwrap_err().to_string();
        assert_eq!(e, "received fatal alert: UnknownCA");
        let d = dest.join().unwrap().unwrap_err();
        assert_eq!(d, "TLS handshake: invalid peer certificate: UnknownIssuer");
    }

    #[test]
    fn a_destination_with_the_wrong_name_is_refused_and_told() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("test CA");
        creds(dir.path(), &ca, &["elsewhere.example"], &ca);
        let (at, dest) = destination(TlsServer::load(dir.path()).unwrap());
        let e = source(&at, &TlsClient::load(dir.path()).unwrap(), "localhost").unwrap_err().to_string();
        assert!(
            e.starts_with("TLS handshake: invalid peer certificate: certificate not valid for name \"localhost\""),
            "{e}"
        );
        let d = dest.join().unwrap().unwrap_err();
        assert_eq!(d, "TLS handshake: received fatal alert: BadCertificate");
    }

    #[test]
    fn a_plain_source_is_refused_in_plain_words_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("test CA");
        creds(dir.path(), &ca, &["localhost"], &ca);
        let (at, dest) = destination(TlsServer::load(dir.path()).unwrap());
        let plain = Stream::connect(&at, Duration::from_secs(5)).unwrap();
        plain.set_timeouts(Some(Duration::from_secs(30)), None).unwrap();
        let mut w = FrameWriter::new(plain.try_clone().unwrap(), false);
        w.send(&Frame::Hello(smudge::migration::frame::Hello::new(1 << 20, 1))).unwrap();
        w.flush().unwrap();
        let answer = smudge::migration::frame::FrameReader::new(plain).next_frame().unwrap();
        assert_eq!(answer, Frame::Ack(Ack::refused(Mode::Certs.plain_source())));
        let d = dest.join().unwrap().unwrap_err();
        assert_eq!(
            d,
            format!("TLS handshake: the source sent a plain migration stream: {}", Mode::Certs.plain_source())
        );

        let (at, dest) = destination(TlsServer::load(dir.path()).unwrap());
        let mut junk = Stream::connect(&at, Duration::from_secs(5)).unwrap();
        junk.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let d = dest.join().unwrap().unwrap_err();
        assert!(d.starts_with("TLS handshake: received corrupt message"), "{d}");
    }

    #[test]
    fn missing_or_empty_credentials_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = TlsClient::load(dir.path()).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", dir.path().join(CA_CERT).display())), "{e}");
        std::fs::write(dir.path().join(CA_CERT), "not pem").unwrap();
        let e = TlsServer::load(dir.path()).unwrap_err().to_string();
        assert_eq!(e, format!("{}: holds no certificate", dir.path().join(CA_CERT).display()));
    }

    /// A keys.psk file of one identity's key.
    fn key_file(dir: &Path, name: &str, line: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("{line}\n")).unwrap();
        p
    }

    const KEY: &str = "qemu:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn with_the_same_pre_shared_key_the_bytes_cross_and_with_another_both_ends_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let good = key_file(dir.path(), "good.psk", KEY);
        let (at, dest) = destination(TlsServer::psk(&good, None).unwrap());
        let mut s = source(&at, &TlsClient::psk(&good, None).unwrap(), "127.0.0.1").unwrap();
        s.write_all(b"after the proofs").unwrap();
        let mut back = [0u8; 16];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"after the proofs");
        drop(s);
        assert!(dest.join().unwrap().unwrap_err().contains("close_notify"));

        let other = key_file(dir.path(), "other.psk", "qemu:ffeeddccbbaa99887766554433221100");
        let (at, dest) = destination(TlsServer::psk(&good, None).unwrap());
        let e = source(&at, &TlsClient::psk(&other, None).unwrap(), "127.0.0.1").unwrap_err().to_string();
        assert_eq!(e, "TLS pre-shared key: the destination holds another key for identity \"qemu\"");
        let d = dest.join().unwrap().unwrap_err();
        assert_eq!(d, "TLS pre-shared key: the source's proof for identity \"qemu\" is wrong: it holds another key");
    }

    #[test]
    fn a_key_end_and_a_certificate_end_refuse_each_other_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("test CA");
        creds(dir.path(), &ca, &["localhost", "127.0.0.1"], &ca);
        let key = key_file(dir.path(), "keys.psk", KEY);
        let (at, dest) = destination(TlsServer::psk(&key, None).unwrap());
        let e = source(&at, &TlsClient::load(dir.path()).unwrap(), "127.0.0.1").unwrap_err().to_string();
        assert_eq!(
            e,
            "TLS handshake: the destination uses a pre-shared key (--tls-psk), this source certificates (--tls-creds)"
        );
        let d = dest.join().unwrap().unwrap_err();
        assert_eq!(
            d,
            "TLS handshake: the source uses certificates (--tls-creds), this destination a pre-shared key (--tls-psk)"
        );

        let (at, dest) = destination(TlsServer::load(dir.path()).unwrap());
        let e = source(&at, &TlsClient::psk(&key, None).unwrap(), "127.0.0.1").unwrap_err().to_string();
        assert_eq!(
            e,
            "TLS handshake: the destination uses certificates (--tls-creds), this source a pre-shared key (--tls-psk)"
        );
        let d = dest.join().unwrap().unwrap_err();
        assert_eq!(
            d,
            "TLS handshake: the source uses a pre-shared key (--tls-psk), this destination certificates (--tls-creds)"
        );
    }

    /// Relays plaintext between one TLS session with `a` and another with
    /// `b`, both in pre-shared-key mode, without the key.
    fn relay(a: std::net::TcpStream, b: std::net::TcpStream) {
        let relay_key = tempfile::tempdir().unwrap();
        let file = key_file(relay_key.path(), "any.psk", "qemu:0102030405060708090a0b0c0d0e0f10");
        let server = TlsServer::psk(&file, None).unwrap();
        let client = TlsClient::psk(&file, None).unwrap();
        let Ok(sa) = Secure::handshake(server.start().unwrap(), &a, Mode::Psk) else { return };
        let Ok(sb) = Secure::handshake(client.start("127.0.0.1").unwrap(), &b, Mode::Psk) else { return };
        let pipe = |mut from: Secure, fs: std::net::TcpStream, to: Secure, ts: std::net::TcpStream| {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = from.read(&fs, &fs, &mut buf) {
                    if to.write(&ts, &buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = ts.shutdown(std::net::Shutdown::Both);
                let _ = fs.shutdown(std::net::Shutdown::Both);
            })
        };
        let (ha, hb) = (sa.handle(), sb.handle());
        let one = pipe(sa, a.try_clone().unwrap(), hb, b.try_clone().unwrap());
        let two = pipe(sb, b, ha, a);
        one.join().unwrap();
        two.join().unwrap();
    }

    #[test]
    fn a_relay_between_two_sessions_cannot_pass_on_the_proofs() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "keys.psk", KEY);
        let (at, dest) = destination(TlsServer::psk(&key, None).unwrap());
        let Address::Tcp(dest_at) = at else { panic!("{at}") };
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let front_at = front.local_addr().unwrap();
        let mitm = std::thread::spawn(move || {
            let (a, _) = front.accept().unwrap();
            relay(a, std::net::TcpStream::connect(dest_at).unwrap());
        });
        let e =
            source(&Address::Tcp(front_at), &TlsClient::psk(&key, None).unwrap(), "127.0.0.1").unwrap_err().to_string();
        assert_eq!(e, "TLS pre-shared key: the destination holds another key for identity \"qemu\"");
        let d = dest.join().unwrap().unwrap_err();
        assert_eq!(d, "TLS pre-shared key: the source's proof for identity \"qemu\" is wrong: it holds another key");
        mitm.join().unwrap();
    }

    #[test]
    fn the_name_checked_is_the_host_or_localhost_for_a_unix_socket() {
        assert_eq!(server_name("dest.example:7000"), "dest.example");
        assert_eq!(server_name("10.0.0.2:7000"), "10.0.0.2");
        assert_eq!(server_name("[::1]:7000"), "::1");
        assert_eq!(server_name("unix:/run/m.sock"), "localhost");
    }
}
