//! A token bucket: how many frames a socket may send, sustained and in a
//! burst. The gateway paces each client with it (it stops reading); the
//! worker checks each socket against its own limit with it (it closes).

use std::time::Duration;

use tokio::time::Instant;

/// Token bucket for one socket's inbound frames.
pub struct RateLimit {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl RateLimit {
    /// Starts full: a burst is allowed at once.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        RateLimit {
            per_sec: per_sec.into(),
            burst: burst.into(),
            tokens: burst.into(),
            updated: Instant::now(),
        }
    }

    /// When the next frame may be taken, or `None` if now.
    pub fn wait_until(&mut self) -> Option<Instant> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.updated).as_secs_f64() * self.per_sec)
            .min(self.burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            None
        } else {
            Some(now + Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }

    /// Takes one frame's token (after [`RateLimit::wait_until`] said now).
    pub fn take(&mut self) {
        self.tokens -= 1.0;
    }

    /// Takes a token if one is there; false when over the limit.
    pub fn try_take(&mut self) -> bool {
        if self.wait_until().is_some() {
            return false;
        }
        self.take();
        true
    }
}
