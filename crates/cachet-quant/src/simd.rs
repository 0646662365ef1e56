//! Which SIMD kernels the 4-bit quantize, dequantize and gemv run: AVX-512F, else AVX2+FMA, else
//! the portable loops. [`SimdLevel::current`] is the best level the CPU has, capped by
//! [`SimdLevel::force`] or, read once at first use, by `CACHET_SIMD=avx512|avx2|portable`
//! (benchmarks and tests); a level the CPU lacks falls back to the best one below it.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

/// A family of kernels, ordered from the portable loops up to AVX-512.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Plain Rust loops (any CPU; the semantic reference).
    Portable,
    /// x86-64 AVX2 with FMA (e.g. AMD Zen 2/3, consumer Intel).
    Avx2,
    /// x86-64 AVX-512F.
    Avx512,
}

/// The override: `UNREAD` until the environment has been read, `AUTO` for none, else a level.
static OVERRIDE: AtomicU8 = AtomicU8::new(UNREAD);
const UNREAD: u8 = 0xff;
const AUTO: u8 = 0;

impl SimdLevel {
    /// Every level, best first.
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Avx512, SimdLevel::Avx2, SimdLevel::Portable];

    /// The name `CACHET_SIMD` takes (`avx512`, `avx2`, `portable`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the level's kernels.
    pub fn is_available(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best level this CPU has.
    pub fn detected() -> Self {
        Self::best_up_to(Self::Avx512)
    }

    /// The best available level not above `self`.
    pub(crate) fn best_up_to(self) -> Self {
        Self::ALL
            .into_iter()
            .find(|l| *l <= self && l.is_available())
            .unwrap_or(Self::Portable)
    }

    /// Sets (`Some`) or clears (`None`, back to [`SimdLevel::detected`], ignoring
    /// `CACHET_SIMD`) the process-wide level the kernels use.
    pub fn force(level: Option<Self>) {
        OVERRIDE.store(level.map_or(AUTO, Self::code), Ordering::Relaxed);
    }

    /// The level the kernels run now: the override (or `CACHET_SIMD`, read on the first call),
    /// lowered to the best level this CPU has.
    pub fn current() -> Self {
        let mut code = OVERRIDE.load(Ordering::Relaxed);
        if code == UNREAD {
            let from_env = match std::env::var("CACHET_SIMD") {
                Ok(v) => match v.parse::<Self>() {
                    Ok(level) => level.code(),
                    Err(e) => {
                        tracing::warn!("CACHET_SIMD ignored: {e}");
                        AUTO
                    }
                },
                Err(_) => AUTO,
            };
            // A `force` made meanwhile wins over the environment.
            code = match OVERRIDE.compare_exchange(
                UNREAD,
                from_env,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => from_env,
                Err(now) => now,
            };
        }
        Self::from_code(code).unwrap_or(Self::Avx512).best_up_to()
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.code() == code)
    }
}

impl fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SimdLevel {
    type Err = String;

    /// `avx512`, `avx2` or `portable` (any case, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        Self::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown SIMD level {s:?} (avx512, avx2 or portable)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_order_and_fall_back() {
        for level in SimdLevel::ALL {
            assert_eq!(level.name().parse::<SimdLevel>(), Ok(level));
            assert_eq!(SimdLevel::from_code(level.code()), Some(level));
        }
        assert_eq!(" AVX2 ".parse::<SimdLevel>(), Ok(SimdLevel::Avx2));
        assert!("sse".parse::<SimdLevel>().is_err());
        assert!(SimdLevel::Portable < SimdLevel::Avx2 && SimdLevel::Avx2 < SimdLevel::Avx512);
        let best = SimdLevel::detected();
        assert!(best.is_available() && SimdLevel::Portable.is_available());
        for level in SimdLevel::ALL {
            let got = level.best_up_to();
            assert!(got <= level && got.is_available(), "{level} → {got}");
            if level.is_available() {
                assert_eq!(got, level);
            }
        }
        // Forcing the detected level (or any above it) changes nothing for the tests running
        // beside this one; clearing goes back to the detected level. Skipped when the whole
        // run is pinned with CACHET_SIMD.
        if std::env::var_os("CACHET_SIMD").is_none() {
            let saved = OVERRIDE.load(Ordering::Relaxed);
            SimdLevel::force(Some(SimdLevel::Avx512));
            assert_eq!(SimdLevel::current(), best);
            SimdLevel::force(None);
            assert_eq!(SimdLevel::current(), best);
            OVERRIDE.store(saved, Ordering::Relaxed);
        }
    }
}
