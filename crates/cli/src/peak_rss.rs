//! The process's peak resident memory, as the kernel records it: what a run's weights,
//! cache and scratch buffers took together at their worst, not just what the KV cache
//! accounts for.

/// Peak resident set size of this process in bytes (`VmHWM` in `/proc/self/status`, the
/// kernel's own high-water mark, so no sample can miss the peak); `None` where the file
/// is missing or unreadable (not Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM")
}

/// A memory figure of this process's `/proc/self/status` (`VmHWM`, `VmRSS`, ...) in bytes;
/// `None` where the file or the field is missing or unreadable.
pub fn status_bytes(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status").ok().and_then(|s| parse_status_bytes(&s, field))
}

/// The `field:` line's value (in kB) as bytes.
fn parse_status_bytes(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    let kib = line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_high_water_mark_in_bytes() {
        let status = "Name:\tkvmerger\nVmPeak:\t  900 kB\nVmHWM:\t    1234 kB\nVmRSS:\t  1000 kB\n";
        assert_eq!(parse_status_bytes(status, "VmHWM"), Some(1234 * 1024));
        assert_eq!(parse_status_bytes(status, "VmRSS"), Some(1000 * 1024));
        assert_eq!(parse_status_bytes("VmRSS:\t1000 kB\n", "VmHWM"), None);
        assert_eq!(parse_status_bytes("VmHWM:\tmany kB\n", "VmHWM"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_peak_grows_with_touched_memory() {
        let before = peak_rss_bytes().expect("Linux has /proc/self/status");
        // 64 MiB written (not just allocated) is resident at once.
        let block = vec![1u8; 64 << 20];
        let after = peak_rss_bytes().unwrap();
        assert!(block.iter().step_by(4096).all(|&b| b == 1));
        assert!(after >= before.max(64 << 20), "{before} -> {after}");
    }
}
