//! What the documentation says, checked against what the worker does, so that a stale
//! sentence fails here instead of misleading a newcomer or an integrator.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every text a reader may follow: the README, the docs, the scripts, the deploy files,
/// the example configs.
fn texts() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut visit = vec![
        root().join("docs"),
        root().join("scripts"),
        root().join("deploy"),
        root().join("config"),
    ];
    for top in ["README.md", "CONTRIBUTING.md", "CHANGELOG.md"] {
        let p = root().join(top);
        if p.exists() {
            out.push((top.to_owned(), std::fs::read_to_string(&p).expect("read")));
        }
    }
    while let Some(dir) = visit.pop() {
        for entry in std::fs::read_dir(&dir).expect("dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                visit.push(path);
            } else if ["md", "sh", "yaml", "yml", "json", "toml"]
                .iter()
                .any(|e| path.extension().is_some_and(|x| x == *e))
            {
                let rel = path.strip_prefix(root()).unwrap_or(Path::new("?"));
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                // JSON: what a reader sees are its strings, one by one.
                let text = if path.extension().is_some_and(|x| x == "json") {
                    let mut strings = Vec::new();
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                        collect_strings(&v, &mut strings);
                    }
                    strings.join("\n\n")
                } else {
                    text
                };
                out.push((rel.display().to_string(), text));
            }
        }
    }
    out
}

fn collect_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

/// Sentences, roughly: split at full stops, blank lines and table cells; whitespace and
/// comment markers folded, lower case.
fn sentences(text: &str) -> Vec<String> {
    // A full stop ends a sentence only before a space or a line break: dotted names
    // (`provisioning.events`) stay whole.
    // A table row is one sentence (its first cell often names what the rest is about).
    text.lines()
        .map(|l| {
            if l.trim_start().starts_with('|') {
                format!("\u{0}{l}\u{0}")
            } else {
                format!("{l}\n")
            }
        })
        .collect::<String>()
        .replace(". ", "\u{0}")
        .replace(".\n", "\u{0}")
        .replace("\n\n", "\u{0}")
        .split('\u{0}')
        .map(str::to_owned)
        .collect::<Vec<_>>()
        .into_iter()
        .map(|s| {
            s.split_whitespace()
                .filter(|w| *w != "#" && *w != "//")
                .collect::<Vec<_>>()
                .join(" ")
                .to_lowercase()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// A sentence that says an event nobody is bound for stops, parks or opens the circuit —
/// what the worker did before events had an alternate exchange.
fn says_an_unbound_event_stops_the_worker(sentence: &str) -> bool {
    const UNBOUND: [&str; 6] = [
        "nobody is bound",
        "no queue is bound",
        "nobody bound",
        "unroutable event",
        "events are unroutable",
        "event is unroutable",
    ];
    // `publish` is the circuit's fault of that name (a row of its table).
    const EFFECT: [&str; 5] = ["circuit", "park", "pause", "stall", "`publish`"];
    const DENIED: [&str; 4] = ["not ", "never", "nothing", "n't"];
    UNBOUND.iter().any(|u| sentence.contains(u))
        && EFFECT.iter().any(|e| sentence.contains(e))
        && !DENIED.iter().any(|d| sentence.contains(d))
}

#[test]
fn the_stale_wording_detector_knows_the_old_sentences() {
    for old in [
        "Events are published *mandatory*: if no queue is bound to `provisioning.events`, the worker treats the unroutable event as a fault of the system (circuit `publish`) and parks commands until a consumer is bound, rather than losing their outcome.",
        "events are published mandatory, and an unroutable event opens the circuit rather than being lost",
        "# \"mandatory\", so with nobody bound to provisioning.events the worker would park commands",
        "| `publish` | an exchange/queue is missing or nobody is bound to `provisioning.events`: run `group-provisioner check` and bind your event consumers |",
        "            summary: \"Provisioning paused: circuit open for 5 minutes\"\n            description: \"The API refuses our credentials, the endpoint is gone, Redis is down, events are unroutable, or the API is failing. The worker log line names the fault.\"",
    ] {
        assert!(
            sentences(old)
                .iter()
                .any(|s| says_an_unbound_event_stops_the_worker(s)),
            "not caught: {old}"
        );
    }
    assert!(!says_an_unbound_event_stops_the_worker(
        "an event nobody is bound for is not this fault: it waits in provisioning.events.unrouted"
    ));
}

/// An event nobody is bound for waits in `provisioning.events.unrouted`; no text may say
/// it opens the circuit or parks commands.
#[test]
fn no_text_says_an_unbound_event_stops_the_worker() {
    let mut stale = Vec::new();
    for (file, text) in texts() {
        for s in sentences(&text) {
            if says_an_unbound_event_stops_the_worker(&s) {
                stale.push(format!("{file}: {s}"));
            }
        }
    }
    assert!(stale.is_empty(), "stale wording:\n{}", stale.join("\n"));
}
