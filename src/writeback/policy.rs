//! Writeback policy: the kernel's `vm.dirty_*` knobs for one VM.
//!
//! | knob | kernel | smudge default | why |
//! | --- | --- | --- | --- |
//! | flusher period | `dirty_writeback_centisecs` 5 s | 250 ms | a harvest costs ~0.02 ms (clean) to a few ms (1 GiB dirty) here, so a short period is cheap; it bounds staleness and keeps a snapshot's residue small |
//! | expiry | `dirty_expire_centisecs` 30 s | 30 s | writing a hot page back through the backing file costs the guest two faults here (our re-protect, then the host's `page_mkclean` through the MMU notifier and ext4's `page_mkwrite`), ~30 us a page; `bench writeback` measured a 10 %-hot guest at 0.06-0.09x its unlogged speed with 1 s expiry and 0.25-0.40x with 5 s; at 30 s one such cycle per 30 s costs a few percent |
//! | background | `dirty_background_ratio` 10 % | 10 % of RAM | start writing before expiry when a lot is dirty |
//! | hard limit | `dirty_ratio` 20 % | 40 % of RAM | above it the vCPUs are throttled; higher than the kernel's since a guest's hot set should stay writable |

use std::str::FromStr;
use std::time::Duration;

/// A threshold as bytes or as a percentage of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    /// Absolute bytes.
    Bytes(u64),
    /// Percent of guest RAM (0..=100).
    Percent(u8),
}

impl Threshold {
    /// The threshold in pages, for `ram_bytes` of RAM.
    pub fn pages(self, ram_bytes: u64, page_size: u64) -> u64 {
        match self {
            Threshold::Bytes(b) => b / page_size,
            Threshold::Percent(p) => ram_bytes / page_size * u64::from(p) / 100,
        }
    }
}

/// Why a byte size or a threshold did not parse (each names the text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSizeError {
    /// Not a number with an optional binary unit.
    #[error("'{0}' is not a size (examples: 256M, 1G, 65536)")]
    NotASize(String),
    /// More bytes than a `u64` holds.
    #[error("'{0}' is too large")]
    TooLarge(String),
    /// A `%` after something that is not a whole number 0..=255.
    #[error("'{0}' is not a percentage")]
    NotAPercentage(String),
    /// A percentage of RAM above 100.
    #[error("'{0}' is more than 100%")]
    OverHundredPercent(String),
}

/// Parses a byte size: `256M`, `1G`, `64k`, `4096` (binary units).
pub fn parse_bytes(s: &str) -> Result<u64, ParseSizeError> {
    let s = s.trim();
    let (num, shift) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|_| ParseSizeError::NotASize(s.into()))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| ParseSizeError::TooLarge(s.into()))
}

impl FromStr for Threshold {
    type Err = ParseSizeError;

    /// `10%`, `64M`, `1G`, `4096`.
    fn from_str(s: &str) -> Result<Self, ParseSizeError> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let v: u8 = p.parse().map_err(|_| ParseSizeError::NotAPercentage(s.into()))?;
            if v > 100 {
                return Err(ParseSizeError::OverHundredPercent(s.into()));
            }
            return Ok(Threshold::Percent(v));
        }
        parse_bytes(s).map(Threshold::Bytes)
    }
}

/// When and how much to write back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritebackPolicy {
    /// Flusher period (`dirty_writeback`).
    pub writeback_interval: Duration,
    /// Pages dirty this long are written at the next flush (`dirty_expire`).
    pub dirty_expire: Duration,
    /// Above this, write the oldest pages even before they expire.
    pub background: Threshold,
    /// Above this, throttle the vCPUs (`balance_dirty_pages`).
    pub limit: Threshold,
}

impl Default for WritebackPolicy {
    fn default() -> Self {
        WritebackPolicy {
            writeback_interval: Duration::from_millis(250),
            dirty_expire: Duration::from_secs(30),
            background: Threshold::Percent(10),
            limit: Threshold::Percent(40),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_and_scale() {
        assert_eq!("10%".parse(), Ok(Threshold::Percent(10)));
        assert_eq!("64M".parse(), Ok(Threshold::Bytes(64 << 20)));
        assert_eq!("101%".parse::<Threshold>(), Err(ParseSizeError::OverHundredPercent("101%".into())));
        assert_eq!("lots".parse::<Threshold>(), Err(ParseSizeError::NotASize("lots".into())));
        assert_eq!("x%".parse::<Threshold>().unwrap_err().to_string(), "'x%' is not a percentage");
        assert_eq!(parse_bytes("99999999999G"), Err(ParseSizeError::TooLarge("99999999999G".into())));
        assert_eq!(Threshold::Percent(10).pages(1 << 30, 4096), 26214);
        assert_eq!(Threshold::Bytes(1 << 20).pages(1 << 30, 4096), 256);
    }
}
