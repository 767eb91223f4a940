//! Fuzzes the migration stream as a destination with TLS gets it: over a
//! TLS 1.3 session (rustls, ring, the suites and version smudge uses)
//! whose handshake ran in memory, a peer that passed the handshake sends
//! either a stream of its own making, encrypted as a real source's is
//! (first byte even), or raw bytes where its TLS records should be (first
//! byte odd). Either must decode to frames or end in an error — a TLS
//! alert, a frame error — never a panic.
#![no_main]

use std::io::{Read, Write};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};
use smudge::migration::frame::FrameReader;
use smudge::migration::receiver::check_hello;

/// Both ends' configurations: a certificate for "localhost" that the
/// client trusts, TLS 1.3 only.
fn configs() -> &'static (Arc<ClientConfig>, Arc<ServerConfig>) {
    static C: OnceLock<(Arc<ClientConfig>, Arc<ServerConfig>)> = OnceLock::new();
    C.get_or_init(|| {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
        let cert: CertificateDer<'static> = made.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.key_pair.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(cert.clone()).expect("the certificate as a root");
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("the server's certificate");
        (Arc::new(client), Arc::new(server))
    })
}

/// Moves what `from` has to send into `to`; false if `to` refused it.
fn pass(from: &mut Connection, to: &mut Connection) -> bool {
    let mut wire = Vec::new();
    while from.wants_write() {
        if from.write_tls(&mut wire).is_err() {
            return false;
        }
    }
    let mut rest = &wire[..];
    while !rest.is_empty() {
        match to.read_tls(&mut rest) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        if to.process_new_packets().is_err() {
            return false;
        }
    }
    true
}

/// Feeds `bytes` to the destination as TLS records; the plaintext it
/// yields, or None once it refused them.
fn receive(server: &mut Connection, mut bytes: &[u8]) -> Option<Vec<u8>> {
    let mut plain = Vec::new();
    while !bytes.is_empty() {
        match server.read_tls(&mut bytes) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return None,
        }
        server.process_new_packets().ok()?;
        let _ = server.reader().read_to_end(&mut plain);
    }
    Some(plain)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let (client, server) = configs();
    let name = "localhost".try_into().expect("a DNS name");
    let mut c: Connection = ClientConnection::new(client.clone(), name).expect("a client").into();
    let mut s: Connection = ServerConnection::new(server.clone()).expect("a server").into();
    while c.is_handshaking() || s.is_handshaking() {
        assert!(pass(&mut c, &mut s) && pass(&mut s, &mut c), "the in-memory handshake failed");
    }
    let plain = if mode % 2 == 0 {
        // A stream of the peer's making, encrypted as a source's is (as
        // much at a time as rustls takes).
        let (mut plain, mut rest) = (Vec::new(), body);
        while !rest.is_empty() {
            let n = c.writer().write(rest).expect("plaintext into the client");
            rest = &rest[n..];
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).expect("records into a Vec");
            }
            plain.extend(receive(&mut s, &wire).expect("the peer's own records decrypt"));
        }
        assert_eq!(plain, body, "the destination read what the peer sent");
        plain
    } else {
        // Bytes where the records should be: refused by TLS, whatever
        // they are (only the peer's keys make records that decrypt).
        match receive(&mut s, body) {
            None => return,
            Some(p) => p,
        }
    };
    let mut r = FrameReader::new(&plain[..]);
    while let Ok(frame) = r.next_frame() {
        if let smudge::migration::frame::Frame::Hello(_) = frame {
            let _ = check_hello(frame);
        }
    }
});
