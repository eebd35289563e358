//! The file `dlq export --out` and `dlq discard --export` write: dead letters hold personal
//! data, and a discard's export may be the only copy left of what it removed.
//!
//! Invariants:
//! - **Never over anything.** The target must not exist (a second discard into the same
//!   file would destroy the first one's copy). The file appears by a hard link from the
//!   temporary file, which fails if the name was taken meanwhile: no check-then-rename race.
//! - **Complete or absent.** It is written to a temporary file beside the target (created
//!   exclusively, owner-only, never through a symbolic link), synced, and only then linked
//!   into place.
//! - **No temporary file is left behind for long.** One that an interrupted command leaves
//!   (SIGINT and SIGTERM remove theirs; SIGKILL cannot) is removed by the next export into
//!   the same directory: a temporary file is locked (`flock`) by the process writing it,
//!   so one that can be locked has no writer left.

use std::fs::{File, OpenOptions};
use std::io::BufWriter;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::ops::OpsError;

/// An export being written (module documentation).
pub(crate) struct ExportFile {
    pub writer: BufWriter<File>,
    pub tmp: PathBuf,
    out: PathBuf,
}

impl ExportFile {
    /// Refuse a target that exists, whatever it is (module documentation).
    pub fn check_target(out: &Path) -> Result<(), OpsError> {
        match std::fs::symlink_metadata(out) {
            Ok(meta) => {
                use std::os::unix::fs::FileTypeExt;
                let t = meta.file_type();
                let kind = if t.is_file() {
                    "an existing file (an export never replaces one: it may be the only copy of what was discarded)"
                } else if t.is_symlink() {
                    "a symbolic link"
                } else if t.is_dir() {
                    "a directory"
                } else if t.is_char_device() || t.is_block_device() {
                    "a device"
                } else if t.is_fifo() {
                    "a named pipe"
                } else if t.is_socket() {
                    "a socket"
                } else {
                    "not a regular file"
                };
                Err(OpsError::BadArgument(format!(
                    "{}: is {kind}; exports go to a new path, or - (standard output)",
                    out.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(OpsError::output(out)(source)),
        }
    }

    /// Start writing an export of `out` (which must not exist): a locked temporary file
    /// beside it. Stale temporary files in that directory go first.
    pub fn create(out: &Path) -> Result<ExportFile, OpsError> {
        Self::check_target(out)?;
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        remove_stale(&dir);
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "export".to_owned());
        let id = uuid::Uuid::new_v4().simple();
        // Created and locked under a name no cleanup looks at, then renamed to the one it
        // does: a stale-file sweep can never take a file before its writer locked it.
        let fresh = dir.join(format!(".{name}.{id}.new"));
        let tmp = dir.join(format!(".{name}.{TMP_MARK}{id}.tmp"));
        // create_new: O_EXCL, which also refuses to follow a symbolic link planted there.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&fresh)
            .map_err(OpsError::output(&fresh))?;
        let locked = file
            .try_lock()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|()| std::fs::rename(&fresh, &tmp));
        if let Err(e) = locked {
            let _ = std::fs::remove_file(&fresh);
            return Err(OpsError::output(&fresh)(e));
        }
        Ok(ExportFile {
            writer: BufWriter::new(file),
            tmp,
            out: out.to_path_buf(),
        })
    }

    /// Sync, then give it its name, only if that name is still free.
    pub fn finish(self) -> Result<(), OpsError> {
        let ExportFile { writer, tmp, out } = self;
        let done = (|| {
            let file = writer
                .into_inner()
                .map_err(|e| OpsError::output(&tmp)(e.into_error()))?;
            file.sync_all().map_err(OpsError::output(&tmp))?;
            std::fs::hard_link(&tmp, &out).map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    OpsError::BadArgument(format!(
                        "{}: was created by something else during the export; it was left as it is and nothing was written",
                        out.display()
                    ))
                } else {
                    OpsError::output(&out)(source)
                }
            })?;
            // The new name must outlive a crash too: the discard that follows acks for good.
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty())
                && let Ok(d) = File::open(dir)
            {
                let _ = d.sync_all();
            } else if let Ok(d) = File::open(".") {
                let _ = d.sync_all();
            }
            // The lock goes with the last descriptor, after the temporary name is gone.
            let _ = std::fs::remove_file(&tmp);
            drop(file);
            Ok(())
        })();
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done
    }

    /// Forget it: the temporary file goes.
    pub fn abort(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Marks this program's temporary export files: `.NAME.gp-export-<32 hex>.tmp`.
const TMP_MARK: &str = "gp-export-";

/// Which temporary export file `name` is: this version's (`.NAME.gp-export-<32 hex>.tmp`),
/// an earlier version's (`.NAME.<32 hex>.tmp`), or none.
fn export_tmp(name: &str) -> Option<Tmp> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (stem, id) = rest.rsplit_once('.')?;
    let hex = |s: &str| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if stem.is_empty() {
        return None;
    }
    match id.strip_prefix(TMP_MARK) {
        Some(id) if hex(id) => Some(Tmp::Ours),
        None if hex(id) => Some(Tmp::Earlier),
        _ => None,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Tmp {
    Ours,
    /// An earlier version named them without a mark (and did not lock them): taken only
    /// when it looks like one (owner-only, JSON lines or empty).
    Earlier,
}

/// Remove the export temporary files in `dir` that no process writes any more (module
/// documentation). Best effort: what cannot be read or removed stays.
fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(kind) = export_tmp(&name.to_string_lossy()) else {
            continue;
        };
        let path = entry.path();
        // Only a regular file of ours, opened without following a symbolic link.
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        else {
            continue;
        };
        let ours = file.metadata().is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.file_type().is_file()
                && m.uid() == own_uid()
                && (kind == Tmp::Ours || (m.mode() & 0o777 == 0o600 && looks_exported(&file)))
        });
        if ours && file.try_lock().is_ok() {
            let _ = std::fs::remove_file(&path);
            errln!(
                "removed {}: an export that did not finish left it",
                crate::text::printable(&path.display().to_string(), 300)
            );
        }
    }
}

/// Empty, or starting like a JSON line: what an export writes.
fn looks_exported(mut file: &File) -> bool {
    use std::io::Read;
    let mut first = [0u8; 1];
    matches!(file.read(&mut first), Ok(0) | Ok(1) if first[0] == b'{' || first[0] == 0)
}

/// This process's user id (the owner of `/proc/self`).
fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    static UID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UID.get_or_init(|| std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_export_temporary_files_are_candidates() {
        let hex = "a".repeat(32);
        assert_eq!(
            export_tmp(&format!(".d.jsonl.gp-export-{hex}.tmp")),
            Some(Tmp::Ours)
        );
        assert_eq!(
            export_tmp(&format!(".d.jsonl.{hex}.tmp")),
            Some(Tmp::Earlier)
        );
        assert_eq!(
            export_tmp(&format!(".d.jsonl.{}.tmp", "g".repeat(32))),
            None
        );
        assert_eq!(export_tmp(&format!("d.jsonl.{hex}.tmp")), None);
        assert_eq!(export_tmp(&format!("..{hex}.tmp")), None);
        assert_eq!(
            export_tmp(&format!(".d.jsonl.{hex}.new")),
            None,
            "being created"
        );
        assert_eq!(export_tmp(".d.jsonl.tmp"), None);
        assert_eq!(export_tmp(".swap.tmp"), None);
    }
}
