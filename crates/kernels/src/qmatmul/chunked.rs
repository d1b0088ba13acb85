//! The weight layout the AVX2 kernels read for the 32-value block formats (Q4_0, Q4_1, Q5_0,
//! Q8_0): within each row, every run of 8 blocks (a chunk, as the kernels take them) is
//! rearranged so that what the kernel needs comes in whole vectors, in the same bytes.
//!
//! In GGUF's layout a block's scale sits at its own start, so the 8 scales of a chunk take
//! 8 separate loads, and a 4-bit block's 32 values sit in 16 bytes (two 128-bit halves to
//! join) with Q5_0's fifth bits in a 32-bit word that takes five instructions to spread over
//! 32 bytes. Rearranged, a chunk of 8 blocks holds, in order:
//! - the 8 scales `d` (f16), then Q4_1's 8 offsets `m`: one load and one conversion each;
//! - Q5_0: 32 bytes of fifth bits, bit `b` of byte `l` being block `b`'s fifth bit of value
//!   `l`: a shift and an AND give a block's 32 fifth bits;
//! - 4-bit values: four 32-byte vectors, vector `p` holding blocks `2p` (low nibbles) and
//!   `2p + 1` (high nibbles), value `l` in byte `l`: an AND, or a shift and an AND, give a
//!   block's 32 values;
//! - Q8_0: the 8 blocks' 32 values in turn.
//!
//! A row's last `nb % 8` blocks stay as GGUF stores them. Rows stay whole and in order, so
//! any run of rows is still a run of bytes.

use super::QuantKind;

/// Blocks per chunk.
pub(super) const BLOCKS: usize = 8;

/// Whether the layout exists for `kind` (the 32-value block formats).
pub(super) fn reads(kind: QuantKind) -> bool {
    matches!(kind, QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q5_0 | QuantKind::Q8_0)
}

/// Bytes of a block's f16 scale fields (`d`, and Q4_1's `m`), which lead it in GGUF.
const fn head_bytes(kind: QuantKind) -> usize {
    if matches!(kind, QuantKind::Q4_1) {
        4
    } else {
        2
    }
}

/// Where a rearranged chunk's fifth bits start (Q5_0), and its values.
pub(super) const fn fifth_at(kind: QuantKind) -> usize {
    BLOCKS * head_bytes(kind)
}

pub(super) const fn values_at(kind: QuantKind) -> usize {
    fifth_at(kind) + if matches!(kind, QuantKind::Q5_0) { 32 } else { 0 }
}

/// Rows of `nb` blocks of `kind` from GGUF's layout to the rearranged one (`to_chunks`), or
/// back.
pub(super) fn rearrange(kind: QuantKind, nb: usize, from: &[u8], to_chunks: bool) -> Vec<u8> {
    let bb = kind.block_bytes();
    let mut to = from.to_vec();
    for (from, to) in from.chunks_exact(nb * bb).zip(to.chunks_exact_mut(nb * bb)) {
        let whole = nb / BLOCKS * BLOCKS * bb;
        let pairs =
            from[..whole].chunks_exact(BLOCKS * bb).zip(to[..whole].chunks_exact_mut(BLOCKS * bb));
        for (from, to) in pairs {
            if to_chunks {
                pack(kind, from, to)
            } else {
                unpack(kind, from, to)
            }
        }
    }
    to
}

/// The offset in a GGUF block of `kind` of the byte holding value `l`'s low bits, and their
/// shift there (4-bit formats: values 0..16 in the low nibbles, 16..32 in the high ones).
fn value_bits(kind: QuantKind, l: usize) -> (usize, u32) {
    let start = match kind {
        QuantKind::Q4_0 => 2,
        QuantKind::Q4_1 => 4,
        QuantKind::Q5_0 => 6,
        _ => unreachable!("4-bit values only"),
    };
    (start + l % 16, 4 * (l / 16) as u32)
}

/// One chunk of 8 GGUF blocks (`plain`) into the rearranged layout (`packed`).
fn pack(kind: QuantKind, plain: &[u8], packed: &mut [u8]) {
    let bb = kind.block_bytes();
    packed.fill(0);
    for b in 0..BLOCKS {
        let block = &plain[b * bb..(b + 1) * bb];
        for k in 0..head_bytes(kind) / 2 {
            packed[2 * (BLOCKS * k + b)..][..2].copy_from_slice(&block[2 * k..2 * k + 2]);
        }
        let values = &mut packed[values_at(kind)..];
        if kind == QuantKind::Q8_0 {
            values[32 * b..32 * (b + 1)].copy_from_slice(&block[2..34]);
            continue;
        }
        for l in 0..32 {
            let (at, shift) = value_bits(kind, l);
            values[32 * (b / 2) + l] |= ((block[at] >> shift) & 0x0f) << (4 * (b % 2));
        }
        if kind == QuantKind::Q5_0 {
            let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            for l in 0..32 {
                packed[fifth_at(kind) + l] |= (((high >> l) & 1) as u8) << b;
            }
        }
    }
}

/// The rearranged chunk `packed` back into 8 GGUF blocks (`plain`).
fn unpack(kind: QuantKind, packed: &[u8], plain: &mut [u8]) {
    let bb = kind.block_bytes();
    plain.fill(0);
    for b in 0..BLOCKS {
        let block = &mut plain[b * bb..(b + 1) * bb];
        for k in 0..head_bytes(kind) / 2 {
            block[2 * k..2 * k + 2].copy_from_slice(&packed[2 * (BLOCKS * k + b)..][..2]);
        }
        let values = &packed[values_at(kind)..];
        if kind == QuantKind::Q8_0 {
            block[2..34].copy_from_slice(&values[32 * b..32 * (b + 1)]);
            continue;
        }
        for l in 0..32 {
            let (at, shift) = value_bits(kind, l);
            block[at] |= ((values[32 * (b / 2) + l] >> (4 * (b % 2))) & 0x0f) << shift;
        }
        if kind == QuantKind::Q5_0 {
            let high = (0..32).fold(0u32, |word, l| {
                word | ((((packed[fifth_at(kind) + l] >> b) & 1) as u32) << l)
            });
            block[2..6].copy_from_slice(&high.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rearranging and back gives every byte again, for every kind, with and without a
    /// row's last partial chunk; the rearranged bytes differ (the layout is not a copy) and
    /// keep the row's partial chunk as it was.
    #[test]
    fn rearranging_round_trips() {
        for kind in QuantKind::ALL.into_iter().filter(|&k| reads(k)) {
            for nb in [8, 28, 3, 17] {
                let bytes: Vec<u8> = (0..3 * nb * kind.block_bytes())
                    .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8)
                    .collect();
                let chunked = rearrange(kind, nb, &bytes, true);
                assert_eq!(rearrange(kind, nb, &chunked, false), bytes, "{kind:?} nb {nb}");
                assert_eq!(chunked.len(), bytes.len());
                let row = nb * kind.block_bytes();
                let tail = nb / BLOCKS * BLOCKS * kind.block_bytes();
                assert_eq!(chunked[tail..row], bytes[tail..row], "{kind:?}: the tail stays");
                assert_eq!(chunked[..tail] == bytes[..tail], tail == 0, "{kind:?}");
            }
        }
    }
}
