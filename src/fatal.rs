//! A process that cannot go on ends at once, in one line: never half alive.
//!
//! Invariants (once [`install`] ran, as the binary does first thing):
//! - a panic inside one delivery's work costs only that delivery: the delivery goes back to
//!   the queue at once, the broker delivers it again, and its delivery limit dead-letters it
//!   in the end (see [`DeliveryWork`]);
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
    errln!("fatal: {what}");
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
        let thread = std::thread::current();
        // Flushing the log at exit: tracing-appender may print (and panic on a closed
        // stdout) while it shuts down; the exit under way says what matters.
        if thread.name() == Some(crate::telemetry::FLUSH_THREAD) {
            return;
        }
        // A thread the OS refused: tokio says "OS can't spawn worker thread", other
        // libraries "failed to spawn …"; some unwrap the OS error (EAGAIN).
        let no_thread = message.contains("spawn");
        if IN_DELIVERY.with(Cell::get) && !no_thread {
            default(info);
            return;
        }
        let no_thread = no_thread || message.contains("Resource temporarily unavailable");
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
    /// `on_panic` runs once if it panics (the worker sends the delivery back to the queue,
    /// so that it does not hold a prefetch slot until the channel closes); the panic then
    /// goes on to the runtime as before.
    pub struct DeliveryWork<F, P> {
        #[pin]
        work: F,
        on_panic: Option<P>,
    }
}

impl<F, P> DeliveryWork<F, P> {
    pub fn new(work: F, on_panic: P) -> DeliveryWork<F, P> {
        DeliveryWork {
            work,
            on_panic: Some(on_panic),
        }
    }
}

impl<F: Future, P: FnOnce()> Future for DeliveryWork<F, P> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        struct Reset(bool);
        impl Drop for Reset {
            fn drop(&mut self) {
                let was = self.0;
                IN_DELIVERY.with(|c| c.set(was));
            }
        }
        let this = self.project();
        let polled = {
            let _reset = Reset(IN_DELIVERY.with(|c| c.replace(true)));
            let work = this.work;
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work.poll(cx)))
        };
        match polled {
            Ok(poll) => poll,
            Err(panic) => {
                if let Some(on_panic) = this.on_panic.take() {
                    on_panic();
                }
                std::panic::resume_unwind(panic)
            }
        }
    }
}
