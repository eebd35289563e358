//! `group-provisioner run`.

use std::process::ExitCode;

use crate::config::{AuthMode, Settings};
use crate::convirza::{Auth, ConvirzaClient};

pub async fn run(settings: Settings) -> ExitCode {
    let auth = match (settings.api.auth, &settings.api.token) {
        (AuthMode::Token, Some(token)) => Auth::Static(token.clone()),
        _ => {
            eprintln!("config error: api.auth: login mode is not available in this version");
            return ExitCode::from(crate::cli::EXIT_CONFIG);
        }
    };
    let client = match ConvirzaClient::new(&settings.api.base_url, auth, settings.api.timeout) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the API client");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        version = crate::VERSION,
        api = client.base_url(),
        amqp = %settings.amqp.url,
        redis = %settings.redis.url,
        "worker started"
    );
    crate::shutdown::signal().await;
    tracing::info!("worker stopped");
    ExitCode::SUCCESS
}
