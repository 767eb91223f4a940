//! A pre-shared key instead of certificates, for tests and labs
//! (`--tls-psk FILE`, the file in QEMU's `tls-creds-psk` `keys.psk`
//! format: `IDENTITY:HEXKEY` lines).
//!
//! rustls has no TLS 1.3 external-PSK handshake, so the key is bound to
//! the channel instead: both ends run TLS 1.3 with an ephemeral
//! self-signed certificate nobody checks ([`super::tls`]), and right after
//! the handshake each proves it holds the key with
//! HMAC-SHA256(key, the session's exporter under a fixed label and its
//! role's context, and the identity). A man in the middle runs two
//! sessions whose exporters differ, so neither end accepts its proofs.
//! The exchange ends before any migration frame is read or written:
//!
//! ```text
//! source → destination   identity length (u8), identity, source proof (32)
//! destination → source   verdict (u8); if 0, destination proof (32)
//! source → destination   verdict (u8)
//! ```
//!
//! Verdicts: 0 accepted, 1 no key for that identity, 2 wrong proof.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ring::hmac;

/// The shortest key taken, in bytes.
pub const MIN_KEY: usize = 16;
/// The identity QEMU's client uses unless told otherwise.
pub const QEMU_IDENTITY: &str = "qemu";
/// The exporter label the proofs are bound to.
pub(super) const EXPORTER_LABEL: &[u8] = b"EXPORTER-smudge-migration-psk";
/// The exporter contexts of each end's proof.
pub(super) const SOURCE_CONTEXT: &[u8] = b"source";
/// See [`SOURCE_CONTEXT`].
pub(super) const DESTINATION_CONTEXT: &[u8] = b"destination";

const ACCEPTED: u8 = 0;
const NO_SUCH_IDENTITY: u8 = 1;
const WRONG_PROOF: u8 = 2;
const PROOF: usize = 32;

/// Why a key file is not usable, or why a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum PskError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is not `IDENTITY:HEXKEY`.
    #[error("{}:{line}: {why} (expected IDENTITY:HEXKEY, as QEMU's keys.psk)", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// Its line number (from 1).
        line: usize,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A key is too short to be one.
    #[error(
        "{}: the key of {identity:?} is {len} bytes; a pre-shared key needs at least {MIN_KEY} (32 hex digits)",
        path.display()
    )]
    Short {
        /// The file.
        path: PathBuf,
        /// Whose key.
        identity: String,
        /// Its length.
        len: usize,
    },
    /// The file holds no key at all, or none for the identity asked.
    #[error("{}: holds no key{}", path.display(), identity.as_ref().map(|i| format!(" for identity {i:?}")).unwrap_or_default())]
    NoKey {
        /// The file.
        path: PathBuf,
        /// The identity asked for.
        identity: Option<String>,
    },
    /// The peer does not hold the key (or sits between us and it).
    #[error("TLS pre-shared key: {0}")]
    Refused(String),
    /// The stream failed during the exchange.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The keys of a `keys.psk` file, in its order.
#[derive(Clone)]
struct KeyFile {
    keys: Vec<(String, Vec<u8>)>,
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

impl KeyFile {
    fn load(path: &Path) -> Result<KeyFile, PskError> {
        let text = std::fs::read_to_string(path).map_err(|source| PskError::Read { path: path.into(), source })?;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let bad = |why| PskError::Line { path: path.into(), line: i + 1, why };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (identity, hex) = line.split_once(':').ok_or_else(|| bad("no ':'"))?;
            if identity.is_empty() || identity.len() > 255 {
                return Err(bad("the identity must be 1 to 255 bytes"));
            }
            let key = unhex(hex).ok_or_else(|| bad("the key is not hex digits"))?;
            if key.len() < MIN_KEY {
                return Err(PskError::Short { path: path.into(), identity: identity.into(), len: key.len() });
            }
            keys.push((identity.to_string(), key));
        }
        match keys.is_empty() {
            true => Err(PskError::NoKey { path: path.into(), identity: None }),
            false => Ok(KeyFile { keys }),
        }
    }

    /// Only the key of `identity`, if given.
    fn only(self, path: &Path, identity: Option<&str>) -> Result<KeyFile, PskError> {
        let Some(want) = identity else { return Ok(self) };
        let keys: Vec<_> = self.keys.into_iter().filter(|(i, _)| i == want).collect();
        match keys.is_empty() {
            true => Err(PskError::NoKey { path: path.into(), identity: Some(want.into()) }),
            false => Ok(KeyFile { keys }),
        }
    }
}

/// The source's key: the identity it presents (`--tls-psk-identity`,
/// else the file's first) and the key.
#[derive(Clone)]
pub struct SourceKey {
    identity: String,
    key: hmac::Key,
}

impl std::fmt::Debug for SourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SourceKey({:?})", self.identity)
    }
}

impl SourceKey {
    /// Loads `path`, taking `identity`'s key or the first one.
    pub fn load(path: &Path, identity: Option<&str>) -> Result<SourceKey, PskError> {
        let file = KeyFile::load(path)?.only(path, identity)?;
        let (identity, key) = &file.keys[0];
        Ok(SourceKey { identity: identity.clone(), key: hmac::Key::new(hmac::HMAC_SHA256, key) })
    }
}

/// The destination's keys: every identity of the file, or only
/// `--tls-psk-identity`'s.
#[derive(Clone)]
pub struct DestinationKeys {
    keys: Vec<(String, hmac::Key)>,
}

impl std::fmt::Debug for DestinationKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<_> = self.keys.iter().map(|(i, _)| i).collect();
        write!(f, "DestinationKeys({ids:?})")
    }
}

impl DestinationKeys {
    /// Loads `path`, keeping only `identity`'s key if given.
    pub fn load(path: &Path, identity: Option<&str>) -> Result<DestinationKeys, PskError> {
        let file = KeyFile::load(path)?.only(path, identity)?;
        let keys = file.keys.into_iter().map(|(i, k)| (i, hmac::Key::new(hmac::HMAC_SHA256, &k))).collect();
        Ok(DestinationKeys { keys })
    }
}

/// One session's exporter values, one per role's proof.
pub(super) struct Binding {
    /// Under [`SOURCE_CONTEXT`].
    pub source: [u8; 32],
    /// Under [`DESTINATION_CONTEXT`].
    pub destination: [u8; 32],
}

fn message(exported: &[u8; 32], identity: &str) -> Vec<u8> {
    let mut m = exported.to_vec();
    m.extend_from_slice(identity.as_bytes());
    m
}

fn proof(key: &hmac::Key, exported: &[u8; 32], identity: &str) -> [u8; PROOF] {
    let mut p = [0u8; PROOF];
    p.copy_from_slice(hmac::sign(key, &message(exported, identity)).as_ref());
    p
}

fn checks(key: &hmac::Key, exported: &[u8; 32], identity: &str, theirs: &[u8; PROOF]) -> bool {
    // Constant time.
    hmac::verify(key, &message(exported, identity), theirs).is_ok()
}

fn read_u8(s: &mut impl Read) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

/// The source's half: proves its key, checks the destination's proof and
/// tells it the verdict.
pub(super) fn source_side<S: Read + Write>(s: &mut S, key: &SourceKey, b: &Binding) -> Result<(), PskError> {
    let id = &key.identity;
    let mut hello = vec![id.len() as u8];
    hello.extend_from_slice(id.as_bytes());
    hello.extend_from_slice(&proof(&key.key, &b.source, id));
    s.write_all(&hello)?;
    s.flush()?;
    match read_u8(s)? {
        ACCEPTED => {}
        NO_SUCH_IDENTITY => return Err(PskError::Refused(format!("the destination holds no key for identity {id:?}"))),
        WRONG_PROOF => {
            return Err(PskError::Refused(format!("the destination holds another key for identity {id:?}")));
        }
        v => return Err(PskError::Refused(format!("the destination answered {v}, not a verdict"))),
    }
    let mut theirs = [0u8; PROOF];
    s.read_exact(&mut theirs)?;
    let ok = checks(&key.key, &b.destination, id, &theirs);
    s.write_all(&[if ok { ACCEPTED } else { WRONG_PROOF }])?;
    s.flush()?;
    match ok {
        true => Ok(()),
        false => Err(PskError::Refused(format!(
            "the destination's proof for identity {id:?} is wrong: it does not hold this key"
        ))),
    }
}

/// The destination's half: checks the source's proof, answers with its
/// own, and waits for the source's verdict on it.
pub(super) fn destination_side<S: Read + Write>(
    s: &mut S,
    keys: &DestinationKeys,
    b: &Binding,
) -> Result<(), PskError> {
    let len = read_u8(s)? as usize;
    let mut id = vec![0u8; len];
    s.read_exact(&mut id)?;
    let mut theirs = [0u8; PROOF];
    s.read_exact(&mut theirs)?;
    let id = String::from_utf8_lossy(&id).into_owned();
    let refuse = |s: &mut S, verdict: u8, why: String| -> Result<(), PskError> {
        s.write_all(&[verdict])?;
        s.flush()?;
        Err(PskError::Refused(why))
    };
    let Some((_, key)) = keys.keys.iter().find(|(i, _)| *i == id) else {
        return refuse(s, NO_SUCH_IDENTITY, format!("the source's identity {id:?} has no key here"));
    };
    if !checks(key, &b.source, &id, &theirs) {
        return refuse(
            s,
            WRONG_PROOF,
            format!("the source's proof for identity {id:?} is wrong: it holds another key"),
        );
    }
    let mut answer = vec![ACCEPTED];
    answer.extend_from_slice(&proof(key, &b.destination, &id));
    s.write_all(&answer)?;
    s.flush()?;
    match read_u8(s)? {
        ACCEPTED => Ok(()),
        _ => Err(PskError::Refused(format!("the source found this destination's proof for identity {id:?} wrong"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.psk");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn a_qemu_key_file_is_read_and_its_faults_are_named() {
        let key = "00112233445566778899aabbccddeeff";
        let (_d, p) = file(&format!("qemu:{key}\nlab:{key}{key}\n"));
        assert_eq!(SourceKey::load(&p, None).unwrap().identity, "qemu");
        assert_eq!(SourceKey::load(&p, Some("lab")).unwrap().identity, "lab");
        let e = SourceKey::load(&p, Some("other")).unwrap_err().to_string();
        assert_eq!(e, format!("{}: holds no key for identity \"other\"", p.display()));
        assert_eq!(format!("{:?}", DestinationKeys::load(&p, None).unwrap()), "DestinationKeys([\"qemu\", \"lab\"])");

        let (_d, p) = file("qemu:00112233445566778899aabbccddee\n");
        let e = DestinationKeys::load(&p, None).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: the key of \"qemu\" is 15 bytes; a pre-shared key needs at least 16 (32 hex digits)",
                p.display()
            )
        );
        let (_d, p) = file("qemu 0011\n");
        let e = SourceKey::load(&p, None).unwrap_err().to_string();
        assert_eq!(e, format!("{}:1: no ':' (expected IDENTITY:HEXKEY, as QEMU's keys.psk)", p.display()));
        let (_d, p) = file(&format!("\nqemu:{key}zz\n"));
        let e = SourceKey::load(&p, None).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}:2: the key is not hex digits (expected IDENTITY:HEXKEY, as QEMU's keys.psk)", p.display())
        );
        let (_d, p) = file("\n");
        assert_eq!(SourceKey::load(&p, None).unwrap_err().to_string(), format!("{}: holds no key", p.display()));
    }

    /// Both halves over a socket pair, each with its own binding (a man in
    /// the middle's two sessions have two).
    fn exchange(src: SourceKey, dst: DestinationKeys, same_session: bool) -> (Result<(), String>, Result<(), String>) {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let one = Binding { source: [1; 32], destination: [2; 32] };
        let other = Binding { source: [3; 32], destination: [4; 32] };
        let d = std::thread::spawn(move || {
            destination_side(&mut b, &dst, if same_session { &one } else { &other }).map_err(|e| e.to_string())
        });
        let one = Binding { source: [1; 32], destination: [2; 32] };
        let s = source_side(&mut a, &src, &one).map_err(|e| e.to_string());
        (s, d.join().unwrap())
    }

    #[test]
    fn only_the_same_key_in_the_same_session_passes() {
        let k1 = "00112233445566778899aabbccddeeff";
        let k2 = "ffeeddccbbaa99887766554433221100";
        let (_d1, p1) = file(&format!("qemu:{k1}\n"));
        let (_d2, p2) = file(&format!("qemu:{k2}\nlab:{k1}\n"));
        let src = |p: &Path, id| SourceKey::load(p, id).unwrap();
        let dst = |p: &Path| DestinationKeys::load(p, None).unwrap();
        assert_eq!(exchange(src(&p1, None), dst(&p1), true), (Ok(()), Ok(())));
        // The right identity's key is picked among several.
        let (_d3, p3) = file(&format!("lab:{k1}\n"));
        assert_eq!(exchange(src(&p3, None), dst(&p2), true), (Ok(()), Ok(())));
        assert_eq!(
            exchange(src(&p1, None), dst(&p2), true),
            (
                Err("TLS pre-shared key: the destination holds another key for identity \"qemu\"".into()),
                Err("TLS pre-shared key: the source's proof for identity \"qemu\" is wrong: it holds another key"
                    .into())
            )
        );
        let (_d4, p4) = file(&format!("other:{k1}\n"));
        assert_eq!(
            exchange(src(&p4, None), dst(&p1), true),
            (
                Err("TLS pre-shared key: the destination holds no key for identity \"other\"".into()),
                Err("TLS pre-shared key: the source's identity \"other\" has no key here".into())
            )
        );
        // The same key, relayed between two sessions: refused.
        let (s, d) = exchange(src(&p1, None), dst(&p1), false);
        assert_eq!(s.unwrap_err(), "TLS pre-shared key: the destination holds another key for identity \"qemu\"");
        assert_eq!(
            d.unwrap_err(),
            "TLS pre-shared key: the source's proof for identity \"qemu\" is wrong: it holds another key"
        );
    }
}
