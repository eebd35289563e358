//! A delivery as the core sees it: body, the AMQP properties the contract honours, and the
//! worker's own bookkeeping headers, already read from the broker's types by `amqp/`.

/// A delivery as the core sees it: body, the AMQP properties the contract honours, and
/// the worker's own bookkeeping headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inbound {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub traceparent: Option<String>,
    /// The broker's redelivered flag.
    pub redelivered: bool,
    /// `x-attempts`: create POSTs made for this command over earlier deliveries.
    pub attempts: u32,
    /// `x-deferrals`: times the message was parked or deferred (never an attempt).
    pub deferrals: u32,
    /// `x-retries`: delay tiers already passed because of transient failures.
    pub retries: u32,
    /// `x-replay-count`: times an operator replayed it from the DLQ.
    pub replay_count: u32,
    /// `x-first-failed-at`, kept across retries and replays.
    pub first_failed_at: Option<String>,
    /// The message's dead letter was written by an earlier delivery (which then could not
    /// publish the failure event): only the event is owed.
    pub dead_lettered: bool,
}

impl Inbound {
    /// Whether an earlier delivery may already have sent a POST .
    pub fn may_have_been_attempted(&self) -> bool {
        self.redelivered || self.attempts > 0 || self.replay_count > 0
    }

    /// `correlation_id`, else `message_id`, else the ext id.
    pub fn correlation_id_or(&self, ext_id: Option<&str>) -> Option<String> {
        self.correlation_id
            .clone()
            .or_else(|| self.message_id.clone())
            .or_else(|| ext_id.map(str::to_owned))
    }
}
