//! Watching the guest dirty memory: the run's own dirty-log consumers and
//! final harvest ([`tracking`]), dirty-rate measurement ([`dirty_rate`]) and
//! heatmaps ([`heatmap`]).

pub mod dirty_rate;
pub mod heatmap;
pub mod tracking;
