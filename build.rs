//! Stamps the build with the commit it was built from (`COMMIT` in the crate), for
//! `--version`, the start-up line and `provisioner_build_info{commit}`.
//!
//! Where it comes from, first found: the `GP_BUILD_COMMIT` environment variable (the
//! Dockerfile passes its `REVISION` build argument, as the image has no `.git`), then `git`
//! in the source tree, else `unknown`. A build never fails for want of git.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=GP_BUILD_COMMIT");
    let given = std::env::var("GP_BUILD_COMMIT")
        .ok()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty());
    let commit = given.or_else(|| {
        // Build again when HEAD moves: HEAD itself, the branch it points to, packed refs
        // (paths as git resolves them, so a worktree works too). Only paths that exist:
        // cargo re-runs a build script for ever when one it watches is missing.
        let mut watch = vec![git(&["rev-parse", "--git-path", "HEAD"])];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(git(&["rev-parse", "--git-path", &branch]));
        }
        watch.push(git(&["rev-parse", "--git-path", "packed-refs"]));
        for path in watch.into_iter().flatten() {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
        git(&["rev-parse", "HEAD"])
    });
    // Also a tag or a describe string from the build argument; nothing that could break
    // out of a label or a version line.
    let commit = commit
        .filter(|c| {
            c.len() <= 64
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '_'))
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=GP_COMMIT={commit}");
}
