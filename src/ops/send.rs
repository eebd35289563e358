//! `send [FILE|-]`: publish one command or a JSON-lines stream of them, with confirms.

use std::io::{IsTerminal, Read};
use std::path::Path;

use lapin::BasicProperties;
use lapin::Confirmation;
use lapin::types::ShortString;

use crate::command::CreateGroup;
use crate::config::Settings;

use super::{OpsError, connect};

/// Publishes in flight before waiting for their confirms.
const WINDOW: usize = 256;

/// One command to send and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub line: usize,
    pub body: Vec<u8>,
}

/// Split the input: a single JSON object (possibly pretty-printed over several lines) is
/// one command; anything else is JSON lines, blank lines ignored. Bytes, not text: one line
/// that is not UTF-8 is that line's problem, not the file's.
pub fn items(input: &[u8]) -> Vec<Item> {
    let trimmed = input.trim_ascii();
    if trimmed.starts_with(b"{")
        && trimmed.contains(&b'\n')
        && serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(trimmed).is_ok()
    {
        return vec![Item {
            line: 1,
            body: trimmed.to_vec(),
        }];
    }
    input
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_ascii()))
        .filter(|(_, l)| !l.is_empty())
        .map(|(line, l)| Item {
            line,
            body: l.to_vec(),
        })
        .collect()
}

/// What `send` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendSummary {
    pub sent: usize,
    pub invalid: usize,
    pub failed: usize,
}

impl SendSummary {
    /// Every command was sent.
    pub fn all_sent(&self) -> bool {
        self.invalid == 0 && self.failed == 0
    }
}

/// `send`: send, then print the summary (one JSON object with `json`).
pub async fn command(
    settings: &Settings,
    file: Option<&Path>,
    validate: bool,
    json: bool,
) -> Result<SendSummary, OpsError> {
    let s = run(settings, file, validate).await?;
    let object = serde_json::json!({"sent": s.sent, "invalid": s.invalid, "failed": s.failed});
    crate::output::summary(json, object, || {
        format!(
            "sent {}, invalid {}, failed {}",
            s.sent, s.invalid, s.failed
        )
    });
    Ok(s)
}

pub async fn run(
    settings: &Settings,
    file: Option<&Path>,
    validate: bool,
) -> Result<SendSummary, OpsError> {
    let mut input = Vec::new();
    let read = match file {
        None => std::io::stdin().read_to_end(&mut input),
        Some(p) if p == Path::new("-") => std::io::stdin().read_to_end(&mut input),
        Some(p) => std::fs::File::open(p).and_then(|mut f| f.read_to_end(&mut input)),
    };
    let source = file.map_or_else(|| "-".to_owned(), |p| p.display().to_string());
    read.map_err(|e| OpsError::Input {
        path: source.clone().into(),
        source: e,
    })?;
    let all = items(&input);
    if all.is_empty() {
        return Err(OpsError::NothingToSend { input: source });
    }
    let mut invalid = 0usize;
    let mut to_send = Vec::with_capacity(all.len());
    for item in all {
        if validate {
            let problem = match std::str::from_utf8(&item.body) {
                Err(e) => Some(format!(
                    "not UTF-8 (byte {} of the line), not sent",
                    e.valid_up_to() + 1
                )),
                Ok(_) => CreateGroup::parse(&item.body)
                    .err()
                    .map(|e| format!("invalid command, not sent: {e}")),
            };
            if let Some(problem) = problem {
                errln!(
                    "{}:{}: {}",
                    crate::text::printable(&source.to_string(), 300),
                    item.line,
                    crate::text::printable(&problem, 1024)
                );
                invalid += 1;
                continue;
            }
        }
        to_send.push(item);
    }
    let (sent, failed) = publish(settings, &to_send).await?;
    Ok(SendSummary {
        sent,
        invalid,
        failed,
    })
}

async fn publish(settings: &Settings, items: &[Item]) -> Result<(usize, usize), OpsError> {
    if items.is_empty() {
        return Ok((0, 0));
    }
    let (conn, channel, _) = connect(settings, "send").await?;
    let t = &settings.topology;
    crate::amqp::passive_exchange(&channel, &t.command_exchange)
        .await
        .map_err(|source| OpsError::Topology {
            what: format!("command exchange {:?}", t.command_exchange),
            source,
            hint: " (has the worker or `check` declared the topology?)",
        })?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(items.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} commands {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let (mut sent, mut failed) = (0usize, 0usize);
    for window in items.chunks(WINDOW) {
        let mut pending = Vec::with_capacity(window.len());
        for item in window {
            let props = BasicProperties::default()
                .with_content_type(ShortString::from("application/json"))
                .with_message_id(ShortString::from(uuid::Uuid::new_v4().to_string()))
                .with_app_id(ShortString::from("group-provisioner send"));
            let confirm = crate::amqp::publish_command(&channel, t, &item.body, props)
                .await
                .map_err(|source| OpsError::Line {
                    line: item.line,
                    source,
                })?;
            pending.push((item.line, confirm));
        }
        for (line, confirm) in pending {
            match confirm.await {
                Ok(Confirmation::Ack(None)) => sent += 1,
                Ok(Confirmation::Ack(Some(_))) => {
                    failed += 1;
                    errln!(
                        "line {line}: unroutable (no queue bound to {}/{})",
                        t.command_exchange,
                        t.command_routing_key
                    );
                }
                Ok(other) => {
                    failed += 1;
                    errln!("line {line}: broker refused the message ({other:?})");
                }
                Err(e) => {
                    failed += 1;
                    errln!("line {line}: {e}");
                }
            }
            if let Some(b) = &bar {
                b.inc(1);
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let _ = conn.close(200, ShortString::from("send done")).await;
    Ok((sent, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_object_or_json_lines() {
        let pretty = b"{\n  \"org_unit_ext_id\": \"A\",\n  \"org_unit_name\": \"x\",\n  \"org_unit_parent_id\": 1\n}\n";
        assert_eq!(items(pretty).len(), 1);
        let lines = b"{\"a\":1}\n\n{\"b\":2}\nnot json\n";
        let got = items(lines);
        assert_eq!(got.iter().map(|i| i.line).collect::<Vec<_>>(), [1, 3, 4]);
        assert_eq!(got[2].body, b"not json");
        assert_eq!(items(b"{\"a\":1}").len(), 1);
        let latin1 = b"{\"a\":1}\ncaf\xe9\n{\"b\":2}\n";
        assert_eq!(
            items(latin1).len(),
            3,
            "one bad line does not hide the others"
        );
        assert!(items(b"\n \n").is_empty());
    }
}
