//! Live migration between two smudge processes over TCP or a unix socket
//! ([`transport`]): the source's
//! pre-copy rounds ([`source`]) with auto-converge ([`converge`]), and the
//! destination that receives a VM and runs it ([`incoming`]). The wire
//! format and its checks are the library's `smudge::migration`.

pub mod converge;
pub mod incoming;
pub mod multifd;
pub mod postcopy_dest;
pub mod postcopy_source;
pub mod psk;
pub mod source;
pub mod tls;
pub mod transport;
