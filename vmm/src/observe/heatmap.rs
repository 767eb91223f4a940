//! Dirty-page heatmaps: which guest addresses were dirtied in which period,
//! as data and as an SVG picture.
//!
//! A [`Heatmap`] splits guest RAM (as backing-file offsets `0..mem_size`)
//! into address buckets and counts, for every sampling period, how many
//! pages were dirtied in each bucket. [`Heatmap::render_svg`] draws that
//! grid with `plotters` (time on x, guest address on y, colour = dirty pages
//! per bucket per period on a logarithmic viridis scale, black = none) and,
//! below it, the dirty rate over time. A sequential sweep shows as diagonal
//! stripes, random writes as uniform noise, a hot/cold workload as a bright
//! band at low addresses.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plotters::coord::Shift;
use plotters::prelude::*;
use smudge::harvest::Subscription;

const MIB: f64 = 1024.0 * 1024.0;
/// Smallest picture `render_svg` draws: below this the axes do not fit.
const MIN_WIDTH: u32 = 320;
/// See [`MIN_WIDTH`].
const MIN_HEIGHT: u32 = 240;
/// Width of the colour-scale legend strip at the right, in pixels.
const LEGEND_WIDTH: u32 = 104;
const MARGIN: u32 = 10;
const X_LABEL_AREA: u32 = 42;
const Y_LABEL_AREA: u32 = 72;
/// Distinct colours of the heatmap; equal neighbours merge into one `<rect>`.
const LEVELS: u32 = 128;
/// Where on the viridis ramp the smallest non-zero count starts, so that it
/// stays clearly apart from the black of "no dirty pages".
const RAMP_FLOOR: f64 = 0.12;
const FONT: &str = "sans-serif";

/// Errors from [`Heatmap::render_svg`].
#[derive(Debug, thiserror::Error)]
pub enum HeatmapError {
    /// The SVG could not be written to `path`.
    #[error("cannot write heatmap {}: {source}", path.display())]
    Io {
        /// The file that could not be written.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// `plotters` failed to draw the picture (or the size was too small).
    #[error("cannot draw heatmap: {0}")]
    Plot(String),
}

/// Records `map` from `sub` until `stopped` says so (checked at least
/// once a period; wake the thread with `unpark` to stop sooner): every
/// period, the pages dirtied in it (collected, so re-protected: the next
/// write shows in the next period). A harvest error ends the recording
/// early (logged). The subscription ends with it.
pub fn record(sub: Subscription, mut map: Heatmap, stopped: impl Fn() -> bool) -> Heatmap {
    let layout = smudge::memory::ram_layout(map.mem_size);
    let mut next = Instant::now() + map.period;
    while !stopped() {
        std::thread::park_timeout(next.saturating_duration_since(Instant::now()));
        if Instant::now() < next {
            continue;
        }
        next += map.period;
        match sub.collect() {
            Ok(set) => {
                map.record_period(set.gpas().filter_map(|gpa| smudge::memory::gpa_to_file_offset(&layout, gpa)));
                sub.recycle(set);
            }
            Err(e) => {
                tracing::warn!("heatmap: {e}; stopped recording");
                break;
            }
        }
    }
    map
}

/// Dirty pages per (address bucket, period).
///
/// Addresses are byte offsets into guest RAM `0..mem_size` (the backing
/// file's offsets, which have no PCI hole); each page is counted by the
/// bucket its address falls into. Memory grows by one `Vec<u32>` of
/// `buckets` entries per period (1 KiB for 256 buckets), with no cap.
#[derive(Debug, Clone)]
pub struct Heatmap {
    mem_size: u64,
    buckets: usize,
    bucket_bytes: u64,
    period: Duration,
    counts: Vec<Vec<u32>>,
    out_of_range: u64,
}

impl Heatmap {
    /// `mem_size` bytes of guest RAM split into `buckets` address buckets
    /// (e.g. 256; 0 counts as 1) of [`bucket_bytes`](Self::bucket_bytes)
    /// each, periods of `period`.
    ///
    /// # Panics
    /// If `period` is zero: rates would be infinite.
    pub fn new(mem_size: u64, buckets: usize, period: Duration) -> Self {
        assert!(!period.is_zero(), "heatmap period must be non-zero");
        let buckets = buckets.max(1);
        let bucket_bytes = mem_size.div_ceil(buckets as u64).max(1);
        Self { mem_size, buckets, bucket_bytes, period, counts: Vec::new(), out_of_range: 0 }
    }

    /// Records one period: the byte addresses (backing-file offsets, page
    /// aligned, each dirty page once) of the pages dirtied in it. Addresses
    /// at or past `mem_size` are not counted; see
    /// [`out_of_range`](Self::out_of_range).
    pub fn record_period(&mut self, dirty_pages: impl IntoIterator<Item = u64>) {
        let mut row = vec![0u32; self.buckets];
        for addr in dirty_pages {
            if addr >= self.mem_size {
                self.out_of_range += 1;
                continue;
            }
            let bucket = ((addr / self.bucket_bytes) as usize).min(self.buckets - 1);
            row[bucket] = row[bucket].saturating_add(1);
        }
        self.counts.push(row);
    }

    /// The data behind the picture: `counts()[period][bucket]` = pages
    /// dirtied in that bucket in that period.
    pub fn counts(&self) -> &[Vec<u32>] {
        &self.counts
    }

    /// Number of address buckets.
    pub fn buckets(&self) -> usize {
        self.buckets
    }

    /// Number of periods recorded so far.
    pub fn periods(&self) -> usize {
        self.counts.len()
    }

    /// Length of one period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Bytes of guest RAM per bucket (the last bucket may be partial).
    pub fn bucket_bytes(&self) -> u64 {
        self.bucket_bytes
    }

    /// Bytes of guest RAM covered.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// Addresses passed to [`record_period`](Self::record_period) that were
    /// at or past `mem_size` and so not counted (0 unless the caller mixed
    /// up guest-physical addresses and file offsets).
    pub fn out_of_range(&self) -> u64 {
        self.out_of_range
    }

    /// Dirty pages per second of each period (the rate plot's data).
    pub fn rates(&self) -> Vec<f64> {
        let secs = self.period.as_secs_f64();
        self.counts.iter().map(|row| row.iter().map(|&c| f64::from(c)).sum::<f64>() / secs).collect()
    }

    /// The data behind the picture as JSON: `{"mem_size", "bucket_bytes",
    /// "period_ms", "counts": [[per bucket] per period], "rates": [pages/s
    /// per period]}` — for scripts and tests that must not read pixels.
    pub fn data_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mem_size": self.mem_size(),
            "bucket_bytes": self.bucket_bytes(),
            "period_ms": self.period().as_secs_f64() * 1e3,
            "counts": self.counts(),
            "rates": self.rates(),
        })
    }

    /// Writes the SVG to `path`: the heatmap on top (x = time in s, y =
    /// guest address in MiB, colour = dirty pages per bucket per period on a
    /// log scale with black for none, with a colour-scale legend and axis
    /// labels), the dirty-rate plot (pages/s over time) below; `width` x
    /// `height` pixels (at least 320 x 240); `title` on the first line.
    ///
    /// With more periods than the plot is pixels wide, neighbouring periods
    /// are merged into one column showing their mean; likewise buckets when
    /// there are more than pixel rows.
    pub fn render_svg(&self, path: &Path, title: &str, width: u32, height: u32) -> Result<(), HeatmapError> {
        let svg = self.svg_string(title, width, height)?;
        std::fs::write(path, svg).map_err(|source| HeatmapError::Io { path: path.to_path_buf(), source })
    }

    /// The SVG that [`render_svg`](Self::render_svg) writes, as a string.
    pub fn svg_string(&self, title: &str, width: u32, height: u32) -> Result<String, HeatmapError> {
        if width < MIN_WIDTH || height < MIN_HEIGHT {
            return Err(HeatmapError::Plot(format!(
                "{width}x{height} is too small: at least {MIN_WIDTH}x{MIN_HEIGHT} pixels"
            )));
        }
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
            self.draw(&root, title).map_err(|e| HeatmapError::Plot(e.to_string()))?;
            root.present().map_err(|e| HeatmapError::Plot(e.to_string()))?;
        }
        Ok(svg)
    }

    fn draw(&self, root: &Area<'_>, title: &str) -> Result<(), PlotError> {
        root.fill(&WHITE)?;
        let root = root.titled(title, (FONT, 22))?;
        let (w, h) = root.dim_in_pixel();
        let (top, bottom) = root.split_vertically(h * 63 / 100);
        let (heat_area, legend_area) = top.split_horizontally(w - LEGEND_WIDTH);
        let (rate_area, _) = bottom.split_horizontally(w - LEGEND_WIDTH);
        let (grid, scale, merged) = self.draw_heat(&heat_area)?;
        self.draw_legend(&legend_area, &scale)?;
        self.draw_rate(&rate_area, &grid, merged)
    }

    /// Seconds from the start to the start of period `period_index`.
    fn t_of(&self, period_index: usize) -> f64 {
        period_index as f64 * self.period.as_secs_f64()
    }

    /// The heatmap proper; returns its grid, colour scale and how many
    /// periods the widest column merges.
    fn draw_heat<'s>(&'s self, heat_area: &Area<'_>) -> Result<(Grid<'s>, ColourScale, Option<usize>), PlotError> {
        let t_end = self.t_of(self.periods().max(1));
        let mem_mib = self.mem_size.max(1) as f64 / MIB;
        let addr_of = |bucket_index: usize| (bucket_index as u64 * self.bucket_bytes).min(self.mem_size) as f64 / MIB;
        let t_of = |i| self.t_of(i);
        // The heatmap: build the axes first to learn the plot's pixel size.
        let mut heat = ChartBuilder::on(heat_area)
            .margin(MARGIN)
            .x_label_area_size(X_LABEL_AREA)
            .y_label_area_size(Y_LABEL_AREA)
            .build_cartesian_2d(0f64..t_end, 0f64..mem_mib)?;
        let (plot_w, plot_h) = heat.plotting_area().dim_in_pixel();
        let grid = Grid::new(self, plot_w as usize, plot_h as usize);
        let merged = grid.col_edges.windows(2).map(|e| e[1] - e[0]).max();
        let x_desc = match merged {
            Some(n) if n > 1 => {
                format!("time (s); one column = up to {n} periods of {} (mean)", fmt_duration(self.period))
            }
            _ => format!("time (s); one column = {}", fmt_duration(self.period)),
        };
        heat.plotting_area().fill(&BLACK)?;
        heat.configure_mesh()
            .disable_mesh()
            .x_desc(x_desc)
            .y_desc("guest address (MiB)")
            .x_label_formatter(&|v| fmt_num(*v))
            .y_label_formatter(&|v| fmt_plain(*v))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()?;

        let scale = ColourScale::new(grid.cells.iter().flatten().copied());
        let mut rects = Vec::new();
        for row in 0..grid.rows() {
            let (y0, y1) = (addr_of(grid.row_edges[row]), addr_of(grid.row_edges[row + 1]));
            let mut col = 0;
            while col < grid.cols() {
                let level = scale.level(grid.cells[col][row]);
                let mut end = col + 1;
                while end < grid.cols() && scale.level(grid.cells[end][row]) == level {
                    end += 1;
                }
                if let Some(level) = level {
                    rects.push(Rectangle::new(
                        [(t_of(grid.col_edges[col]), y0), (t_of(grid.col_edges[end]), y1)],
                        ColourScale::colour(level).filled(),
                    ));
                }
                col = end;
            }
        }
        heat.draw_series(rects)?;

        Ok((grid, scale, merged))
    }

    /// The colour-scale legend, its bar level with the heatmap's plot.
    fn draw_legend(&self, legend_area: &Area<'_>, scale: &ColourScale) -> Result<(), PlotError> {
        let legend_w = legend_area.dim_in_pixel().0;
        let mut legend = ChartBuilder::on(legend_area)
            .margin(MARGIN)
            .margin_left(MARGIN + 4)
            .x_label_area_size(X_LABEL_AREA)
            .right_y_label_area_size(legend_w - 2 * MARGIN - 4 - 22)
            .build_cartesian_2d(0f64..1f64, (scale.lo..scale.hi).log_scale())?;
        legend
            .configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_desc(format!("dirty pages / {} / {}", fmt_bytes(self.bucket_bytes), fmt_duration(self.period)))
            .y_label_formatter(&|v| fmt_log_label(*v))
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            .draw()?;
        const STEPS: u32 = 96;
        let ratio = scale.hi / scale.lo;
        legend.draw_series((0..STEPS).map(|i| {
            let v0 = scale.lo * ratio.powf(f64::from(i) / f64::from(STEPS));
            let v1 = scale.lo * ratio.powf(f64::from(i + 1) / f64::from(STEPS));
            let colour = scale.level((v0 * v1).sqrt()).map_or(BLACK, ColourScale::colour);
            Rectangle::new([(0.0, v0), (1.0, v1)], colour.filled())
        }))?;
        // A swatch for zero under the bar, labelled like the ticks.
        let (bar_x, bar_y) = legend.plotting_area().get_pixel_range();
        let (ox, oy) = legend_area.get_base_pixel();
        let (x0, x1) = (bar_x.start - ox, bar_x.end - ox);
        let y0 = bar_y.end - oy + 8;
        legend_area.draw(&Rectangle::new([(x0, y0), (x1, y0 + 12)], BLACK.filled()))?;
        legend_area.draw(&Text::new("0 (none)", (x1 + 4, y0 - 1), (FONT, 12).into_font()))?;

        Ok(())
    }

    /// The dirty rate below, on the same time axis, as steps per column.
    fn draw_rate(&self, rate_area: &Area<'_>, grid: &Grid<'_>, merged: Option<usize>) -> Result<(), PlotError> {
        let t_end = self.t_of(self.periods().max(1));
        let t_of = |i| self.t_of(i);
        let rates = grid.col_rates();
        let peak = rates.iter().copied().fold(0.0, f64::max);
        let all = self.rates();
        let mean = all.iter().sum::<f64>() / all.len().max(1) as f64;
        let mut rate = ChartBuilder::on(rate_area)
            .margin(MARGIN)
            .caption(
                format!(
                    "dirty rate: mean {} pages/s, peak {} pages/s",
                    fmt_num(mean),
                    fmt_num(all.iter().copied().fold(0.0, f64::max))
                ),
                (FONT, 15),
            )
            .x_label_area_size(X_LABEL_AREA)
            .y_label_area_size(Y_LABEL_AREA)
            .build_cartesian_2d(0f64..t_end, 0f64..(peak * 1.1).max(1.0))?;
        rate.configure_mesh()
            .x_desc(match merged {
                Some(n) if n > 1 => format!("time (s); mean of up to {n} periods per step"),
                _ => "time (s)".to_string(),
            })
            .y_desc("dirty pages/s")
            .x_label_formatter(&|v| fmt_num(*v))
            .y_label_formatter(&|v| fmt_num(*v))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        let steps: Vec<(f64, f64)> = rates
            .iter()
            .enumerate()
            .flat_map(|(c, &r)| [(t_of(grid.col_edges[c]), r), (t_of(grid.col_edges[c + 1]), r)])
            .collect();
        let line = RGBColor(33, 102, 172);
        rate.draw_series(AreaSeries::new(steps.iter().copied(), 0.0, line.mix(0.25)))?;
        rate.draw_series(LineSeries::new(steps, line.stroke_width(2)))?;
        Ok(())
    }
}

/// A drawing area of the SVG.
type Area<'b> = DrawingArea<SVGBackend<'b>, Shift>;
/// What drawing fails with.
type PlotError = Box<dyn std::error::Error>;

/// The counts aggregated to at most one cell per pixel: `cells[col][row]` is
/// the mean dirty pages per bucket per period over the periods
/// `col_edges[col]..col_edges[col + 1]` and buckets
/// `row_edges[row]..row_edges[row + 1]`.
struct Grid<'a> {
    map: &'a Heatmap,
    col_edges: Vec<usize>,
    row_edges: Vec<usize>,
    cells: Vec<Vec<f64>>,
}

impl<'a> Grid<'a> {
    fn new(map: &'a Heatmap, max_cols: usize, max_rows: usize) -> Self {
        let col_edges = partition(map.periods(), max_cols);
        let row_edges = partition(map.buckets, max_rows);
        let mut cells = Vec::with_capacity(col_edges.len().saturating_sub(1));
        for cols in col_edges.windows(2) {
            let mut sums = vec![0u64; row_edges.len() - 1];
            for counts in &map.counts[cols[0]..cols[1]] {
                for (row, rows) in row_edges.windows(2).enumerate() {
                    sums[row] += counts[rows[0]..rows[1]].iter().map(|&c| u64::from(c)).sum::<u64>();
                }
            }
            let periods = (cols[1] - cols[0]) as f64;
            cells.push(
                row_edges
                    .windows(2)
                    .zip(&sums)
                    .map(|(rows, &sum)| sum as f64 / (periods * (rows[1] - rows[0]) as f64))
                    .collect(),
            );
        }
        Self { map, col_edges, row_edges, cells }
    }

    fn cols(&self) -> usize {
        self.col_edges.len() - 1
    }

    fn rows(&self) -> usize {
        self.row_edges.len() - 1
    }

    /// Mean dirty pages per second of each column.
    fn col_rates(&self) -> Vec<f64> {
        let secs = self.map.period.as_secs_f64();
        self.col_edges
            .windows(2)
            .map(|cols| {
                let pages: u64 = self.map.counts[cols[0]..cols[1]].iter().flatten().map(|&c| u64::from(c)).sum();
                pages as f64 / ((cols[1] - cols[0]) as f64 * secs)
            })
            .collect()
    }
}

/// Splits `0..n` into at most `max` nearly equal ranges; returns their edges.
fn partition(n: usize, max: usize) -> Vec<usize> {
    let parts = n.min(max.max(1));
    if parts == 0 {
        return vec![0];
    }
    (0..=parts).map(|i| i * n / parts).collect()
}

/// Maps a positive mean count to one of [`LEVELS`] viridis colours on a log
/// scale from the smallest to the largest non-zero value; zero has none.
struct ColourScale {
    lo: f64,
    hi: f64,
}

impl ColourScale {
    fn new(values: impl Iterator<Item = f64>) -> Self {
        let (mut lo, mut hi) = (f64::INFINITY, 0f64);
        for v in values.filter(|&v| v > 0.0) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if hi == 0.0 {
            (lo, hi) = (1.0, 10.0);
        } else if hi < lo * 1.5 {
            // (Nearly) one value: give the bar a range, the value at its top.
            lo = hi / 10.0;
        }
        Self { lo, hi }
    }

    fn level(&self, v: f64) -> Option<u32> {
        if v <= 0.0 {
            return None;
        }
        let h = ((v / self.lo).ln() / (self.hi / self.lo).ln()).clamp(0.0, 1.0);
        Some((h * f64::from(LEVELS - 1)).round() as u32)
    }

    fn colour(level: u32) -> RGBColor {
        let h = f64::from(level) / f64::from(LEVELS - 1);
        ViridisRGB::get_color(RAMP_FLOOR + (1.0 - RAMP_FLOOR) * h)
    }
}

/// `1234567.0` -> `1.2M`: short numbers for axis labels.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    let (scaled, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let text = if scaled.abs() >= 100.0 || scaled == scaled.round() {
        format!("{scaled:.0}")
    } else if scaled.abs() >= 1.0 {
        format!("{scaled:.1}")
    } else {
        format!("{scaled:.2}")
    };
    let text = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.').to_string() } else { text };
    format!("{text}{suffix}")
}

/// `1800.0` -> `1800`, `2.5` -> `2.5`: axis labels without a k suffix.
fn fmt_plain(v: f64) -> String {
    if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        fmt_num(v)
    }
}

/// Labels for the log-scale legend: only 1, 2 and 5 times a power of ten,
/// the other ticks stay unlabelled.
fn fmt_log_label(v: f64) -> String {
    if v <= 0.0 {
        return String::new();
    }
    let mantissa = v / 10f64.powf(v.log10().floor());
    if [1.0, 2.0, 5.0, 10.0].iter().any(|m| (mantissa - m).abs() < 1e-6) {
        fmt_num(v)
    } else {
        String::new()
    }
}

/// `4194304` -> `4 MiB`.
fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{} {}", fmt_num(v), UNITS[unit])
}

/// `100ms` -> `100 ms`.
fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{} s", fmt_num(s))
    } else if s >= 1e-3 {
        format!("{} ms", fmt_num(s * 1e3))
    } else {
        format!("{} µs", fmt_num(s * 1e6))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    /// xorshift64*: deterministic noise without a `rand` dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
        }
    }

    fn random_page(rng: &mut Rng, from: u64, to: u64) -> u64 {
        from + rng.below((to - from) / PAGE) * PAGE
    }

    /// A writer sweeping RAM front to back `laps` times over `periods`, over
    /// a little background noise, after an idle first tenth.
    fn sweep(mem: u64, buckets: usize, periods: usize, laps: u64) -> Heatmap {
        let mut map = Heatmap::new(mem, buckets, Duration::from_millis(100));
        let mut rng = Rng(0x5eed_0001);
        let busy = periods - periods / 10;
        let per_period = (mem / PAGE * laps).div_ceil(busy as u64);
        let mut next = 0u64;
        for p in 0..periods {
            let mut pages: Vec<u64> = (0..4).map(|_| random_page(&mut rng, 0, mem)).collect();
            if p >= periods / 10 {
                for _ in 0..per_period {
                    pages.push(next * PAGE % mem);
                    next += 1;
                }
            }
            map.record_period(pages);
        }
        map
    }

    /// `per_period` pages at random all over RAM.
    fn random(mem: u64, buckets: usize, periods: usize, per_period: usize) -> Heatmap {
        let mut map = Heatmap::new(mem, buckets, Duration::from_millis(100));
        let mut rng = Rng(0x5eed_0002);
        for p in 0..periods {
            // A quieter start, so the rate plot has a shape.
            let n = if p < periods / 5 { per_period / 4 } else { per_period };
            map.record_period((0..n).map(|_| random_page(&mut rng, 0, mem)).collect::<Vec<_>>());
        }
        map
    }

    /// 90 % of the pages in the first 10 % of RAM, the rest anywhere else.
    fn hot_cold(mem: u64, buckets: usize, periods: usize, per_period: usize) -> Heatmap {
        let mut map = Heatmap::new(mem, buckets, Duration::from_millis(100));
        let mut rng = Rng(0x5eed_0003);
        let hot_end = mem / 10 / PAGE * PAGE;
        for _ in 0..periods {
            let pages: Vec<u64> =
                (0..per_period)
                    .map(|i| {
                        if i % 10 < 9 {
                            random_page(&mut rng, 0, hot_end)
                        } else {
                            random_page(&mut rng, hot_end, mem)
                        }
                    })
                    .collect();
            map.record_period(pages);
        }
        map
    }

    fn bucket_totals(map: &Heatmap) -> Vec<u64> {
        let mut totals = vec![0u64; map.buckets()];
        for row in map.counts() {
            for (t, &c) in totals.iter_mut().zip(row) {
                *t += u64::from(c);
            }
        }
        totals
    }

    #[test]
    fn geometry_and_rates() {
        let mut map = Heatmap::new(256 << 20, 256, Duration::from_millis(250));
        assert_eq!(map.bucket_bytes(), 1 << 20);
        assert_eq!(map.buckets(), 256);
        assert_eq!(map.period(), Duration::from_millis(250));
        map.record_period([0, PAGE, (1 << 20) + PAGE, (256 << 20) - PAGE, 256 << 20]);
        map.record_period(std::iter::empty());
        assert_eq!(map.periods(), 2);
        assert_eq!(map.counts()[0][0], 2);
        assert_eq!(map.counts()[0][1], 1);
        assert_eq!(map.counts()[0][255], 1);
        assert_eq!(map.out_of_range(), 1);
        assert_eq!(map.rates(), vec![16.0, 0.0]);
    }

    #[test]
    fn sweep_argmax_climbs() {
        // One lap over 64 busy periods: each period dirties the next bucket.
        let mut map = Heatmap::new(64 << 20, 64, Duration::from_millis(100));
        let pages_per_bucket = (1 << 20) / PAGE;
        for p in 0..64u64 {
            map.record_period((0..pages_per_bucket).map(|i| (p << 20) + i * PAGE));
        }
        let argmax: Vec<usize> =
            map.counts().iter().map(|row| (0..row.len()).max_by_key(|&b| row[b]).unwrap()).collect();
        assert_eq!(argmax, (0..64).collect::<Vec<_>>());

        // With background noise and a partial bucket per period it still
        // climbs monotonically over the busy part of one lap.
        let map = sweep(512 << 20, 128, 100, 1);
        let argmax: Vec<usize> =
            map.counts()[10..].iter().map(|row| (0..row.len()).max_by_key(|&b| row[b]).unwrap()).collect();
        assert!(argmax.windows(2).all(|w| w[0] <= w[1]), "{argmax:?}");
        assert!(argmax[argmax.len() - 1] >= 120, "{argmax:?}");
    }

    #[test]
    fn hot_cold_concentrates_low() {
        let map = hot_cold(1 << 30, 256, 100, 2000);
        let totals = bucket_totals(&map);
        let all: u64 = totals.iter().sum();
        let low: u64 = totals[..totals.len() / 10].iter().sum();
        assert!(low * 100 >= all * 80, "low {low} of {all}");
    }

    #[test]
    fn random_is_flat() {
        let map = random(1 << 30, 64, 200, 1000);
        let totals = bucket_totals(&map);
        let mean = totals.iter().sum::<u64>() as f64 / totals.len() as f64;
        for (b, &t) in totals.iter().enumerate() {
            let t = t as f64;
            assert!(t <= mean * 1.2 && t >= mean * 0.8, "bucket {b}: {t} vs {mean}");
        }
    }

    /// The attributes of the first `<svg ...>` tag.
    fn svg_root_attr(svg: &str, name: &str) -> Option<String> {
        let start = svg.find("<svg")?;
        let tag = &svg[start..start + svg[start..].find('>')?];
        let key = format!(" {name}=\"");
        let at = tag.find(&key)? + key.len();
        Some(tag[at..at + tag[at..].find('"')?].to_string())
    }

    #[test]
    fn render_writes_sized_svg_with_title() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heat.svg");
        let map = hot_cold(256 << 20, 64, 30, 500);
        map.render_svg(&path, "hot/cold & co", 900, 700).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_eq!(svg_root_attr(&svg, "width").as_deref(), Some("900"));
        assert_eq!(svg_root_attr(&svg, "height").as_deref(), Some("700"));
        assert!(svg.contains("hot/cold &amp; co"));
        assert!(svg.contains("guest address (MiB)"));
        assert!(svg.contains("dirty pages/s"));
        assert!(svg.contains("<rect"));
    }

    #[test]
    fn render_aggregates_many_periods() {
        let map = random(64 << 20, 32, 20_000, 20);
        let grid = Grid::new(&map, 500, 1000);
        assert_eq!(grid.cols(), 500);
        assert_eq!(grid.rows(), 32);
        // Means per period are preserved: the total over the grid matches.
        let total: f64 = grid
            .cells
            .iter()
            .zip(grid.col_edges.windows(2))
            .map(|(col, e)| col.iter().sum::<f64>() * (e[1] - e[0]) as f64)
            .sum();
        let expected: u64 = bucket_totals(&map).iter().sum();
        assert!((total - expected as f64).abs() < 1e-6 * expected as f64);
        let svg = map.svg_string("many", 800, 600).unwrap();
        // At most one rectangle per (pixel column, bucket) plus the frame.
        assert!(svg.matches("<rect").count() < 800 * 32, "too many rects");
    }

    #[test]
    fn render_empty_and_tiny() {
        let map = Heatmap::new(1 << 20, 16, Duration::from_secs(1));
        assert!(map.svg_string("empty", 400, 300).is_ok());
        assert!(matches!(map.svg_string("tiny", 100, 100), Err(HeatmapError::Plot(_))));
    }

    #[test]
    fn unwritable_path_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("heat.svg");
        let map = sweep(64 << 20, 16, 20, 1);
        let err = map.render_svg(&path, "x", 640, 480).unwrap_err();
        assert!(matches!(err, HeatmapError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn number_formats() {
        assert_eq!(fmt_num(1_234_567.0), "1.2M");
        assert_eq!(fmt_num(250.0), "250");
        assert_eq!(fmt_num(2.5), "2.5");
        assert_eq!(fmt_num(0.25), "0.25");
        assert_eq!(fmt_plain(1800.0), "1800");
        assert_eq!(fmt_plain(2.5), "2.5");
        assert_eq!(fmt_log_label(20.0), "20");
        assert_eq!(fmt_log_label(30.0), "");
        assert_eq!(fmt_log_label(1000.0), "1k");
        assert_eq!(fmt_bytes(4 << 20), "4 MiB");
        assert_eq!(fmt_duration(Duration::from_millis(100)), "100 ms");
    }

    /// Regenerates the sample pictures in `resources/`:
    /// `cargo test -p smudge-vmm --lib heatmap -- --ignored`.
    #[test]
    #[ignore = "writes resources/heatmap-sample-*.svg"]
    fn write_samples() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources");
        let (mem, buckets, periods) = (512 << 20, 128, 150);
        let samples = [
            ("sweep", "sequential sweep: 512 MiB guest, 3 laps front to back", sweep(mem, buckets, periods, 3)),
            (
                "random",
                "random writes: 512 MiB guest, 2000 random pages per 100 ms",
                random(mem, buckets, periods, 2000),
            ),
            (
                "hotcold",
                "hot/cold: 90% of writes in the first 10% of a 512 MiB guest",
                hot_cold(mem, buckets, periods, 2000),
            ),
        ];
        for (name, title, map) in samples {
            let path = dir.join(format!("heatmap-sample-{name}.svg"));
            map.render_svg(&path, title, 1000, 750).unwrap();
        }
    }
}
