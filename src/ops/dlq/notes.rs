//! Telling the dedup store what an operator did with a dead letter, so that `status` never
//! says "in the dead-letter queue" of one that was replayed or discarded.
//!
//! Invariants: best effort and after the broker side is done (the dead letter is moved or
//! removed whatever Redis says); when Redis cannot be reached, that is said once and no
//! more writes are tried, so a Redis outage never slows a replay down letter by letter.

use crate::amqp::headers::{self, header_u32};
use crate::command::{CreateGroup, ExtId};
use crate::config::Settings;
use crate::dedup::RedisStore;
use crate::pipeline::{DedupStore, LastOutcome, OutcomeKey, Place, truncate};

use super::DeadLetter;

pub(crate) struct Notes {
    store: Option<RedisStore>,
    ttl: std::time::Duration,
}

impl Notes {
    pub fn new(settings: &Settings) -> Notes {
        let store = match crate::app::dedup_store(settings) {
            Ok(store) => Some(store),
            Err(e) => {
                warn_unrecorded(&e);
                None
            }
        };
        Notes {
            store,
            ttl: settings.dedup.ttl,
        }
    }

    /// Record `outcome` (`replayed`, `discarded`) of `letter`, now at `place`.
    pub async fn note(&mut self, letter: &DeadLetter, outcome: &str, place: Place) {
        let Some(store) = &self.store else {
            return;
        };
        let properties = &letter.delivery.properties;
        let mut record = LastOutcome {
            outcome: outcome.to_owned(),
            at: crate::clock::now_rfc3339(),
            ext_id: None,
            message_id: properties
                .message_id()
                .as_ref()
                .map(|m| truncate(m.as_str(), 255)),
            attempts: header_u32(properties.headers().as_ref(), headers::X_ATTEMPTS),
            error_kind: Some(truncate(&letter.kind, 64)),
            http_status: None,
            reason: None,
            message: None,
            org_unit_id: None,
            place,
        };
        // The ext id as the worker read it (its own parser: a body it refused, such as one
        // with a duplicate key, is kept under its message id, not under a lenient reading).
        let ext_id: Option<ExtId> = match CreateGroup::from_delivery(
            properties.content_type().as_ref().map(|c| c.as_str()),
            properties.content_encoding().as_ref().map(|c| c.as_str()),
            &letter.delivery.data,
        ) {
            Ok(command) => Some(command.ext_id),
            Err(invalid) => invalid.ext_id,
        };
        record.ext_id = ext_id.as_ref().map(ExtId::to_string);
        let mut keys = Vec::new();
        if let Some(ext_id) = &ext_id {
            keys.push(OutcomeKey::ExtId(ext_id));
        }
        // The worker keeps an invalid command without a valid ext id by message id.
        let by_message = ext_id.is_none() && letter.kind == "invalid_command";
        if let (Some(id), true) = (&record.message_id, by_message) {
            keys.push(OutcomeKey::MessageId(id));
        }
        for key in keys {
            if let Err(e) = store.record_outcome(key, &record, self.ttl).await {
                warn_unrecorded(&e);
                self.store = None;
                return;
            }
        }
    }
}

fn warn_unrecorded(error: &dyn std::fmt::Display) {
    errln!(
        "warning: the dedup store cannot be reached ({error}): the dead letters are handled, but `status` keeps showing them as dead-lettered until the worker processes them again"
    );
}
