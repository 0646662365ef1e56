//! Module-name matching the way diffusers does it: Python `re.search` (or `re.fullmatch`) of
//! identifier regexes against dotted module names.

use regex::Regex;

use crate::error::{DiffusionError, Result};

/// A compiled list of identifiers, with the option it came from for error messages.
#[derive(Clone, Debug)]
pub(crate) struct Identifiers {
    option: &'static str,
    patterns: Vec<(String, Regex)>,
}

impl Identifiers {
    /// Compiles identifiers matched anywhere in the name (`re.search`).
    pub(crate) fn search(option: &'static str, identifiers: &[String]) -> Result<Self> {
        Self::compile(option, identifiers, |p| p.to_string())
    }

    /// Compiles identifiers that must match the whole name (`re.fullmatch`).
    pub(crate) fn fullmatch(option: &'static str, identifiers: &[String]) -> Result<Self> {
        Self::compile(option, identifiers, |p| format!("^(?:{p})$"))
    }

    fn compile(
        option: &'static str,
        identifiers: &[String],
        wrap: impl Fn(&str) -> String,
    ) -> Result<Self> {
        let patterns = identifiers
            .iter()
            .map(|id| {
                Regex::new(&wrap(id))
                    .map(|re| (id.clone(), re))
                    .map_err(|e| DiffusionError::BadIdentifier {
                        option,
                        identifier: id.clone(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { option, patterns })
    }

    /// Whether any identifier matches `name`.
    pub(crate) fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|(_, re)| re.is_match(name))
    }

    /// Errors when an identifier matches none of `names`: with `each`, every identifier must
    /// match something (user-given lists); otherwise the list as a whole must (default lists cover
    /// many model families, so single entries may miss).
    pub(crate) fn require_matches<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str> + Clone,
        each: bool,
        what: &'static str,
    ) -> Result<()> {
        let unmatched = |re: &Regex| !names.clone().into_iter().any(|n| re.is_match(n));
        let available = || {
            let all: Vec<&str> = names.clone().into_iter().collect();
            let shown: Vec<&str> = all.iter().take(6).copied().collect();
            let more = all.len().saturating_sub(shown.len());
            if all.is_empty() {
                "nothing hookable".to_string()
            } else if more > 0 {
                format!("{}, … {more} more", shown.join(", "))
            } else {
                shown.join(", ")
            }
        };
        if each {
            if let Some((id, _)) = self.patterns.iter().find(|(_, re)| unmatched(re)) {
                return Err(DiffusionError::UnmatchedIdentifier {
                    option: self.option,
                    identifier: id.clone(),
                    what,
                    available: available(),
                });
            }
        } else if !self.patterns.is_empty() && self.patterns.iter().all(|(_, re)| unmatched(re)) {
            let ids: Vec<&str> = self.patterns.iter().map(|(id, _)| id.as_str()).collect();
            return Err(DiffusionError::UnmatchedIdentifier {
                option: self.option,
                identifier: ids.join("|"),
                what,
                available: available(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn search_and_fullmatch_follow_python() {
        let search = Identifiers::search("x", &ids(&["transformer_blocks"])).unwrap();
        // re.search finds "transformer_blocks" inside the single-stream name, as in diffusers.
        assert!(search.matches("single_transformer_blocks.3.attn"));
        let anchored = Identifiers::search("x", &ids(&["^transformer_blocks.*attn"])).unwrap();
        assert!(anchored.matches("transformer_blocks.0.attn1"));
        assert!(!anchored.matches("single_transformer_blocks.0.attn"));
        let full = Identifiers::fullmatch("x", &ids(&["^transformer_blocks.*attn"])).unwrap();
        assert!(full.matches("transformer_blocks.0.attn"));
        assert!(!full.matches("transformer_blocks.0.attn1"));
    }

    #[test]
    fn unmatched_and_invalid_identifiers_are_errors() {
        let names = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"];
        let list = Identifiers::search(
            "spatial_attention_block_identifiers",
            &ids(&["nope", "transformer"]),
        )
        .unwrap();
        assert!(
            list.require_matches(names, false, "attention module")
                .is_ok()
        );
        let err = list
            .require_matches(names, true, "attention module")
            .unwrap_err();
        assert!(err.to_string().contains("\"nope\""), "{err}");
        let err = Identifiers::search("x", &ids(&["(unclosed"])).unwrap_err();
        assert!(matches!(err, DiffusionError::BadIdentifier { .. }));
    }
}
