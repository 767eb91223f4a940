//! The smudge VMM: boots a PVH guest on file-backed `MAP_SHARED` RAM with
//! KVM dirty logging on. The `smudge` binary is its command-line edge; tests
//! and benchmarks use this library directly.
//!
//! No `unsafe` here: every ioctl that needs it lives in the `smudge` library.

#![forbid(unsafe_code)]

pub mod api;
pub mod bench;
pub mod boot;
pub mod cli;
pub mod ctl_view;
pub mod devices;
pub mod dirty;
pub mod dirty_rate;
pub mod event_loop;
pub mod flusher;
pub mod guest_image;
pub mod harness;
pub mod heatmap;
pub mod lazy;
pub mod migrate;
pub mod outcome;
pub mod precopy;
pub mod seccomp;
pub mod signals;
pub mod snapshotter;
pub mod vcpu;
pub mod vcpu_threads;
pub mod vm;
