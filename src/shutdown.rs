//! Process signals: SIGTERM and SIGINT both mean "drain and exit 0".
//!
//! Invariant: the handlers are installed when [`listen`] is called, not when its future is
//! first polled, so a signal that arrives while the worker is still starting is not the
//! default "terminate at once" but a request to drain.

use std::future::Future;

/// Install the handlers now; the future resolves on the first SIGTERM or SIGINT.
pub fn listen() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let handlers = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            match handlers {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT (handlers installed at the call).
pub async fn signal() {
    listen().await
}
