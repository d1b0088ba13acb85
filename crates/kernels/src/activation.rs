//! The MLP activation of the decode path, `SiLU(gate) * up`, over plain buffers: on 16 lanes
//! where the CPU has AVX-512 (an `exp` polynomial within a few ulp of the C library's),
//! elementwise otherwise. Each element depends on its own inputs only, so a sequence's rows
//! give the same values alone or batched. Gemma's GELU runs elementwise.

/// `gate[i] = GELU(gate[i]) * up[i]` with the tanh approximation
/// `GELU(g) = g/2 (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))` (Gemma; candle's `gelu`).
pub fn gelu_tanh_product(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up have the same width");
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    gate.iter_mut().zip(up).for_each(|(g, u)| {
        let inner = SQRT_2_OVER_PI * (*g + 0.044_715 * *g * *g * *g);
        *g = 0.5 * *g * (1.0 + inner.tanh()) * u;
    });
}

/// `gate[i] = SiLU(gate[i]) * up[i]`, with `SiLU(g) = g / (1 + exp(-g))`.
pub fn silu_product(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up have the same width");
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512f() {
        // SAFETY: the CPU features were checked; the lengths are equal.
        unsafe { avx512::silu_product(gate, up) };
        return;
    }
    silu_product_scalar(gate, up);
}

fn silu_product_scalar(gate: &mut [f32], up: &[f32]) {
    gate.iter_mut().zip(up).for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX-512F and FMA; `gate` and `up` are of equal length.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn silu_product(gate: &mut [f32], up: &[f32]) {
        let one = _mm512_set1_ps(1.0);
        for at in (0..gate.len()).step_by(16) {
            // `mask` keeps the lanes `at..len`: every masked access stays inside the slices.
            let mask = ((1u32 << (gate.len() - at).min(16)) - 1) as u16;
            // SAFETY: `at < gate.len() == up.len()`, and the mask reads only lanes below the end.
            let g = unsafe { _mm512_maskz_loadu_ps(mask, gate.as_ptr().add(at)) };
            // SAFETY: as for `g`.
            let u = unsafe { _mm512_maskz_loadu_ps(mask, up.as_ptr().add(at)) };
            let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let y = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u);
            // SAFETY: as for `g`; the mask writes only lanes below the end.
            unsafe { _mm512_mask_storeu_ps(gate.as_mut_ptr().add(at), mask, y) };
        }
    }

    /// `exp(x)` as Cephes' `expf`: `x = n ln 2 + r` (`ln 2` in two parts), a degree-5
    /// polynomial for `exp(r)`, scaled by `2^n`. Inputs are clamped to the finite range.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    fn exp(x: __m512) -> __m512 {
        let x =
            _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.336_55)), _mm512_set1_ps(88.722_83));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_scalef_ps(y, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorized product against the elementwise one over the whole useful range (and
    /// past it, where SiLU is 0 or `g`), at widths that leave a partial last vector. Cross-path
    /// (a polynomial `exp` against the C library's): bounded by 4 ulp.
    #[test]
    fn silu_product_matches_the_elementwise_definition() {
        for width in [1, 16, 37, 1536] {
            let gate: Vec<f32> = (0..width).map(|i| (i as f32 * 0.731).sin() * 30.0).collect();
            let mut gate =
                [gate, vec![-120.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 95.0]].concat();
            let up: Vec<f32> = (0..gate.len()).map(|i| 1.0 + (i % 7) as f32 * 0.5).collect();
            let mut expected = gate.clone();
            silu_product_scalar(&mut expected, &up);
            silu_product(&mut gate, &up);
            for (i, (&got, &want)) in gate.iter().zip(&expected).enumerate() {
                let tol = 4.0 * f32::EPSILON * want.abs() + 1e-30;
                assert!((got - want).abs() <= tol, "element {i}: {got} vs {want}");
            }
        }
    }
}
