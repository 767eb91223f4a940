//! The writeback engine: the Linux page cache's dirty-page writeback,
//! brought up to the hypervisor (docs/architecture.md maps the kernel onto KVM).
//!
//! ```text
//! kernel                                   smudge
//! PG_dirty / PG_writeback / PG_error       PageStates: dirty, under writeback, failed
//! inode->dirtied_when                      first-dirtied time per page (expiry)
//! write_cache_pages + writeback_control    Writeback::write_pages(&WritebackControl)
//! clear_page_dirty_for_io (page_mkclean)   DirtyLog::clear_dirty_for_io before the copy
//! ->writepage, bio merging                 Sink::write_set on coalesced extents
//! redirty_page_for_writepage,              a failed write-out re-dirties its pages and
//!   mapping_set_error                        records the error for the next sync
//! dirty_expire / dirty_writeback           WritebackPolicy: expiry, flusher period
//! dirty_background_*, dirty_ratio,         background threshold starts writeback early;
//!   balance_dirty_pages                      hard limit throttles the vCPUs (the VMM)
//! /proc/vmstat nr_dirty, nr_written, …     WritebackStats
//! ```
//!
//! Pages the guest dirties again as soon as they are written are *hot*
//! (the `hot` module): where the sink and the log allow it, the expiry
//! pass writes them without re-protecting them, so they cost no fault.
//!
//! A pass with `SyncMode::All` first tags every page dirty at that moment
//! and writes exactly those (the kernel's TOWRITE tag), so a sync finishes
//! however fast the guest keeps dirtying.

pub mod clock;
pub mod engine;
pub mod hot;
pub mod page_state;
pub mod policy;

pub use clock::{Clock, FakeClock, MonotonicClock};
pub use engine::{DirtyLog, HarvesterLog, SyncMode, Writeback, WritebackControl, WritebackError, WritebackStats};
pub use hot::{HotPages, HotPolicy};
pub use page_state::PageStates;
pub use policy::{parse_bytes, ParseSizeError, Threshold, WritebackPolicy};
