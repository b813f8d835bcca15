//! The start-up display on stderr: one line per component as it becomes ready, with the time since
//! serve started; stdout is left for the endpoint lines and `ready`.

use std::io::Write as _;
use std::time::Instant;

/// Prints progress lines to stderr.
pub struct Progress {
    start: Instant,
    verbose: bool,
    quiet: bool,
}

impl Progress {
    /// A display starting now; `verbose` adds each child's pid and command line.
    pub fn new(verbose: bool) -> Progress {
        Progress { start: Instant::now(), verbose, quiet: false }
    }

    /// A display that prints only warnings (for callers with their own output, like the demo).
    pub fn quiet() -> Progress {
        Progress { start: Instant::now(), verbose: false, quiet: true }
    }

    /// A heading line.
    pub fn heading(&self, text: &str) {
        if !self.quiet {
            eprintln!("{text}");
        }
    }

    /// `what` is ready; `detail` says where.
    pub fn ready(&self, what: &str, detail: &str) {
        if !self.quiet {
            eprintln!("  ready  {what:<22} {detail:<44} {:>6.1}s", self.start.elapsed().as_secs_f64());
            let _ = std::io::stderr().flush();
        }
    }

    /// What start-up still waits for (real engines take minutes).
    pub fn waiting(&self, what: &str) {
        if !self.quiet {
            eprintln!("  waiting for {what} {:>6.1}s", self.start.elapsed().as_secs_f64());
        }
    }

    /// A warning (always shown).
    pub fn warn(&self, text: &str) {
        eprintln!("  warning: {text}");
    }

    /// A child was started (shown with `--verbose`).
    pub fn started(&self, name: &str, pid: u32, command: &str) {
        if self.verbose {
            eprintln!("  started {name} (pid {pid}): {command}");
        }
    }

    /// A plain note (not shown when quiet).
    pub fn note(&self, text: &str) {
        if !self.quiet {
            eprintln!("{text}");
        }
    }
}
