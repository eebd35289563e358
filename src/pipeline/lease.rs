//! Keeping the lease on an ext id while a delivery works on it.
//!
//! Invariant: the lease is renewed every third of its length; once a renewal says it is no
//! longer ours, `lease_lost` is set and no further POST is sent for this delivery (a newer
//! owner may be posting).

use std::convert::Infallible;
use std::sync::atomic::Ordering;

use crate::command::ExtId;

use super::api::GroupApi;
use super::processor::Processor;
use super::store::DedupStore;
use super::tries::Tries;

impl<S: DedupStore, A: GroupApi> Processor<S, A> {
    /// Runs beside the work and never returns; the work's completion ends it.
    pub(super) async fn keep_lease(
        &self,
        ext_id: &ExtId,
        owner: &str,
        tries: &Tries,
    ) -> Infallible {
        let every = self.config.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            match self.store.renew(ext_id, owner, self.config.lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("lease lost while working; no further POST for this delivery");
                    tries.lease_lost.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
                // Redis trouble: keep trying; the lease itself still runs until it expires.
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
        }
    }
}
