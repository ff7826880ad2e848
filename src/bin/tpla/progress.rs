//! Progress of long commands on the terminal: drawn on stderr only when stderr is a
//! terminal (indicatif checks) and `--quiet` is not given, so pipes, files and CI logs
//! get the results alone.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: no progress at all.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// A bar of `steps` steps named `what`; finish it with `finish_and_clear`.
pub fn bar(steps: u64, what: &str) -> ProgressBar {
    if QUIET.load(Ordering::Relaxed) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    // the spinner and the elapsed time move while one long step runs
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
