//! # smudge
//!
//! Hypervisor-level dirty-page logging with KVM. Guest RAM is a `MAP_SHARED`
//! file mapping ([`memory`]); KVM logs which guest pages are written
//! ([`kvm`]); later layers turn those logs into persisted pages.
//!
//! The library takes a VM and guest memory; it does not own vCPUs. Every
//! ioctl and raw mapping of the project lives here, so the VMM crate can
//! forbid `unsafe`.
//!
//! What happens to a dirty bit, module by module:
//!
//! - logged: [`kvm`] (slots, dirty bitmaps and rings), [`vmm_bitmap`]
//!   (the VMM's own writes), gathered by [`harvest`] into [`dirty_set`]s,
//!   one per consumer;
//! - written back: [`writeback`] (the page-cache-style engine) through a
//!   [`sink`];
//! - saved: [`snapshot`] (format, write, read, chains), with the
//!   [`machine_state`] beside memory; and continuously, as consistent
//!   epochs any crash resumes from: [`journal`];
//! - sent: [`migration`] (the stream, the receiver's checks, post-copy),
//!   filled in behind the guest through [`uffd`].
//!
//! Shared by them: [`memory`] (the backing file, RAM layout and size
//! limits), [`file_io`] (sparse-file ranges and kernel copies). The
//! process around them: [`control`] (the API's requests), [`sigsys`] and
//! [`stop_signal`].

pub mod control;
pub mod dirty_set;
pub mod file_io;
pub mod fill;
pub mod harvest;
pub mod journal;
pub mod kvm;
pub mod machine_state;
pub mod memory;
pub mod migration;
pub mod sigsys;
pub mod sink;
pub mod snapshot;
pub mod stop_signal;
pub mod uffd;
pub mod vmm_bitmap;
pub mod writeback;

pub use guest_abi;
