//! Which instruction set the hand-written kernels dispatch to: what the CPU has, capped by
//! `KVMERGER_KERNEL_LEVEL`, and what those kernels share.
//!
//! The cap lets one machine run the paths other CPUs take: on a machine with AVX-512,
//! `KVMERGER_KERNEL_LEVEL=avx2` runs the AVX2 kernels and `=portable` the plain Rust ones.
//! It is read once, at the first kernel call, and holds for the whole process. It caps this
//! crate's kernels only: candle's own f32 matrix products (the `f32` weight format) pick
//! their SIMD at run time by themselves.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// The environment variable that caps the kernel level.
pub const KERNEL_LEVEL_ENV: &str = "KVMERGER_KERNEL_LEVEL";

/// The instruction sets the hand-written kernels are written for, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelLevel {
    /// Plain Rust, on any CPU and architecture: the reference every SIMD kernel is tested
    /// against.
    Portable,
    /// x86-64 with AVX2, FMA and F16C (and AVX-VNNI's 256-bit byte products where present).
    Avx2,
    /// AVX-512F besides those (and AVX-512 BW + VNNI for the weight kernels where present).
    Avx512,
}

impl KernelLevel {
    /// Every level, lowest first.
    pub const ALL: [KernelLevel; 3] =
        [KernelLevel::Portable, KernelLevel::Avx2, KernelLevel::Avx512];

    /// The level's name, as `KVMERGER_KERNEL_LEVEL` takes it.
    pub fn name(self) -> &'static str {
        match self {
            KernelLevel::Portable => "portable",
            KernelLevel::Avx2 => "avx2",
            KernelLevel::Avx512 => "avx512",
        }
    }

    /// The highest level this CPU runs.
    pub fn detected() -> KernelLevel {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return KernelLevel::Avx512;
            }
            if avx2 {
                return KernelLevel::Avx2;
            }
        }
        KernelLevel::Portable
    }

    /// The level the kernels run at in this process: the CPU's, capped by
    /// `KVMERGER_KERNEL_LEVEL` where that is set. A value that names no level counts as
    /// unset here; [`KernelLevel::cap_from_env`] reports it, and the command-line tool
    /// refuses it before any kernel runs.
    pub fn active() -> KernelLevel {
        static ACTIVE: OnceLock<KernelLevel> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let cap = KernelLevel::cap_from_env().ok().flatten();
            cap.map_or(KernelLevel::detected(), |cap| cap.min(KernelLevel::detected()))
        })
    }

    /// The cap `KVMERGER_KERNEL_LEVEL` sets, if it is set.
    pub fn cap_from_env() -> Result<Option<KernelLevel>, UnknownKernelLevel> {
        match std::env::var(KERNEL_LEVEL_ENV) {
            Ok(value) if !value.trim().is_empty() => value.parse().map(Some),
            _ => Ok(None),
        }
    }

    /// Every level this CPU runs, lowest first.
    pub fn supported() -> Vec<KernelLevel> {
        let top = KernelLevel::detected();
        KernelLevel::ALL.into_iter().filter(|&level| level <= top).collect()
    }
}

impl fmt::Display for KernelLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `KVMERGER_KERNEL_LEVEL` value that names no level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{KERNEL_LEVEL_ENV}={0:?} names no kernel level (portable, avx2 or avx512)")]
pub struct UnknownKernelLevel(pub String);

impl FromStr for KernelLevel {
    type Err = UnknownKernelLevel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        KernelLevel::ALL
            .into_iter()
            .find(|level| level.name() == wanted)
            .ok_or_else(|| UnknownKernelLevel(s.to_string()))
    }
}

/// What the kernels run on here, for `--verbose` and `bench`: the active level, the CPU's
/// own and the optional extensions the active level uses.
pub fn kernel_report() -> String {
    let (active, detected) = (KernelLevel::active(), KernelLevel::detected());
    let extras = optional_extensions();
    let capped = if active < detected {
        format!(" (capped; the CPU runs {detected})")
    } else {
        String::new()
    };
    let extras =
        if extras.is_empty() { String::new() } else { format!(" with {}", extras.join(", ")) };
    format!("kernels: {active}{extras}{capped}")
}

/// The optional extensions the active level uses on this CPU.
fn optional_extensions() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let used = [(has_avx_vnni(), "avx-vnni"), (has_avx512_vnni(), "avx512-bw+vnni")];
        used.into_iter().filter(|&(has, _)| has).map(|(_, name)| name).collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// AVX2 with FMA and F16C at the active level: what the AVX2 weight kernel and the fused
/// decode attention are compiled for.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma_f16c() -> bool {
    KernelLevel::active() >= KernelLevel::Avx2
}

/// AVX-VNNI (256-bit `vpdpbusd`) besides AVX2, at the active level.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx_vnni() -> bool {
    has_avx2_fma_f16c() && is_x86_feature_detected!("avxvnni")
}

/// AVX-512F besides AVX2, FMA and F16C, at the active level: what the 512-bit fused decode
/// attention and the elementwise kernels need, and what the AVX-512 weight kernels need
/// besides BW and VNNI.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512f() -> bool {
    KernelLevel::active() >= KernelLevel::Avx512
}

/// AVX-512 BW and VNNI besides AVX-512F, at the active level: the 512-bit weight kernels.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512_vnni() -> bool {
    has_avx512f() && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_by_name_and_refuse_others() {
        for level in KernelLevel::ALL {
            assert_eq!(level.name().parse::<KernelLevel>(), Ok(level));
            assert_eq!(level.name().to_uppercase().parse::<KernelLevel>(), Ok(level));
        }
        let err = "sse4".parse::<KernelLevel>().unwrap_err();
        assert!(err.to_string().contains("KVMERGER_KERNEL_LEVEL=\"sse4\""), "{err}");
    }

    #[test]
    fn the_active_level_never_exceeds_the_cpus_or_the_cap() {
        let active = KernelLevel::active();
        assert!(active <= KernelLevel::detected());
        if let Ok(Some(cap)) = KernelLevel::cap_from_env() {
            assert!(active <= cap, "{active} above the cap {cap}");
        }
        assert!(KernelLevel::supported().contains(&active));
        assert_eq!(KernelLevel::supported()[0], KernelLevel::Portable);
    }
}
