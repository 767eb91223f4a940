//! Control of a VM from outside: the command line ([`cli`]), the JSON API
//! on a unix socket ([`api`]) and how its answers look to a person
//! ([`ctl_view`]), `smudge bench` handed to the benchmarks' binary
//! ([`bench`]), and SIGTERM/SIGINT as a clean stop ([`signals`]).

pub mod api;
pub mod bench;
pub mod cli;
pub mod ctl_view;
pub mod signals;
