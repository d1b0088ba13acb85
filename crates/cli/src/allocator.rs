//! The process's allocator policy: scratch buffers of a megabyte or more go back to the
//! system when freed, so that peak memory follows what is live.
//!
//! glibc serves a block above its mmap threshold (128 KiB at start) from a mapping of its
//! own, unmapped on free, but raises the threshold to the size of every such block freed, up
//! to 32 MiB. After the first prefill chunk, the engine's scratch (attention probabilities,
//! widened cache rows, activations, the heads a compression rebuilds: 1 to 32 MiB each, in
//! sizes that change from chunk to chunk) is then carved from the heap, whose freed holes
//! stay resident, and the process's resident set ratchets up with every chunk and
//! compression of a long prompt. A fixed threshold stops the ratchet: Qwen2.5-Coder-0.5B on
//! a 16,384-token prompt, KVMerger at 25% compressing every chunk of 1,024, peaked at
//! 792 MiB with the dynamic threshold and 719 MiB with it fixed (docs/long-context.md).

/// Blocks at least this large get their own mapping: glibc's initial threshold, kept fixed.
pub const MMAP_THRESHOLD_BYTES: usize = 128 * 1024;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD_BYTES`]; true when the allocator took
/// it. Elsewhere (another C library, another system) there is nothing to set: false.
pub fn return_large_blocks_when_freed() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only sets one of glibc's tuning parameters, under the allocator's
        // own lock, so it is sound at any time and from any thread.
        let set = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES as i32) };
        set == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;
    use crate::peak_rss::status_bytes;

    fn resident_bytes() -> u64 {
        status_bytes("VmRSS").expect("Linux reports VmRSS")
    }

    /// Under the policy, freeing every other one of many 4 MiB blocks gives their memory
    /// back although blocks on both sides stay live. With glibc's dynamic threshold (raised
    /// to 8 MiB here by the first block freed) they would be holes in the heap, still
    /// resident.
    #[test]
    fn freed_blocks_between_live_ones_leave_the_resident_set() {
        assert!(return_large_blocks_when_freed());
        drop(std::hint::black_box(vec![1u8; 8 << 20]));
        const BLOCK: usize = 4 << 20;
        let mut blocks: Vec<Option<Vec<u8>>> =
            (0..32).map(|i| Some(std::hint::black_box(vec![i as u8 + 1; BLOCK]))).collect();
        let before = resident_bytes();
        blocks.iter_mut().step_by(2).for_each(|b| *b = None);
        let released = before.saturating_sub(resident_bytes());
        let freed = 16 * BLOCK as u64;
        assert!(released >= freed * 3 / 4, "released {released} of {freed} bytes freed");
        drop(blocks);
    }
}
