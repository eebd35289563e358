//! The only `unsafe` in the crate: three calls to the operating system that no kept crate
//! wraps. Each says why it is needed and why it is sound.
//!
//! - [`set_min_stack`]: the broker client (lapin) starts its I/O thread without a stack
//!   size of its own, so the only way to give that thread a deep stack is the process-wide
//!   `RUST_MIN_STACK`, set before any thread exists (see `amqp::THREAD_STACK_BYTES`);
//! - [`limit_malloc_arenas`]: glibc's allocator keeps up to 8 arenas per core; two keep
//!   the worker's resident memory small (docs/performance.md);
//! - [`defer_accept`]: `TCP_DEFER_ACCEPT` on the metrics listener, so that a client that
//!   connects and says nothing costs no file descriptor (socket2 has no setter for it;
//!   `tests/it/endpoint.rs` shows the probes it keeps answering under a flood).

/// Set `RUST_MIN_STACK` to `bytes` unless the environment already sets it. Call it first
/// thing in `main`, before any thread exists.
pub fn set_min_stack(bytes: usize) {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: called while the process has one thread: nothing reads the environment
        // concurrently.
        unsafe { std::env::set_var("RUST_MIN_STACK", bytes.to_string()) };
    }
}

/// At most two malloc arenas. Call it before any other thread exists.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; no other thread allocates yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// `TCP_DEFER_ACCEPT` of `seconds` on a listening socket (Linux; elsewhere a no-op).
pub fn defer_accept(listener: &std::net::TcpListener, seconds: u32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let seconds = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
        // SAFETY: a valid socket descriptor borrowed for the call, and a c_int option value
        // of the size given.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&seconds as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (listener, seconds);
    Ok(())
}
