//! Stored key and value rows loaded straight into f32 vector registers, for the fused decode
//! kernels: f32 as is, f16 through F16C, and q8_0 and q4_0 blocks dequantized in the
//! register (the bytes or nibbles widened, offset and multiplied by the block's scale), so
//! a quantized cache is read at its own size with no dequantized copy in memory.

use std::arch::x86_64::*;

use half::f16;

use crate::kv_blocks::{BlockQ4_0, BlockQ8_0, BLOCK_ELEMENTS};

/// A stored type whose consecutive elements load as f32 lanes. Elements are numbered
/// across units: element `i` of a slice of blocks is element `i % 32` of block `i / 32`.
pub(crate) trait Lanes: Copy {
    /// Elements a unit holds: 1, or a block's 32.
    const ELEMENTS: usize;

    /// Elements `index..index + 8` of the units from `base`, as f32.
    ///
    /// # Safety
    /// `index` is a multiple of 8; those elements are readable; the CPU has AVX2 and F16C.
    unsafe fn load8(base: *const Self, index: usize) -> __m256;

    /// Elements `index..index + 16` of the units from `base`, as f32.
    ///
    /// # Safety
    /// `index` is a multiple of 16; those elements are readable; the CPU has AVX-512F.
    unsafe fn load16(base: *const Self, index: usize) -> __m512;

    /// Elements held by `units`.
    fn elements(units: &[Self]) -> usize {
        units.len() * Self::ELEMENTS
    }

    /// The address of the unit holding element `index` (for prefetching; never read).
    fn address_of(base: *const Self, index: usize) -> *const u8 {
        base.wrapping_add(index / Self::ELEMENTS).cast()
    }
}

impl Lanes for f32 {
    const ELEMENTS: usize = 1;
    #[inline(always)]
    unsafe fn load8(base: *const Self, index: usize) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { _mm256_loadu_ps(base.add(index)) }
    }
    #[inline(always)]
    unsafe fn load16(base: *const Self, index: usize) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe { _mm512_loadu_ps(base.add(index)) }
    }
}

impl Lanes for f16 {
    const ELEMENTS: usize = 1;
    #[inline(always)]
    unsafe fn load8(base: *const Self, index: usize) -> __m256 {
        // SAFETY: the caller's contract; 8 f16 are 16 bytes.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(base.add(index).cast())) }
    }
    #[inline(always)]
    unsafe fn load16(base: *const Self, index: usize) -> __m512 {
        // SAFETY: the caller's contract; 16 f16 are 32 bytes.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(base.add(index).cast())) }
    }
}

/// A block's f16 scale in every lane.
///
/// # Safety
/// The CPU has AVX and F16C.
#[inline(always)]
unsafe fn scale8(scale: f16) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe { _mm256_cvtph_ps(_mm_set1_epi16(scale.to_bits() as i16)) }
}

/// A block's f16 scale in every lane of a 512-bit vector.
///
/// # Safety
/// The CPU has AVX-512F.
#[inline(always)]
unsafe fn scale16(scale: f16) -> __m512 {
    // SAFETY: the caller's contract.
    unsafe { _mm512_cvtph_ps(_mm256_set1_epi16(scale.to_bits() as i16)) }
}

impl Lanes for BlockQ8_0 {
    const ELEMENTS: usize = BLOCK_ELEMENTS;
    #[inline(always)]
    unsafe fn load8(base: *const Self, index: usize) -> __m256 {
        // SAFETY: the caller's contract: the block is readable and the 8 elements from
        // `index % 32` (a multiple of 8) lie inside it.
        unsafe {
            let block = &*base.add(index / BLOCK_ELEMENTS);
            let bytes = _mm_loadl_epi64(block.quants.as_ptr().add(index % BLOCK_ELEMENTS).cast());
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), scale8(block.scale))
        }
    }
    #[inline(always)]
    unsafe fn load16(base: *const Self, index: usize) -> __m512 {
        // SAFETY: as above, 16 elements (16 bytes) from a multiple of 16.
        unsafe {
            let block = &*base.add(index / BLOCK_ELEMENTS);
            let bytes = _mm_loadu_si128(block.quants.as_ptr().add(index % BLOCK_ELEMENTS).cast());
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), scale16(block.scale))
        }
    }
}

impl Lanes for BlockQ4_0 {
    const ELEMENTS: usize = BLOCK_ELEMENTS;
    /// Elements 0-15 of a block are the low nibbles of its 16 bytes, 16-31 the high ones.
    #[inline(always)]
    unsafe fn load8(base: *const Self, index: usize) -> __m256 {
        const HALF: usize = BLOCK_ELEMENTS / 2;
        let offset = index % BLOCK_ELEMENTS;
        // SAFETY: the caller's contract: the block is readable; bytes `offset % 16` onwards
        // (8 of them, a multiple of 8 below 16) lie inside its 16.
        unsafe {
            let block = &*base.add(index / BLOCK_ELEMENTS);
            let bytes = _mm_loadl_epi64(block.quants.as_ptr().add(offset % HALF).cast());
            let bytes = if offset >= HALF { _mm_srli_epi16::<4>(bytes) } else { bytes };
            let nibbles = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
            let levels = _mm256_sub_epi32(_mm256_cvtepu8_epi32(nibbles), _mm256_set1_epi32(8));
            _mm256_mul_ps(_mm256_cvtepi32_ps(levels), scale8(block.scale))
        }
    }
    #[inline(always)]
    unsafe fn load16(base: *const Self, index: usize) -> __m512 {
        // SAFETY: as above: all 16 bytes, low nibbles for elements 0-15, high for 16-31.
        unsafe {
            let block = &*base.add(index / BLOCK_ELEMENTS);
            let bytes = _mm_loadu_si128(block.quants.as_ptr().cast());
            let bytes =
                if index % BLOCK_ELEMENTS >= 16 { _mm_srli_epi16::<4>(bytes) } else { bytes };
            let nibbles = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
            let levels = _mm512_sub_epi32(_mm512_cvtepu8_epi32(nibbles), _mm512_set1_epi32(8));
            _mm512_mul_ps(_mm512_cvtepi32_ps(levels), scale16(block.scale))
        }
    }
}
