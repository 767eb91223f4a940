//! Live migration: the stream both ends speak ([`frame`]) and the
//! destination's side of it ([`receiver`]), which checks every frame
//! against the VM it is building before any byte reaches guest memory.
//! The source's pre-copy rounds live in the VMM, which owns the vCPUs;
//! a same-host handover sends no pages at all ([`local`]). The machine
//! state a stream carries is [`crate::machine_state`]'s, the same value a
//! snapshot saves.

pub mod checksum;
pub mod frame;
pub mod local;
pub mod postcopy;
pub mod receiver;
