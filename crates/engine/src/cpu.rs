//! CPU features of the hand-written x86-64 kernels, checked at run time, and what those
//! kernels share.

/// AVX2 with FMA and F16C: what the AVX2 weight kernel and the fused decode attention are
/// compiled for.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma_f16c() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// AVX-512F besides AVX2, FMA and F16C: what the 512-bit fused decode attention and the
/// elementwise kernels need, and what the AVX-512 weight kernels need besides BW and VNNI.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512f() -> bool {
    has_avx2_fma_f16c() && is_x86_feature_detected!("avx512f")
}

/// Asks for the cache lines of the `bytes` bytes from `at` to be brought into L1. A prefetch
/// never faults, so the range may run past the memory it is meant for.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn prefetch(at: *const u8, bytes: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch reads nothing and never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(line).cast()) };
    }
}
