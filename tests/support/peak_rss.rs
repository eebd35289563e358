//! `peak-rss CMD [ARGS…]`: run a command and print its peak resident memory in bytes (to
//! stderr, last line `peak_rss_bytes=N`), exiting with its exit code.
//!
//! Why a separate small process: Linux folds the spawning process's own peak into a
//! child's `ru_maxrss` at `exec`, so a large spawner (a test binary) cannot measure a
//! child itself. This one stays a few MiB.

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        eprintln!("usage: peak-rss CMD [ARGS…]");
        return ExitCode::from(2);
    };
    let child = match Command::new(&program).args(args).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("peak-rss: cannot run {}: {e}", program.to_string_lossy());
            return ExitCode::from(2);
        }
    };
    let Ok(pid) = i32::try_from(child.id()) else {
        return ExitCode::from(2);
    };
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 reaps our own child (std never waits for
    // it: the Child is dropped unwaited).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } != pid {
        eprintln!("peak-rss: wait4 failed");
        return ExitCode::from(2);
    }
    // Linux reports ru_maxrss in KiB.
    eprintln!("peak_rss_bytes={}", usage.ru_maxrss.saturating_mul(1024));
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        1
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
