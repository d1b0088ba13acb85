//! Fingerprints of what produced a result row, so a resumed sweep never reuses a row whose
//! sample, method, model or options have changed since it was written.
//!
//! The hash is 64-bit FNV-1a: stable across Rust versions and platforms (std's hasher is
//! not), and ample for telling apart the few thousand rows of a sweep.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{EvalError, Result};

/// 64-bit FNV-1a, fed incrementally.
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Feeds a string with its length, so that consecutive fields cannot run together.
    pub fn field(&mut self, s: &str) {
        self.update(&(s.len() as u64).to_le_bytes());
        self.update(s.as_bytes());
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// The identity of a model on disk: file name, size and a hash of the content (every file
/// of a Hugging Face folder, in name order). Renaming or copying the file keeps its hash;
/// requantizing or editing it changes it.
pub fn model_identity(path: &Path) -> Result<String> {
    let mut files = if path.is_dir() {
        let mut v: Vec<_> = std::fs::read_dir(path)
            .map_err(EvalError::io(path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    files.retain(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')));
    let mut hash = Fnv64::default();
    let mut size = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for file in &files {
        if path.is_dir() {
            hash.field(&file.file_name().unwrap_or_default().to_string_lossy());
        }
        let mut f = File::open(file).map_err(EvalError::io(file))?;
        loop {
            let n = f.read(&mut buf).map_err(EvalError::io(file))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            hash.update(&buf[..n]);
        }
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    Ok(format!("{name} ({size} bytes, fnv {})", hash.hex()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_reference_vectors() {
        // From the FNV reference (draft-eastlake-fnv): FNV-1a 64 of "" and "a".
        assert_eq!(Fnv64::default().hex(), "cbf29ce484222325");
        let mut h = Fnv64::default();
        h.update(b"a");
        assert_eq!(h.hex(), "af63dc4c8601ec8c");
        let mut h = Fnv64::default();
        h.update(b"foobar");
        assert_eq!(h.hex(), "85944171f73967e8");
    }

    #[test]
    fn model_identity_follows_content_not_name() {
        let dir = std::env::temp_dir().join(format!("kvmerger-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.gguf"), dir.join("b.gguf"));
        std::fs::write(&a, b"weights one").unwrap();
        std::fs::write(&b, b"weights one").unwrap();
        let hash = |p: &Path| model_identity(p).unwrap().split("fnv ").nth(1).unwrap().to_string();
        assert_eq!(hash(&a), hash(&b));
        std::fs::write(&b, b"weights two").unwrap();
        assert_ne!(hash(&a), hash(&b));
        assert!(model_identity(&a).unwrap().starts_with("a.gguf (11 bytes"));
    }
}
