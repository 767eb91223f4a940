//! Where dirty pages go to last: the flusher that writes them back to the
//! backing file ([`flusher`]), snapshots of the running VM ([`snapshotter`])
//! with their pre-copy staging ([`precopy`]), and restore that loads a
//! snapshot chain behind a running guest ([`lazy`]) while it builds the
//! new memory file beside it ([`restore`]), and the durable mode's epochs
//! into a journal ([`epoch`]).

pub mod epoch;
pub mod flusher;
pub mod journal_cli;
pub mod lazy;
pub mod precopy;
pub mod restore;
pub mod snapshotter;
