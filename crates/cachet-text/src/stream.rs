//! Incremental detokenization: the text of new tokens as they arrive, as transformers'
//! `TextStreamer` and tokenizers' `DecodeStream` do it — decode a short window twice (without and
//! with the new tokens) and emit only the stable suffix, so no half UTF-8 character or partial
//! byte-fallback sequence is ever printed.

use crate::{Result, Tokenizer};

/// Streams the text of a growing token sequence.
#[derive(Debug, Clone)]
pub struct DecodeStream {
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl DecodeStream {
    /// A stream starting from no tokens; special tokens are dropped when `skip_special_tokens`.
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// A stream continuing after `context` (e.g. the prompt's last few ids), so the first new
    /// token decodes as it would mid-text (SentencePiece decoders strip a leading space).
    pub fn with_context(skip_special_tokens: bool, context: &[u32]) -> Self {
        let tail = &context[context.len().saturating_sub(4)..];
        Self {
            skip_special_tokens,
            ids: tail.to_vec(),
            prefix_offset: 0,
            read_offset: tail.len(),
        }
    }

    /// Adds one token; returns the newly completed text, if any.
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let new = match full.strip_prefix(prefix.as_str()) {
                Some(rest) => rest.to_string(),
                // The window re-decoded differently (a decoder that strips a leading space):
                // emit from the first char boundary past the old text.
                None => {
                    let mut at = prefix.len().min(full.len());
                    while !full.is_char_boundary(at) {
                        at += 1;
                    }
                    full[at..].to_string()
                }
            };
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Text of tokens still held because they did not yet form whole characters.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let prefix = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.strip_prefix(prefix.as_str()).unwrap_or("").to_string())
    }
}
