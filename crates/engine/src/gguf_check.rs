//! A bounded pass over a GGUF header before candle's reader sees it.
//!
//! candle's reader checks each count against the bytes left, but then builds a 32-byte
//! `Value` per array element (a 100 MB array of bytes would take 3.2 GB), divides by a
//! `general.alignment` of zero, and multiplies tensor dimensions without overflow checks.
//! This pass walks the same layout without keeping anything but keys, estimates the memory
//! the parsed metadata will take, and checks every tensor's type, shape, offset and extent
//! against the file. Everything it rejects is a typed error naming the entry.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;

/// Most memory the parsed metadata may take (the largest vocabularies need ~30 MB).
pub const MAX_METADATA_BYTES: u64 = 256 << 20;
/// Longest metadata key or tensor name.
const MAX_NAME_BYTES: u64 = 1 << 16;
/// Deepest nesting of arrays (real files use one level).
const MAX_ARRAY_DEPTH: usize = 4;
/// GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// What the header pass found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSummary {
    pub version: u32,
    pub tensor_count: u64,
    pub metadata_count: u64,
    /// Where tensor data starts (after alignment).
    pub data_offset: u64,
}

/// Candle's GGML type for a GGUF type id, or `None` for types it cannot read.
pub fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Walks the header of the GGUF stream `r` (positioned at its start, `file_len` bytes long).
/// Returns a reason naming the bad entry on any inconsistency.
pub fn check_gguf<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<GgufSummary, String> {
    let mut h = Header { r, pos: 0, len: file_len, v1: false };
    let magic = h.u32("magic")?;
    if magic != 0x4655_4747 {
        return Err(format!("not a GGUF file (magic {magic:#010x})"));
    }
    let version = h.u32("version")?;
    if !(1..=3).contains(&version) {
        return Err(format!("unsupported GGUF version {version}"));
    }
    h.v1 = version == 1;
    let tensor_count = h.length("tensor count")?;
    let metadata_count = h.length("metadata count")?;
    // Each metadata entry takes at least 13 bytes and each tensor info 24.
    let least = metadata_count.saturating_mul(13).saturating_add(tensor_count.saturating_mul(24));
    if least > h.remaining() {
        return Err(format!(
            "the header claims {metadata_count} metadata entries and {tensor_count} tensors, \
             more than the {} bytes left could hold",
            h.remaining()
        ));
    }
    let mut keys = HashSet::new();
    let mut memory = 0u64;
    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..metadata_count {
        let key = h.name(&format!("metadata key {i}"))?;
        let kind = h.u32(&key)?;
        if key == "general.alignment" {
            alignment = h.alignment(kind)?;
        } else {
            h.value(kind, &key, 0, &mut memory)?;
        }
        if memory > MAX_METADATA_BYTES {
            return Err(format!(
                "metadata would take more than {} MiB in memory (at `{key}`)",
                MAX_METADATA_BYTES >> 20
            ));
        }
        if !keys.insert(key.clone()) {
            return Err(format!("metadata key `{key}` appears twice"));
        }
    }
    let mut tensors = Vec::new();
    let mut names = HashSet::new();
    for i in 0..tensor_count {
        let name = h.name(&format!("tensor name {i}"))?;
        let n_dims = h.u32(&name)?;
        if n_dims > MAX_DIMS {
            return Err(format!("tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"));
        }
        let mut elems = 1u64;
        let mut first = 1u64;
        for d in 0..n_dims {
            let dim = h.length(&name)?;
            if d == 0 {
                first = dim;
            }
            elems = elems.checked_mul(dim).ok_or_else(|| {
                format!("tensor `{name}`: the product of its dimensions overflows")
            })?;
        }
        let type_id = h.u32(&name)?;
        let dtype = ggml_dtype(type_id)
            .ok_or_else(|| format!("tensor `{name}` has unknown GGML type {type_id}"))?;
        let block = dtype.block_size() as u64;
        if !first.is_multiple_of(block) {
            return Err(format!(
                "tensor `{name}`: first dimension {first} is not a multiple of the {dtype:?} \
                 block size {block}"
            ));
        }
        let bytes = elems / block * dtype.type_size() as u64;
        let offset = h.u64(&name)?;
        if !names.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        tensors.push((name, offset, bytes));
    }
    let data_offset = h.pos.div_ceil(alignment) * alignment;
    let data_len = file_len.saturating_sub(data_offset);
    for (name, offset, bytes) in tensors {
        if !offset.is_multiple_of(alignment) {
            return Err(format!("tensor `{name}`: offset {offset} is not aligned to {alignment}"));
        }
        if offset.checked_add(bytes).is_none_or(|end| end > data_len) {
            return Err(format!(
                "tensor `{name}`: {bytes} bytes at offset {offset} run past the end of the data \
                 ({data_len} bytes)"
            ));
        }
    }
    Ok(GgufSummary { version, tensor_count, metadata_count, data_offset })
}

struct Header<'a, R> {
    r: &'a mut R,
    pos: u64,
    len: u64,
    /// Version 1 stores lengths as u32.
    v1: bool,
}

impl<R: Read + Seek> Header<'_, R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut buf = [0u8; N];
        self.r
            .read_exact(&mut buf)
            .map_err(|_| format!("the file ends inside `{what}` (at byte {})", self.pos))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn length(&mut self, what: &str) -> Result<u64, String> {
        if self.v1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), String> {
        if n > self.remaining() {
            return Err(format!(
                "`{what}` claims {n} bytes but only {} are left in the file",
                self.remaining()
            ));
        }
        self.r.seek(SeekFrom::Current(n as i64)).map_err(|e| format!("{what}: {e}"))?;
        self.pos += n;
        Ok(())
    }

    /// A key or tensor name, read into memory (bounded).
    fn name(&mut self, what: &str) -> Result<String, String> {
        let n = self.length(what)?;
        if n > MAX_NAME_BYTES || n > self.remaining() {
            return Err(format!("{what} claims a length of {n} bytes"));
        }
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf).map_err(|_| format!("the file ends inside {what}"))?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn alignment(&mut self, kind: u32) -> Result<u64, String> {
        let value = match kind {
            0 | 1 => u64::from(self.bytes::<1>("general.alignment")?[0]),
            2 | 3 => u64::from(u16::from_le_bytes(self.bytes::<2>("general.alignment")?)),
            4 | 5 => u64::from(self.u32("general.alignment")?),
            _ => return Err(format!("general.alignment has value type {kind}, not an integer")),
        };
        if value == 0 || !value.is_power_of_two() {
            return Err(format!("general.alignment is {value}, not a power of two"));
        }
        Ok(value)
    }

    /// Skips one value of GGUF type `kind`, adding the memory candle will spend on it.
    fn value(
        &mut self,
        kind: u32,
        key: &str,
        depth: usize,
        memory: &mut u64,
    ) -> Result<(), String> {
        *memory += std::mem::size_of::<Value>() as u64;
        match kind {
            0 | 1 | 7 => self.skip(1, key),
            2 | 3 => self.skip(2, key),
            4..=6 => self.skip(4, key),
            10..=12 => self.skip(8, key),
            8 => {
                let n = self.length(key)?;
                // Invalid UTF-8 bytes become 3-byte replacement characters.
                *memory = memory.saturating_add(n.saturating_mul(3));
                self.skip(n, key)
            }
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("`{key}` nests arrays deeper than {MAX_ARRAY_DEPTH}"));
                }
                let inner = self.u32(key)?;
                let n = self.length(key)?;
                let least = match inner {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 | 9 => 8,
                    other => return Err(format!("`{key}` has unknown element type {other}")),
                };
                if n.saturating_mul(least) > self.remaining() {
                    return Err(format!(
                        "`{key}` claims {n} elements but only {} bytes are left in the file",
                        self.remaining()
                    ));
                }
                *memory =
                    memory.saturating_add(n.saturating_mul(std::mem::size_of::<Value>() as u64));
                if *memory > MAX_METADATA_BYTES {
                    return Err(format!(
                        "`{key}` ({n} elements) would take more than {} MiB in memory",
                        MAX_METADATA_BYTES >> 20
                    ));
                }
                match inner {
                    8 | 9 => {
                        for _ in 0..n {
                            self.value(inner, key, depth + 1, memory)?;
                            if *memory > MAX_METADATA_BYTES {
                                return Err(format!(
                                    "`{key}` would take more than {} MiB in memory",
                                    MAX_METADATA_BYTES >> 20
                                ));
                            }
                        }
                        Ok(())
                    }
                    _ => self.skip(n * least, key),
                }
            }
            other => Err(format!("`{key}` has unknown value type {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version-3 header with the given metadata and tensor-info bytes.
    fn header(kv: &[u8], n_kv: u64, tensors: &[u8], n_tensors: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(0x4655_4747u32.to_le_bytes());
        b.extend(3u32.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b.extend(kv);
        b.extend(tensors);
        b
    }

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend(s.as_bytes());
        b
    }

    fn tensor(name: &str, dims: &[u64], dtype: u32, offset: u64) -> Vec<u8> {
        let mut b = string(name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(dtype.to_le_bytes());
        b.extend(offset.to_le_bytes());
        b
    }

    fn check(bytes: &[u8]) -> Result<GgufSummary, String> {
        check_gguf(&mut std::io::Cursor::new(bytes), bytes.len() as u64)
    }

    #[test]
    fn a_consistent_header_passes_and_reports_the_data_offset() {
        let mut b = header(&[], 0, &tensor("w", &[4, 2], 0, 0), 1);
        let data_offset = b.len().div_ceil(32) * 32;
        b.resize(data_offset + 32, 0);
        let s = check(&b).unwrap();
        assert_eq!(s.data_offset, data_offset as u64);
        b.truncate(data_offset + 31);
        assert!(check(&b).unwrap_err().contains("run past the end"));
    }

    #[test]
    fn absurd_headers_are_rejected_by_name() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (header(&[], u64::MAX, &[], 0), "more than the"),
            (header(&[], 0, &[], 1 << 40), "more than the"),
            (
                header(
                    &[
                        string("k"),
                        8u32.to_le_bytes().to_vec(),
                        (1u64 << 40).to_le_bytes().to_vec(),
                    ]
                    .concat(),
                    1,
                    &[],
                    0,
                ),
                "`k` claims",
            ),
            (
                header(
                    &[
                        string("a"),
                        9u32.to_le_bytes().to_vec(),
                        0u32.to_le_bytes().to_vec(),
                        (1u64 << 40).to_le_bytes().to_vec(),
                    ]
                    .concat(),
                    1,
                    &[],
                    0,
                ),
                "`a` claims",
            ),
            (
                header(
                    &[
                        string("general.alignment"),
                        4u32.to_le_bytes().to_vec(),
                        0u32.to_le_bytes().to_vec(),
                    ]
                    .concat(),
                    1,
                    &[],
                    0,
                ),
                "power of two",
            ),
            (header(&[], 0, &tensor("w", &[1 << 32, 1 << 32, 1 << 32], 0, 0), 1), "overflows"),
            (header(&[], 0, &tensor("w", &[32], 99, 0), 1), "unknown GGML type 99"),
            (header(&[], 0, &tensor("w", &[33], 2, 0), 1), "block size"),
            (header(&[], 0, &tensor("w", &[1; 5], 0, 0), 1), "5 dimensions"),
            (header(&[], 0, &tensor("w", &[1 << 30, 1 << 20], 0, 0), 1), "`w`"),
            (header(&[], 0, &tensor("w", &[1], 0, u64::MAX - 1), 1), "`w`"),
            (b"GGML\0\0\0\0".to_vec(), "not a GGUF"),
        ];
        for (i, (bytes, expected)) in cases.iter().enumerate() {
            let err = check(bytes).expect_err(&format!("case {i} passed"));
            assert!(err.contains(expected), "case {i}: {err}");
        }
    }

    #[test]
    fn byte_arrays_are_charged_for_the_values_candle_builds() {
        // 16 MB of u8 elements would become 512 MB of `Value`s.
        let n = 16u64 << 20;
        let mut kv =
            [string("big"), 9u32.to_le_bytes().to_vec(), 0u32.to_le_bytes().to_vec()].concat();
        kv.extend(n.to_le_bytes());
        let mut b = header(&kv, 1, &[], 0);
        b.resize(b.len() + n as usize, 0);
        assert!(check(&b).unwrap_err().contains("MiB in memory"));
    }
}
