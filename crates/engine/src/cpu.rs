//! CPU features of the hand-written x86-64 kernels, checked at run time.

/// AVX2 with FMA and F16C: what the AVX2 weight kernel and the fused decode attention are
/// compiled for.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma_f16c() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// AVX-512F besides AVX2, FMA and F16C: what the 512-bit fused decode attention needs.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512f() -> bool {
    has_avx2_fma_f16c() && is_x86_feature_detected!("avx512f")
}
