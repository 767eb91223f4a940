//! # smudge
//!
//! Hypervisor-level dirty-page logging with KVM. Guest RAM is a `MAP_SHARED`
//! file mapping ([`memory`]); KVM logs which guest pages are written
//! ([`kvm`]); later layers turn those logs into persisted pages.
//!
//! The library takes a VM and guest memory; it does not own vCPUs. Every
//! ioctl and raw mapping of the project lives here, so the VMM crate can
//! forbid `unsafe`.

pub mod control;
pub mod dirty_set;
pub mod file_io;
pub mod harvest;
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
