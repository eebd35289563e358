//! The layering the README describes, checked on the source: the core reaches no adapter
//! and no I/O crate (not even through another module), adapters never reach up into the
//! commands, and only the CLI wires the commands together. A new import that breaks it
//! fails here, not in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Crates that talk to the outside world.
const IO_CRATES: [&str; 8] = [
    "lapin",
    "redis",
    "reqwest",
    "axum",
    "prometheus_client",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
];
const ADAPTERS: [&str; 8] = [
    "otel",
    "amqp",
    "dedup",
    "convirza",
    "metrics",
    "http",
    "telemetry",
    "config",
];
const COMMANDS: [&str; 5] = ["worker", "ops", "console", "cli", "app"];

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src readable") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every source file: its path under `src/` and its text.
fn sources() -> Vec<(String, String)> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .map(|file| {
            let rel = file
                .strip_prefix(&src)
                .expect("under src")
                .display()
                .to_string();
            let text = std::fs::read_to_string(&file).expect("readable");
            (rel, text)
        })
        .collect()
}

fn ident(text: &str) -> String {
    text.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The first segment of every path after `crate::` in `code`, grouped imports included
/// (`use crate::{a::X, b};` names `a` and `b`).
fn crate_modules(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let preceded_by_ident = code[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if preceded_by_ident {
            continue; // `group_provisioner::…`, say
        }
        let rest = &code[i + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            out.push(ident(rest));
            continue;
        };
        let (mut depth, mut start) = (0usize, 0usize);
        for (j, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    out.push(ident(&group[start..j]));
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(ident(&group[start..j]));
                    start = j + 1;
                }
                _ => {}
            }
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

struct Graph {
    /// Module → modules it names, with a file that does.
    edges: BTreeMap<String, BTreeMap<String, String>>,
    /// Module → I/O crates it uses, with a file that does.
    io: BTreeMap<String, BTreeMap<String, String>>,
}

fn graph() -> Graph {
    let mut g = Graph {
        edges: BTreeMap::new(),
        io: BTreeMap::new(),
    };
    for (rel, text) in sources() {
        let module = rel
            .split('/')
            .next()
            .map(|m| m.trim_end_matches(".rs").to_owned())
            .expect("module");
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let edges = g.edges.entry(module.clone()).or_default();
        for name in crate_modules(&code) {
            if name != module {
                edges.entry(name).or_insert_with(|| rel.clone());
            }
        }
        let io = g.io.entry(module).or_default();
        for krate in IO_CRATES {
            let used = code.match_indices(&format!("{krate}::")).any(|(i, _)| {
                !code[..i]
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
            });
            if used {
                io.entry(krate.to_owned()).or_insert_with(|| rel.clone());
            }
        }
    }
    g
}

impl Graph {
    /// Every module `from` reaches, with the path that reaches it.
    fn reach(&self, from: &str) -> BTreeMap<String, Vec<String>> {
        let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut todo = vec![(from.to_owned(), vec![from.to_owned()])];
        while let Some((module, path)) = todo.pop() {
            for next in self.edges.get(&module).into_iter().flat_map(|e| e.keys()) {
                if !seen.contains_key(next) && next != from {
                    let mut p = path.clone();
                    p.push(next.clone());
                    seen.insert(next.clone(), p.clone());
                    todo.push((next.clone(), p));
                }
            }
        }
        seen
    }
}

#[test]
fn the_parser_sees_grouped_and_nested_imports() {
    let code =
        "use crate::{a::X, b::{C, D}, e};\nlet v = crate::f::g();\nuse group_provisioner::h;";
    assert_eq!(crate_modules(code), ["a", "b", "e", "f"]);
}

#[test]
fn the_core_reaches_no_adapter_and_no_io_crate() {
    let g = graph();
    let reached = g.reach("pipeline");
    for module in ADAPTERS.iter().chain(COMMANDS.iter()).chain(["sim"].iter()) {
        if let Some(path) = reached.get(*module) {
            panic!("the core reaches {module}: {}", path.join(" → "));
        }
    }
    for module in reached.keys().chain(["pipeline".to_owned()].iter()) {
        if let Some((krate, file)) = g.io.get(module).and_then(|io| io.iter().next()) {
            panic!("the core reaches {krate} through src/{file}");
        }
    }
}

#[test]
fn adapters_never_reach_up_into_the_commands() {
    let g = graph();
    for adapter in ADAPTERS.iter().chain(["sim"].iter()) {
        let reached = g.reach(adapter);
        for command in COMMANDS {
            if let Some(path) = reached.get(command) {
                panic!("{adapter} reaches {command}: {}", path.join(" → "));
            }
        }
    }
}

#[test]
fn only_the_cli_wires_the_commands() {
    let g = graph();
    let users = |target: &str| -> BTreeSet<String> {
        g.edges
            .iter()
            .filter(|(_, e)| e.contains_key(target))
            .map(|(m, _)| m.clone())
            .collect()
    };
    // The binary reaches `cli` as `group_provisioner::cli`; no library module does.
    assert_eq!(users("cli"), BTreeSet::new());
    assert_eq!(users("worker"), BTreeSet::from(["cli".to_owned()]));
    // The console acts through the operator commands' library code, as the CLI does.
    assert_eq!(
        users("ops"),
        BTreeSet::from(["cli".to_owned(), "console".to_owned()])
    );
    assert_eq!(users("console"), BTreeSet::from(["cli".to_owned()]));
}

#[test]
fn clients_are_built_in_app_only() {
    for (rel, code) in sources() {
        let allowed = rel == "app.rs" || rel.starts_with("dedup/") || rel.starts_with("convirza/");
        for constructor in [
            "RedisStore::new(",
            "ConvirzaClient::new(",
            "LoginSession::new(",
        ] {
            assert!(
                allowed || !code.contains(constructor),
                "src/{rel} calls {constructor}…): build clients through app"
            );
        }
    }
}

/// `unsafe` lives in one module, which says why each use is needed (`src/sys.rs`).
#[test]
fn unsafe_code_lives_in_sys_only() {
    for (file, text) in sources() {
        if file == "sys.rs" {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            assert!(
                !code
                    .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                    .any(|w| w == "unsafe"),
                "src/{file}:{}: unsafe outside src/sys.rs: {line}",
                n + 1
            );
        }
    }
}

/// What a person reads is printed in one place: `output` (a command's report on stdout,
/// warnings and errors on stderr). The log has its own writer (`telemetry`); tests print
/// as they like.
#[test]
fn output_is_printed_in_one_module() {
    let printing = [
        "println!",
        "print!",
        "eprintln!",
        "eprint!",
        "dbg!",
        "stdout(",
        "stderr(",
    ];
    let mut found = Vec::new();
    for (file, text) in sources() {
        if file == "output.rs" {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            if line.starts_with("#[cfg(test)]") {
                break;
            }
            let code = line.split("//").next().unwrap_or_default();
            // Asking whether stderr is a terminal writes nothing; the log's own writer is
            // the one other thing that writes to stdout.
            let code = code.replace("io::stderr().is_terminal()", "");
            let code = if file == "telemetry.rs" {
                code.replace("std::io::stdout().lock()", "")
            } else {
                code
            };
            if printing.iter().any(|p| code.contains(p)) {
                found.push(format!("src/{file}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "printed outside src/output.rs:\n{}",
        found.join("\n")
    );
}

/// Braces of a line of code, strings, characters and comments left out (roughly: enough
/// for this code base's style).
fn braces(line: &str) -> i64 {
    let code = line.split("//").next().unwrap_or_default();
    let (mut depth, mut chars, mut in_str) = (0, code.chars().peekable(), false);
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_str => {
                chars.next();
            }
            '"' => in_str = !in_str,
            '\'' if !in_str => {
                // A char literal ('{', '\n', b'{'): skip to its closing quote; a lifetime has
                // none within two characters.
                let rest: String = chars.clone().take(3).collect();
                if let Some(end) = rest.find('\'') {
                    for _ in 0..=end {
                        chars.next();
                    }
                }
            }
            '{' if !in_str => depth += 1,
            '}' if !in_str => depth -= 1,
            _ => {}
        }
    }
    depth
}

/// No function of `src/` (tests aside) is longer than 80 lines, signature to closing brace.
#[test]
fn no_function_is_longer_than_80_lines() {
    let mut long = Vec::new();
    for (file, text) in sources() {
        if file.ends_with("tests.rs") || file.ends_with("fakes.rs") {
            continue;
        }
        let lines: Vec<&str> = text
            .lines()
            .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
            .collect();
        let mut i = 0;
        while i < lines.len() {
            let words: Vec<&str> = lines[i].split_whitespace().collect();
            let is_fn = words.iter().position(|w| *w == "fn").is_some_and(|p| {
                words[..p]
                    .iter()
                    .all(|w| w.starts_with("pub") || ["async", "const", "unsafe"].contains(w))
            }) && !lines[i].trim_end().ends_with(';');
            if !is_fn {
                i += 1;
                continue;
            }
            let (mut depth, mut j, mut opened) = (0, i, false);
            while j < lines.len() {
                let b = braces(lines[j]);
                opened |= lines[j]
                    .split("//")
                    .next()
                    .unwrap_or_default()
                    .contains('{');
                depth += b;
                if opened && depth <= 0 {
                    break;
                }
                j += 1;
            }
            if j - i + 1 > 80 {
                long.push(format!("src/{file}:{}: {} lines", i + 1, j - i + 1));
            }
            i = j + 1;
        }
    }
    assert!(
        long.is_empty(),
        "functions longer than 80 lines:\n{}",
        long.join("\n")
    );
}

/// No two files import each other, directly or round a longer circle: inside each
/// directory of `src/`, what a file names of its siblings (`super::x`, `crate::dir::x`,
/// test code aside) never leads back to it.
#[test]
fn no_files_import_each_other_in_a_circle() {
    use std::collections::{BTreeMap, BTreeSet};
    let mut dirs: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (file, text) in sources() {
        let Some((dir, name)) = file.rsplit_once('/') else {
            continue;
        };
        let module = name.trim_end_matches(".rs").to_owned();
        let code: String = text
            .lines()
            .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
            .map(|l| format!("{}\n", l.split("//").next().unwrap_or_default()))
            .collect();
        let crate_path = format!("crate::{}::", dir.replace('/', "::"));
        let mut uses = BTreeSet::new();
        for prefix in ["super::", crate_path.as_str()] {
            for (i, _) in code.match_indices(prefix) {
                let rest = &code[i + prefix.len()..];
                // `super::x` or a group `super::{x, y::z}`.
                let names: Vec<String> = match rest.strip_prefix('{') {
                    Some(group) => group
                        .split('}')
                        .next()
                        .unwrap_or_default()
                        .split(',')
                        .map(|n| ident(n.trim()))
                        .collect(),
                    None => vec![ident(rest)],
                };
                for sibling in names {
                    if !sibling.is_empty() && sibling != module {
                        uses.insert(sibling);
                    }
                }
            }
        }
        dirs.entry(dir.to_owned()).or_default().insert(module, uses);
    }
    for (dir, graph) in &dirs {
        // Depth-first from each file: reaching it again is a circle.
        for start in graph.keys() {
            let mut stack: Vec<Vec<String>> = vec![vec![start.clone()]];
            let mut seen = BTreeSet::new();
            while let Some(path) = stack.pop() {
                let last = path.last().cloned().unwrap_or_default();
                for next in graph.get(&last).into_iter().flatten() {
                    if next == start {
                        panic!("src/{dir}: {} -> {start}", path.join(" -> "));
                    }
                    if graph.contains_key(next) && seen.insert(next.clone()) {
                        let mut longer = path.clone();
                        longer.push(next.clone());
                        stack.push(longer);
                    }
                }
            }
        }
    }
}
