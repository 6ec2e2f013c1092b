//! How much to ask of the next read from a plain TCP socket, for the splices that copy a
//! tunnel stream to and from a local TCP connection (the agent's target, the user's program).

/// The size of the next TCP read, adapted to the traffic.
///
/// A read that fills its buffer doubles the next one, up to `max`: bulk transfers then cost
/// fewer reads, DATA frames, TLS sends and wake-ups per byte. A read that fills less than a
/// quarter of its buffer goes back to `min`: an interactive or idle connection keeps a small
/// buffer, which matters because the buffer is handed to the kernel with the read and waits
/// there, possibly for hours, for the next byte.
#[derive(Debug, Clone, Copy)]
pub struct ReadSize {
    next: usize,
    min: usize,
    max: usize,
}

impl ReadSize {
    /// Starts at `min`; never asks for more than `max` (at least `min`).
    pub const fn new(min: usize, max: usize) -> Self {
        let max = if max < min { min } else { max };
        ReadSize {
            next: min,
            min,
            max,
        }
    }

    /// Bytes to ask of the next read.
    pub fn next(&self) -> usize {
        self.next
    }

    /// Records that a read of `asked` bytes returned `got`.
    pub fn record(&mut self, asked: usize, got: usize) {
        if got >= asked {
            self.next = asked.saturating_mul(2).clamp(self.min, self.max);
        } else if got < asked / 4 {
            self.next = self.min;
        }
    }

    /// Whether `got` bytes from a read of `asked` are few enough to travel as a right-sized
    /// copy: the stream keeps what it sends until the peer acknowledges it, and a keystroke
    /// must not pin a whole read buffer meanwhile.
    pub fn worth_copying(asked: usize, got: usize) -> bool {
        got < asked / 4
    }
}

#[cfg(test)]
mod tests {
    use super::ReadSize;

    #[test]
    fn grows_on_full_reads_and_falls_back_on_short_ones() {
        let mut r = ReadSize::new(64 << 10, 256 << 10);
        assert_eq!(r.next(), 64 << 10);
        r.record(64 << 10, 64 << 10);
        assert_eq!(r.next(), 128 << 10);
        r.record(128 << 10, 128 << 10);
        r.record(256 << 10, 256 << 10);
        assert_eq!(r.next(), 256 << 10, "capped at max");
        r.record(256 << 10, 100 << 10);
        assert_eq!(r.next(), 256 << 10, "a half-full read keeps the size");
        r.record(256 << 10, 10);
        assert_eq!(r.next(), 64 << 10, "a short read goes back to min");
    }

    #[test]
    fn copies_only_small_reads() {
        assert!(ReadSize::worth_copying(256 << 10, (64 << 10) - 1));
        assert!(!ReadSize::worth_copying(256 << 10, 64 << 10));
    }
}
