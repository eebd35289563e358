//! A process that cannot go on ends at once, in one line: never half alive.
//!
//! Invariants (once [`install`] ran, as the binary does first thing):
//! - a panic inside one delivery's work costs only that delivery: the runtime catches it,
//!   the broker delivers the message again, and its delivery limit dead-letters it in the
//!   end (see [`DeliveryWork`]);
//! - any other panic — a thread or the runtime that cannot start, the session or the HTTP
//!   endpoint failing — ends the process with `fatal: <what>` on stderr and exit code 1,
//!   so that its supervisor (Kubernetes, systemd) restarts it or says why it cannot;
//! - so does a thread that cannot be started, wherever it happens, even inside a delivery:
//!   that is the process's fault, not the message's.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

/// Set once `main` has its exit code: what library threads do while the process ends
/// (the broker client's thread winding down without a runtime) changes nothing.
static EXITING: AtomicBool = AtomicBool::new(false);

/// The process is ending with the code it has: later panics of other threads are ignored.
pub fn exiting() {
    EXITING.store(true, Ordering::SeqCst);
}

thread_local! {
    /// Set while a delivery's work is being polled on this thread.
    static IN_DELIVERY: Cell<bool> = const { Cell::new(false) };
}

/// Say why the process stops, then stop it (exit code 1).
pub fn exit(what: &str) -> ! {
    // The log lines before it come first (bounded wait: stdout may be stalled).
    crate::telemetry::flush();
    eprintln!("fatal: {what}");
    std::process::exit(1)
}

/// Make every panic outside a delivery's work fatal (module documentation).
pub fn install() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if EXITING.load(Ordering::SeqCst) {
            return;
        }
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_owned());
        // A thread the OS refused: tokio says "OS can't spawn worker thread", other
        // libraries "failed to spawn …" or unwrap the OS error (EAGAIN).
        let no_thread =
            message.contains("spawn") || message.contains("Resource temporarily unavailable");
        if IN_DELIVERY.with(Cell::get) && !no_thread {
            default(info);
            return;
        }
        let thread = std::thread::current();
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let hint = if no_thread {
            " (the address space or thread limit is too small: see docs/deployment.md, \"Resource limits\")"
        } else {
            ""
        };
        exit(&format!(
            "{message} (thread {}{place}){hint}",
            thread.name().unwrap_or("unnamed")
        ));
    }));
}

pin_project_lite::pin_project! {
    /// One delivery's work: a panic in it is that delivery's alone (module documentation).
    pub struct DeliveryWork<F> {
        #[pin]
        work: F,
    }
}

impl<F> DeliveryWork<F> {
    pub fn new(work: F) -> DeliveryWork<F> {
        DeliveryWork { work }
    }
}

impl<F: Future> Future for DeliveryWork<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        struct Reset(bool);
        impl Drop for Reset {
            fn drop(&mut self) {
                let was = self.0;
                IN_DELIVERY.with(|c| c.set(was));
            }
        }
        let _reset = Reset(IN_DELIVERY.with(|c| c.replace(true)));
        self.project().work.poll(cx)
    }
}
