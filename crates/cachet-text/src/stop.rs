//! Stop strings: generation ends when the text contains one, and text that could still turn
//! into one is held back so the stop string itself is never printed.

/// Watches streamed text for any of a set of stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopStrings {
    /// Watches for `stops` (empty strings are ignored).
    pub fn new(stops: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            stops: stops
                .into_iter()
                .map(Into::into)
                .filter(|s: &String| !s.is_empty())
                .collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds new text; returns what can safely be shown now (text before a stop string, minus
    /// any tail that is a prefix of one). After a stop, everything is swallowed.
    pub fn push(&mut self, text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.stopped = true;
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return out;
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for stop in &self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if i > keep && self.pending.ends_with(&stop[..i]) {
                    keep = i;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        out
    }

    /// The text held back, when generation ended without a stop string.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_prefixes_and_cuts_at_the_stop() {
        let mut s = StopStrings::new(["\nUser:", "###"]);
        assert_eq!(s.push("Hello"), "Hello");
        assert_eq!(s.push(" world\nUs"), " world");
        assert_eq!(s.push("eless"), "\nUseless");
        assert_eq!(s.push(" ok #"), " ok ");
        assert_eq!(s.push("## tail"), "");
        assert!(s.stopped());
        assert_eq!(s.push("more"), "");
    }

    #[test]
    fn flushes_what_was_held() {
        let mut s = StopStrings::new(["END"]);
        assert_eq!(s.push("the EN"), "the ");
        assert_eq!(s.flush(), "EN");
        assert!(!s.stopped());
    }
}
