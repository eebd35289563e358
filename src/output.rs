//! What the program prints: an operator command's report on standard output, and the
//! warnings and errors a person reads on standard error. Every such write goes through this
//! module; the worker's log lines have their own writer (`telemetry`).
//!
//! Invariants:
//! - a write never panics: a reader that closes the pipe early (`| head`) costs the rest of
//!   the output, never the process (`println!` and `eprintln!` panic when a write fails);
//! - a pass over the DLQ writes with [`line`] or [`writer`], which return the error: it must
//!   stop and give the queue back. A report or a summary ([`outln!`], [`summary`]) drops it.

use std::fmt::Display;
use std::io::Write;

/// `println!` that never panics (module documentation).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::print(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics: a warning or an error for the person at the terminal.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::eprint(format_args!($($arg)*))
    };
}

/// Write `text` and a newline on standard error; a failure is dropped.
pub fn eprint(text: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Write `text` and a newline; a failure is dropped (see [`outln!`]).
pub fn print(text: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// Write `text` as it is, without adding a newline, and flush it.
pub fn verbatim(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// One line. A closed stdout is an error the caller stops on.
pub fn line(line: impl Display) -> std::io::Result<()> {
    writeln!(std::io::stdout(), "{line}")
}

/// Standard output, buffered, for a pass that writes many lines (an export).
pub fn writer() -> impl Write {
    std::io::BufWriter::new(std::io::stdout())
}

/// A command's summary: one JSON object with `--json`, else one line of text.
pub fn summary(json: bool, object: serde_json::Value, text: impl FnOnce() -> String) {
    if json {
        outln!("{object}");
    } else {
        outln!("{}", text());
    }
}
