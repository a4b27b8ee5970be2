//! Progress of long work (`apiary bench`, `apiary dead replay`, `apiary migrate`): on a
//! terminal, a bar with the rate and the time left; when stderr is not a terminal (a log file,
//! CI, a pipe), a plain line every [`ProgressArgs::progress_interval`], such as
//! `replayed 12000/50000 (2400/s, ~16s left)`. This is the only module that knows about
//! `indicatif` or asks whether stderr is a terminal; callers only count.
//!
//! Progress goes to stderr, so what a command prints on stdout (ids, reports) stays clean.

use std::io::IsTerminal;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// The shortest and longest [`ProgressArgs::progress_interval`].
pub const INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(3600));

/// How progress is shown, for the commands that show it.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, clap::Args)]
pub struct ProgressArgs {
    /// When stderr is not a terminal, how often a progress line is printed (100ms to 1h). On a
    /// terminal a bar is drawn instead.
    #[arg(
        long,
        env = "APIARY_PROGRESS_INTERVAL",
        default_value = "5s",
        value_parser = parse_interval
    )]
    pub progress_interval: Duration,
}

impl Default for ProgressArgs {
    fn default() -> Self {
        ProgressArgs {
            progress_interval: Duration::from_secs(5),
        }
    }
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = crate::config::parse_duration(s)?;
    let (min, max) = INTERVAL_RANGE;
    if d < min || d > max {
        return Err(format!(
            "APIARY_PROGRESS_INTERVAL is {s}; it must be between 100ms and 1h"
        ));
    }
    Ok(d)
}

/// Where progress is drawn.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A bar redrawn in place.
    Terminal,
    /// A plain line now and then.
    Lines,
}

impl Output {
    /// A bar when stderr is a terminal, else lines.
    pub fn detect() -> Output {
        if std::io::stderr().is_terminal() {
            Output::Terminal
        } else {
            Output::Lines
        }
    }
}

/// A count of work done (or, without a total, a spinner with the time elapsed). Cheap to
/// clone: clones count into the same display, so concurrent tasks can each add what they did.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<Mutex<State>>,
    bar: Option<ProgressBar>,
    /// Held while lines are printed: dropping it (at [`Progress::finish`] or when the last
    /// clone goes) wakes the printing thread, which then ends.
    stop: Mutex<Option<mpsc::Sender<()>>>,
    printer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What a line shows.
#[derive(Debug, Clone)]
struct State {
    label: String,
    pos: u64,
    total: Option<u64>,
    /// The position when counting began, so a rate counts only this run's work.
    base: u64,
    started: Instant,
}

impl Progress {
    /// Counts toward `total`, labelled `label` ("replayed", "enqueued").
    pub fn counting(label: &str, total: u64, args: &ProgressArgs) -> Progress {
        Progress::new(label, Some(total), args, Output::detect())
    }

    /// No total: shows the label and the time elapsed ("applying 0008_prune_and_vacuum").
    pub fn spinner(label: &str, args: &ProgressArgs) -> Progress {
        Progress::new(label, None, args, Output::detect())
    }

    /// A display on `output`, whatever stderr is.
    pub fn new(label: &str, total: Option<u64>, args: &ProgressArgs, output: Output) -> Progress {
        let state = Arc::new(Mutex::new(State {
            label: label.to_string(),
            pos: 0,
            total,
            base: 0,
            started: Instant::now(),
        }));
        let (bar, stop, printer) = match output {
            Output::Terminal => {
                let bar = ProgressBar::new(total.unwrap_or(0));
                style(&bar, total);
                bar.set_message(label.to_string());
                (Some(bar), None, None)
            }
            Output::Lines => {
                let (tx, rx) = mpsc::channel::<()>();
                let every = args.progress_interval;
                let shared = state.clone();
                // A thread, not a task: a line is due even while the runtime's threads are all
                // busy, and a statement that runs for minutes still shows it is alive.
                let printer = std::thread::spawn(move || {
                    while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                        let s = match shared.lock() {
                            Ok(s) => s.clone(),
                            Err(_) => return,
                        };
                        eprintln!("{}", s.line());
                    }
                });
                (None, Some(tx), Some(printer))
            }
        };
        Progress {
            inner: Arc::new(Inner {
                state,
                bar,
                stop: Mutex::new(stop),
                printer: Mutex::new(printer),
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        if let Ok(mut s) = self.inner.state.lock() {
            f(&mut s);
            if let Some(bar) = &self.inner.bar {
                bar.set_position(s.pos);
            }
        }
    }

    /// Adds `n` done.
    pub fn inc(&self, n: u64) {
        self.update(|s| s.pos += n);
    }

    /// Sets how many are done.
    pub fn set(&self, n: u64) {
        self.update(|s| s.pos = n);
    }

    /// Starts a new phase: a new label and total, `done` already done, and the rate and
    /// time left measured from now.
    pub fn phase(&self, label: &str, total: Option<u64>, done: u64) {
        if let Ok(mut s) = self.inner.state.lock() {
            s.label = label.to_string();
            s.total = total;
            s.pos = done;
            s.base = done;
            s.started = Instant::now();
            if let Some(bar) = &self.inner.bar {
                style(bar, total);
                if let Some(t) = total {
                    bar.set_length(t);
                }
                bar.set_message(label.to_string());
                bar.set_position(done);
                bar.reset_eta();
                bar.reset_elapsed();
            }
        }
    }

    /// Prints a line of its own without breaking the bar.
    pub fn println(&self, line: &str) {
        match &self.inner.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Stops showing progress: the bar is cleared and no more lines come. Callers print
    /// their own summary after it. Safe to call more than once, from any clone.
    pub fn finish(&self) {
        if let Some(bar) = &self.inner.bar {
            bar.finish_and_clear();
        }
        self.inner.stop_printer();
    }
}

/// A bar with the count, rate and time left when there is a total; a spinner with the time
/// elapsed when there is none (redrawn on its own, as nothing may count for a while).
fn style(bar: &ProgressBar, total: Option<u64>) {
    match total {
        Some(_) => {
            bar.disable_steady_tick();
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} ({per_sec:0}, ~{eta} left)",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
        }
        None => {
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
        }
    }
}

impl Inner {
    fn stop_printer(&self) {
        if let Ok(mut stop) = self.stop.lock() {
            // Dropping the sender wakes the printer, which sees the channel closed and ends.
            stop.take();
        }
        let printer = self.printer.lock().ok().and_then(|mut p| p.take());
        if let Some(p) = printer {
            let _ = p.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_printer();
    }
}

impl State {
    fn line(&self) -> String {
        line(
            &self.label,
            self.pos,
            self.total,
            self.pos.saturating_sub(self.base),
            self.started.elapsed(),
        )
    }
}

/// One plain progress line: `replayed 12000/50000 (2400/s, ~16s left)`, or without a total
/// `applying 0008_prune_and_vacuum (25s elapsed)`. `counted` is what was done in `elapsed`,
/// which the rate and the time left come from.
pub fn line(label: &str, pos: u64, total: Option<u64>, counted: u64, elapsed: Duration) -> String {
    let Some(total) = total else {
        return format!("{label} ({} elapsed)", human(elapsed));
    };
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        counted as f64 / secs
    } else {
        0.0
    };
    let rate_text = if rate >= 10.0 {
        format!("{rate:.0}/s")
    } else {
        format!("{rate:.1}/s")
    };
    if pos >= total || rate <= 0.0 {
        return format!("{label} {pos}/{total} ({rate_text})");
    }
    let left = Duration::from_secs_f64((total - pos) as f64 / rate);
    format!("{label} {pos}/{total} ({rate_text}, ~{} left)", human(left))
}

/// `850ms`, `16s`, `2m05s`, `1h02m`: short, and exact enough to plan by.
pub fn human(d: Duration) -> String {
    // Whole seconds, rounded: 1.6 s left reads `2s`, not `1s`.
    let s = d.as_secs_f64().round() as u64;
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_gives_the_count_the_rate_and_the_time_left() {
        assert_eq!(
            line(
                "replayed",
                12_000,
                Some(50_000),
                12_000,
                Duration::from_secs(5)
            ),
            "replayed 12000/50000 (2400/s, ~16s left)"
        );
        // The rate counts only this phase's work.
        assert_eq!(
            line("finished", 150, Some(200), 50, Duration::from_secs(10)),
            "finished 150/200 (5.0/s, ~10s left)"
        );
        assert_eq!(
            line("replayed", 500, Some(500), 500, Duration::from_secs(2)),
            "replayed 500/500 (250/s)"
        );
        // Nothing done yet: no rate to say when it ends.
        assert_eq!(
            line("enqueued", 0, Some(100), 0, Duration::from_secs(3)),
            "enqueued 0/100 (0.0/s)"
        );
        assert_eq!(
            line("applying 0008_x", 0, None, 0, Duration::from_secs(125)),
            "applying 0008_x (2m05s elapsed)"
        );
    }

    #[test]
    fn durations_read_short() {
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_secs(16)), "16s");
        assert_eq!(human(Duration::from_millis(1_600)), "2s");
        assert_eq!(human(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn the_interval_is_bounded() {
        assert!(parse_interval("50ms").is_err());
        assert!(parse_interval("2h").is_err());
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
    }

    #[test]
    fn lines_mode_counts_from_clones_and_finishes_once() {
        let args = ProgressArgs {
            progress_interval: Duration::from_secs(3600),
        };
        let p = Progress::new("replayed", Some(10), &args, Output::Lines);
        let q = p.clone();
        p.inc(3);
        q.inc(4);
        let line = p.inner.state.lock().map(|s| s.line()).unwrap_or_default();
        assert!(line.starts_with("replayed 7/10 ("), "{line}");
        p.finish();
        q.finish();
    }
}
