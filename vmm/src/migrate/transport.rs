//! How migration connections travel: TCP (`HOST:PORT`) or a unix stream
//! socket (`unix:PATH`). One address, one listener and one stream type
//! for both, so the source, the parallel page connections, the
//! destination and post-copy are written once and do not care which.
//!
//! A unix listener is bound through the control API's socket binding: a
//! stale socket nobody listens on is replaced, anything else in the way
//! (a regular file, a live socket) is refused, and the socket appears only
//! once it listens, mode 0600. It is removed when the listener is dropped
//! (if the path still names the socket it made).
//!
//! With credentials, TLS wraps the stream ([`super::tls`]): the source's
//! [`Dialer`] runs the handshake as it connects, the destination's
//! [`Listener::admit`] as it takes a connection; what reads and writes the
//! stream stays the same.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::api::{self, ApiError};
use crate::control::signals::{self, OnStop};
use crate::migrate::psk::{self, Binding, PskError};
use crate::migrate::tls::{server_name, Secure, TlsClient, TlsError, TlsServer};

/// Where a migration connects or listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP address (resolved).
    Tcp(SocketAddr),
    /// A unix stream socket's path.
    Unix(PathBuf),
}

/// Why a migration address is not usable.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// `unix:` with nothing after it.
    #[error("\"unix:\" needs the socket's path after it (unix:PATH)")]
    NoPath,
    /// Neither form.
    #[error("{0:?} is not a migration address: expected HOST:PORT{1} or unix:PATH")]
    Malformed(String, &'static str),
    /// The host did not resolve.
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// The host resolved to nothing.
    #[error("{0} resolves to no address")]
    Nowhere(String),
}

impl Address {
    /// Where a source connects: `HOST:PORT` or `unix:PATH`.
    pub fn connect_to(s: &str) -> Result<Address, AddressError> {
        Self::parse(s, "")
    }

    /// Where a destination listens: as [`Address::connect_to`], or a
    /// `PORT` alone for loopback (127.0.0.1).
    pub fn listen_on(s: &str) -> Result<Address, AddressError> {
        match !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
            true => Self::parse(&format!("127.0.0.1:{s}"), ", PORT"),
            false => Self::parse(s, ", PORT"),
        }
    }

    fn parse(s: &str, port_alone: &'static str) -> Result<Address, AddressError> {
        if let Some(path) = s.strip_prefix("unix:") {
            return match path.is_empty() {
                true => Err(AddressError::NoPath),
                false => Ok(Address::Unix(PathBuf::from(path))),
            };
        }
        let malformed = || AddressError::Malformed(s.to_string(), port_alone);
        let (host, port) = s.rsplit_once(':').ok_or_else(malformed)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(malformed());
        }
        let resolve = |source| AddressError::Resolve { addr: s.to_string(), source };
        s.to_socket_addrs().map_err(resolve)?.next().map(Address::Tcp).ok_or_else(|| AddressError::Nowhere(s.into()))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected socket of either kind.
#[derive(Debug)]
enum Socket {
    /// TCP (Nagle off).
    Tcp(TcpStream),
    /// A unix stream socket.
    Unix(UnixStream),
}

/// Calls the same method on whichever socket `$s` holds.
macro_rules! either {
    ($s:expr, $c:ident => $e:expr) => {
        match $s {
            Socket::Tcp($c) => $e,
            Socket::Unix($c) => $e,
        }
    };
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        either!(*self, s => (&*s).read(buf))
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        either!(*self, s => (&*s).write(buf))
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        either!(*self, s => (&*s).write_vectored(bufs))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        either!(*self, s => (&*s).flush())
    }
}

/// One migration connection, over either transport, plain or with TLS.
#[derive(Debug)]
pub struct Stream {
    sock: Socket,
    tls: Option<Secure>,
}

impl Stream {
    /// Connects to `addr` (a TCP connect waits at most `limit`; a unix
    /// one fails at once when nobody listens).
    pub fn connect(addr: &Address, limit: Duration) -> std::io::Result<Stream> {
        let sock = match addr {
            Address::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, limit)?;
                s.set_nodelay(true)?;
                Socket::Tcp(s)
            }
            Address::Unix(p) => Socket::Unix(UnixStream::connect(p)?),
        };
        Ok(Stream { sock, tls: None })
    }

    /// This connection with TLS, as the source: the destination's
    /// certificate is checked against `tls`' CA and `name`.
    /// With a pre-shared key, the key proofs follow the handshake.
    pub fn secure_client(self, tls: &TlsClient, name: &str) -> Result<Stream, TlsError> {
        let secure = Secure::handshake(tls.start(name)?, &self.sock, tls.mode())?;
        let mut s = Stream { sock: self.sock, tls: Some(secure) };
        if let Some(key) = tls.key() {
            let binding = s.binding()?;
            psk::source_side(&mut s, key, &binding).map_err(psk_failed)?;
        }
        Ok(s)
    }

    /// This connection with TLS, as the destination: the source must show
    /// a certificate `tls`' CA signed.
    /// With a pre-shared key, the key proofs follow the handshake.
    pub fn secure_server(self, tls: &TlsServer) -> Result<Stream, TlsError> {
        let secure = Secure::handshake(tls.start()?, &self.sock, tls.mode())?;
        let mut s = Stream { sock: self.sock, tls: Some(secure) };
        if let Some(keys) = tls.keys() {
            let binding = s.binding()?;
            psk::destination_side(&mut s, keys, &binding).map_err(psk_failed)?;
        }
        Ok(s)
    }

    fn binding(&self) -> Result<Binding, TlsError> {
        match &self.tls {
            Some(t) => t.binding(),
            None => Err(TlsError::Handshake(std::io::Error::other("no TLS session to bind a key to"))),
        }
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> std::io::Result<Stream> {
        let sock = match &self.sock {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        };
        Ok(Stream { sock, tls: self.tls.as_ref().map(Secure::handle) })
    }

    /// Shuts the connection down (every handle on it).
    pub fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        either!(&self.sock, s => s.shutdown(how))
    }

    /// Longest a read blocks (`None`: for ever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        either!(&self.sock, s => s.set_read_timeout(t))
    }

    /// Longest a write blocks (`None`: for ever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        either!(&self.sock, s => s.set_write_timeout(t))
    }

    /// Both timeouts at once.
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }

    /// Shuts this connection (a handle on it) down when the first stop
    /// signal comes, so a read or write blocked on it ends at once; `what`
    /// as for [`signals::on_stop`].
    pub fn shut_on_stop(&self, what: String) -> std::io::Result<OnStop> {
        let conn = self.try_clone()?;
        Ok(signals::on_stop(what, move |_| {
            let _ = conn.shutdown(Shutdown::Both);
        }))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.tls {
            Some(t) => t.read(&self.sock, &self.sock, buf),
            None => (&self.sock).read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.tls {
            Some(t) => t.write(&self.sock, buf),
            None => (&self.sock).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match &self.tls {
            Some(t) => {
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &**b);
                t.write(&self.sock, first)
            }
            None => (&self.sock).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        (&self.sock).flush()
    }
}

/// A key exchange that failed on the stream is a handshake that did
/// (a stalled peer is told apart from a refusal that way).
fn psk_failed(e: PskError) -> TlsError {
    match e {
        PskError::Io(e) => TlsError::Handshake(e),
        e => TlsError::Psk(e),
    }
}

/// Where and how a source connects: the address, and TLS when it has
/// credentials.
#[derive(Debug, Clone)]
pub struct Dialer {
    addr: Address,
    /// The credentials and the name the destination's certificate must hold.
    tls: Option<(TlsClient, String)>,
}

/// Why a source could not open a connection.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The address is not one.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// Connecting failed.
    #[error("cannot connect to {to}: {source}")]
    Connect {
        /// The address.
        to: Address,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// TLS refused the destination or was refused.
    #[error("{to}: {source}")]
    Tls {
        /// The address.
        to: Address,
        /// Why.
        #[source]
        source: TlsError,
    },
}

impl Dialer {
    /// Connects to `to` (`HOST:PORT`, `unix:PATH`), with TLS if `tls`.
    pub fn new(to: &str, tls: Option<TlsClient>) -> Result<Dialer, AddressError> {
        let addr = Address::connect_to(to)?;
        Ok(Dialer { addr, tls: tls.map(|t| (t, server_name(to).to_string())) })
    }

    /// Where it connects.
    pub fn addr(&self) -> &Address {
        &self.addr
    }

    /// Opens a connection, its reads and writes limited to `io` (the TLS
    /// handshake too).
    pub fn dial(&self, io: Duration) -> Result<Stream, DialError> {
        let connect = |source| DialError::Connect { to: self.addr.clone(), source };
        let s = Stream::connect(&self.addr, Duration::from_secs(5)).map_err(connect)?;
        s.set_timeouts(Some(io), Some(io)).map_err(connect)?;
        match &self.tls {
            Some((t, name)) => {
                s.secure_client(t, name).map_err(|source| DialError::Tls { to: self.addr.clone(), source })
            }
            None => Ok(s),
        }
    }
}

/// Why a destination cannot listen.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Something that is not a socket is at the unix path.
    #[error("{0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A live socket is at the unix path.
    #[error("{0}: another process is listening on this socket")]
    InUse(PathBuf),
    /// bind/listen failed.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// Where.
        addr: Address,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A destination's listening socket. Dropping a unix one removes its
/// socket file.
#[derive(Debug)]
pub struct Listener {
    bound: Bound,
    /// Every accepted connection's TLS, if set.
    tls: Option<TlsServer>,
    /// Where it listens (a TCP port 0 resolved to the port picked).
    local: Address,
}

#[derive(Debug)]
enum Bound {
    Tcp(TcpListener),
    /// The socket file's (device, inode): removed only while the path
    /// still names this socket.
    Unix(UnixListener, (u64, u64)),
}

impl Listener {
    /// Listens on `addr`, non-blocking (accepts are polled).
    pub fn bind(addr: &Address) -> Result<Listener, ListenError> {
        let bind_err = |source| ListenError::Bind { addr: addr.clone(), source };
        match addr {
            Address::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(bind_err)?;
                let local = Address::Tcp(l.local_addr().map_err(bind_err)?);
                l.set_nonblocking(true).map_err(bind_err)?;
                Ok(Listener { bound: Bound::Tcp(l), local, tls: None })
            }
            Address::Unix(p) => {
                let l = api::bind(p).map_err(|e| match e {
                    ApiError::NotASocket(p) => ListenError::NotASocket(p),
                    ApiError::InUse(p) => ListenError::InUse(p),
                    ApiError::Bind { source, .. } => bind_err(source),
                })?;
                let meta = std::fs::symlink_metadata(p).map_err(bind_err)?;
                Ok(Listener { bound: Bound::Unix(l, (meta.dev(), meta.ino())), local: addr.clone(), tls: None })
            }
        }
    }

    /// Requires TLS of every connection ([`Listener::admit`]).
    pub fn with_tls(mut self, tls: Option<TlsServer>) -> Listener {
        self.tls = tls;
        self
    }

    /// Whether connections are plain TCP on an address other hosts reach.
    pub fn open_to_others(&self) -> bool {
        self.tls.is_none() && matches!(&self.local, Address::Tcp(a) if !a.ip().is_loopback())
    }

    /// An accepted connection, after the TLS handshake if the listener
    /// requires TLS (limited to `io`, as its reads and writes are).
    pub fn admit(&self, s: Stream, io: Duration) -> Result<Stream, TlsError> {
        s.set_timeouts(Some(io), Some(io)).map_err(TlsError::Handshake)?;
        match &self.tls {
            Some(t) => s.secure_server(t).map_err(|e| match e {
                TlsError::Handshake(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    TlsError::Stalled(io.as_secs())
                }
                e => e,
            }),
            None => Ok(s),
        }
    }

    /// Where it listens.
    pub fn local(&self) -> &Address {
        &self.local
    }

    /// Accepts a connection, if one waits (`WouldBlock` if none); the
    /// stream blocks. Returns it and who it is from.
    pub fn accept(&self) -> std::io::Result<(Stream, String)> {
        let (s, peer) = match &self.bound {
            Bound::Tcp(l) => {
                l.accept().and_then(|(s, a)| s.set_nodelay(true).map(|_| (Socket::Tcp(s), a.to_string())))?
            }
            // A connecting unix socket has no name of its own.
            Bound::Unix(l, _) => (Socket::Unix(l.accept()?.0), self.local.to_string()),
        };
        either!(&s, c => c.set_nonblocking(false))?;
        Ok((Stream { sock: s, tls: None }, peer))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let (Bound::Unix(_, id), Address::Unix(p)) = (&self.bound, &self.local) {
            if same_file(p, *id) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

fn same_file(p: &Path, (dev, ino): (u64, u64)) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_what_is_expected() {
        assert_eq!(Address::connect_to("127.0.0.1:7").unwrap(), Address::Tcp("127.0.0.1:7".parse().unwrap()));
        assert_eq!(Address::listen_on("0").unwrap(), Address::Tcp("127.0.0.1:0".parse().unwrap()));
        assert_eq!(Address::connect_to("unix:/run/m.sock").unwrap(), Address::Unix("/run/m.sock".into()));
        assert_eq!(Address::connect_to("unix:/run/m.sock").unwrap().to_string(), "unix:/run/m.sock");
        let err = |r: Result<Address, AddressError>| r.unwrap_err().to_string();
        assert_eq!(err(Address::connect_to("unix:")), "\"unix:\" needs the socket's path after it (unix:PATH)");
        assert_eq!(err(Address::connect_to("7")), "\"7\" is not a migration address: expected HOST:PORT or unix:PATH");
        assert_eq!(
            err(Address::listen_on("host:port")),
            "\"host:port\" is not a migration address: expected HOST:PORT, PORT or unix:PATH"
        );
        assert_eq!(
            err(Address::connect_to(":80")),
            "\":80\" is not a migration address: expected HOST:PORT or unix:PATH"
        );
        assert_eq!(
            err(Address::connect_to("/tmp/m.sock")),
            "\"/tmp/m.sock\" is not a migration address: expected HOST:PORT or unix:PATH"
        );
    }

    #[test]
    fn a_unix_listener_replaces_only_a_dead_socket_and_removes_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.sock");
        let addr = Address::Unix(p.clone());
        // A regular file is never replaced.
        std::fs::write(&p, b"keep").unwrap();
        let e = Listener::bind(&addr).unwrap_err();
        assert_eq!(e.to_string(), format!("{}: exists and is not a socket; refusing to replace it", p.display()));
        assert_eq!(std::fs::read(&p).unwrap(), b"keep");
        std::fs::remove_file(&p).unwrap();
        // A stale socket (nobody listens) is.
        drop(UnixListener::bind(&p).unwrap());
        let l = Listener::bind(&addr).unwrap();
        // A live one is not.
        let e = Listener::bind(&addr).unwrap_err();
        assert_eq!(e.to_string(), format!("{}: another process is listening on this socket", p.display()));
        // (That check connected and hung up.)
        let (mut probe, _) = l.accept().unwrap();
        assert_eq!(probe.read(&mut [0u8; 1]).unwrap(), 0);
        let mut c = Stream::connect(&addr, Duration::from_secs(5)).unwrap();
        let (mut s, peer) = l.accept().unwrap();
        assert_eq!(peer, format!("unix:{}", p.display()));
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        drop(l);
        assert!(!p.exists(), "the listener's socket file outlived it");
        let e = Stream::connect(&addr, Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
