//! How the C allocator treats the receive buffers that carry bulk data.
//!
//! A TLS read of bulk data hands its whole receive buffer (about 300 KiB) to the caller
//! (`tls`), which frees it once the frames in it are forwarded, so a busy connection allocates
//! and frees one such buffer per read. glibc's defaults then return the top of the heap to the
//! kernel whenever more than twice the last freed large chunk is free there, and take it back
//! on the next allocation: every read paid for `brk`, page faults and zeroed pages (12 % of
//! the `remoteler forward` process's CPU in a download, in `perf`).

/// Heap memory glibc keeps before giving the top of the heap back to the kernel: a dozen
/// receive buffers. What an idle process holds beyond its live allocations is at most this.
pub const TRIM_THRESHOLD: i32 = 4 << 20;

/// Allocations from this size up are separate `mmap`s; receive buffers stay well below it.
pub const MMAP_THRESHOLD: i32 = 1 << 20;

/// Sets glibc's trim and mmap thresholds (see the module docs). Call once, first thing in
/// `main`; does nothing with other C libraries.
pub fn tune_for_receive_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; it is called before any thread
    // starts, and invalid values are refused by glibc (it returns 0) rather than acted on.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
