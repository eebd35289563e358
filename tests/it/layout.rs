//! The layering the README describes, checked on the source: the core imports no adapter
//! and no I/O crate, adapters never reach up into the commands, and only the CLI wires
//! the commands together. A new import that breaks it fails here, not in review.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src readable") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Module (first path segment under `src/`) → the `crate::` modules it names and the
/// external crates it uses, with the file that does.
fn imports() -> BTreeMap<String, Vec<(String, String)>> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src").to_path_buf();
        let module = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|m| m.trim_end_matches(".rs").to_owned())
            .expect("module");
        let text = std::fs::read_to_string(&file).expect("readable");
        let names = out.entry(module).or_default();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let preceded_by_ident = line[..i]
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_');
                if preceded_by_ident {
                    continue; // `group_provisioner::…` in a doc example, say
                }
                let name: String = line[i + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                names.push((name, rel.display().to_string()));
            }
            for krate in ["lapin", "redis", "reqwest", "axum", "prometheus_client"] {
                let used =
                    line.contains(&format!("{krate}::")) && !line.contains(&format!("_{krate}::"));
                if used {
                    names.push((format!("extern:{krate}"), rel.display().to_string()));
                }
            }
        }
    }
    out
}

fn assert_never_imports(
    imports: &BTreeMap<String, Vec<(String, String)>>,
    module: &str,
    banned: &[&str],
) {
    for (name, file) in imports.get(module).into_iter().flatten() {
        assert!(
            !banned.contains(&name.as_str()),
            "src/{file} ({module}) must not use {name}"
        );
    }
}

#[test]
fn the_core_knows_no_adapter_and_no_io_crate() {
    let imports = imports();
    assert_never_imports(
        &imports,
        "pipeline",
        &[
            "amqp",
            "dedup",
            "convirza",
            "metrics",
            "http",
            "telemetry",
            "config",
            "worker",
            "ops",
            "cli",
            "app",
            "sim",
            "extern:lapin",
            "extern:redis",
            "extern:reqwest",
            "extern:axum",
            "extern:prometheus_client",
        ],
    );
}

#[test]
fn adapters_never_reach_up_into_the_commands() {
    let imports = imports();
    for adapter in [
        "amqp",
        "dedup",
        "convirza",
        "metrics",
        "http",
        "telemetry",
        "config",
        "command",
        "retry",
        "secret",
        "clock",
        "hash",
        "traceparent",
        "sim",
    ] {
        assert_never_imports(&imports, adapter, &["worker", "ops", "cli", "app"]);
    }
}

#[test]
fn only_the_cli_wires_the_commands() {
    let imports = imports();
    for (module, names) in &imports {
        for (name, file) in names {
            let allowed = match name.as_str() {
                "cli" => module == "bin" || module == "cli",
                "worker" | "ops" => module == "cli" || module == name,
                _ => true,
            };
            assert!(allowed, "src/{file} ({module}) must not use {name}");
        }
    }
    assert!(
        imports["worker"].iter().any(|(n, _)| n == "app")
            && imports["ops"].iter().any(|(n, _)| n == "app"),
        "worker and ops both build their clients through app"
    );
}
