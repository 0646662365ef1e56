//! Perplexity over a long text with transformers' sliding-window recipe ("Perplexity of
//! fixed-length models"): windows of `context` tokens that start `stride` tokens apart, each
//! scoring only the tokens the previous window did not, so every token is predicted once (when
//! `stride < context`), from up to `context - 1` tokens before it.
//!
//! Each token's negative log-likelihood is summed exactly (the recipe's docs weight a window's
//! mean loss by its target count minus one; the sum is what that approximates). A window can
//! run through a KV cache in chunks, so that quantized or windowed caches are read as they are
//! when generating, rather than only written.

use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use cachet_kv::{CacheConfig, CacheImplementation, build_cache};
use serde::{Deserialize, Serialize};

use crate::llama::Llama;
use cachet_nn::{ModelError, Result};

/// How to slide over the text and what runs each window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerplexityConfig {
    /// Tokens per window (the model's context in the recipe).
    pub context: usize,
    /// Distance between window starts; `stride < context` gives each scored token at least
    /// `context - stride` tokens of context.
    pub stride: usize,
    /// Tokens fed per forward inside a window, through the cache (0: the whole window in one
    /// forward, where the cache is written but never read).
    #[serde(default)]
    pub chunk: usize,
    /// Cache to run windows through (transformers' names; `dynamic` when `None`).
    #[serde(default)]
    pub cache_implementation: Option<String>,
    /// Options of that cache.
    #[serde(default)]
    pub cache_config: Option<CacheConfig>,
}

impl Default for PerplexityConfig {
    fn default() -> Self {
        Self {
            context: 512,
            stride: 256,
            chunk: 0,
            cache_implementation: None,
            cache_config: None,
        }
    }
}

/// What [`perplexity`] measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerplexityReport {
    /// `exp(mean negative log-likelihood)`.
    pub perplexity: f64,
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
    /// Tokens scored (every token but the first).
    pub tokens_scored: usize,
    /// Windows run.
    pub windows: usize,
    /// Tokens pushed through the model, overlaps counted.
    pub tokens_processed: usize,
    /// Wall time of the forwards and the scoring.
    pub seconds: f64,
}

/// The windows of the recipe: `(begin, end, first_scored)` where tokens `first_scored..end`
/// are scored from the logits of the tokens before them.
pub(crate) fn windows(len: usize, context: usize, stride: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < len {
        let end = (begin + context).min(len);
        let first = prev_end.max(begin + 1);
        if first < end {
            out.push((begin, end, first));
        }
        prev_end = end;
        if end == len {
            break;
        }
        begin += stride;
    }
    out
}

fn check(ids: &[u32], config: &PerplexityConfig, vocab: usize) -> Result<()> {
    if config.context < 2 {
        return Err(ModelError::Input(format!(
            "perplexity context is {}; it needs at least 2 tokens",
            config.context
        )));
    }
    if config.stride == 0 || config.stride > config.context {
        return Err(ModelError::Input(format!(
            "perplexity stride is {} with a context of {}; it must be in 1..=context",
            config.stride, config.context
        )));
    }
    if ids.len() < 2 {
        return Err(ModelError::Input(format!(
            "the text has {} token(s); perplexity needs at least 2",
            ids.len()
        )));
    }
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|&(_, &id)| id as usize >= vocab)
    {
        return Err(ModelError::Input(format!(
            "token {i} is id {id}, outside the model's vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// Adds `-log p(targets[r])` of each row of `logits` (`[rows, vocab]`, f32) to `sum`.
fn add_nll(logits: &[f32], vocab: usize, targets: &[u32], sum: &mut f64) {
    for (row, &target) in logits.chunks_exact(vocab).zip(targets) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        *sum += lse - row[target as usize] as f64;
    }
}

/// Perplexity of `model` on the token ids `ids` (the text tokenized as the model's tokenizer
/// does, special tokens included as the caller wants them).
pub fn perplexity(
    model: &Llama,
    ids: &[u32],
    config: &PerplexityConfig,
) -> Result<PerplexityReport> {
    let vocab = model.config.vocab_size;
    check(ids, config, vocab)?;
    let implementation = match &config.cache_implementation {
        Some(name) => name
            .parse::<CacheImplementation>()
            .map_err(ModelError::cache)?,
        None => CacheImplementation::Dynamic,
    };
    let cache_config = config.cache_config.clone().unwrap_or_default();
    let device = model.device();
    let start = Instant::now();
    let _span =
        tracing::info_span!("perplexity", tokens = ids.len(), context = config.context).entered();
    let mut sum = 0.0;
    let mut scored = 0;
    let mut processed = 0;
    let plan = windows(ids.len(), config.context, config.stride);
    rayon::scope(|_| -> Result<()> {
        for &(begin, end, first) in &plan {
            let mut cache = build_cache(
                implementation,
                &cache_config,
                &model.cache_info(),
                &device,
                end - begin,
            )
            .map_err(ModelError::cache)?;
            let chunk = if config.chunk == 0 {
                end - begin
            } else {
                config.chunk
            };
            let mut at = begin;
            while at < end {
                let stop = (at + chunk).min(end);
                let piece: Vec<i64> = ids[at..stop].iter().map(|&t| t as i64).collect();
                let input =
                    Tensor::<2, Int>::from_data(TensorData::new(piece, [1, stop - at]), &device);
                // Position p's logits predict token p + 1: only those landing in first..end.
                let lo = first.saturating_sub(1).max(at);
                let hi = stop.min(end - 1);
                let keep = if hi > lo { stop - lo } else { 1 };
                let logits = model.forward_keep(input, None, None, Some(cache.as_mut()), keep)?;
                processed += stop - at;
                if hi > lo {
                    let rows = logits.slice([0..1, 0..hi - lo, 0..vocab]);
                    let data = rows.try_into_data().map_err(|err| {
                        cachet_tensor::TensorError::Transfer {
                            what: "logits to host".into(),
                            reason: err.to_string(),
                        }
                    })?;
                    let values = data
                        .as_slice::<f32>()
                        .map_err(|e| ModelError::Input(format!("logits are not f32: {e:?}")))?;
                    add_nll(values, vocab, &ids[lo + 1..hi + 1], &mut sum);
                    scored += hi - lo;
                }
                at = stop;
            }
        }
        Ok(())
    })?;
    let mean_nll = sum / scored as f64;
    Ok(PerplexityReport {
        perplexity: mean_nll.exp(),
        mean_nll,
        tokens_scored: scored,
        windows: plan.len(),
        tokens_processed: processed,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_score_every_token_but_the_first_once() {
        // With stride == context the windows do not overlap and, as in transformers' recipe,
        // each window's first token has nothing before it to be predicted from.
        assert_eq!(windows(10, 4, 4), vec![(0, 4, 1), (4, 8, 5), (8, 10, 9)]);
        for (len, context, stride) in [(10, 4, 2), (10, 4, 3), (3, 8, 4), (1000, 512, 256)] {
            let plan = windows(len, context, stride);
            let mut seen = vec![0; len];
            for &(begin, end, first) in &plan {
                assert!(end - begin <= context && begin < first && first < end);
                for s in &mut seen[first..end] {
                    *s += 1;
                }
            }
            assert_eq!(seen[0], 0);
            assert!(
                seen[1..].iter().all(|&s| s == 1),
                "{len} {context} {stride}"
            );
        }
    }

    #[test]
    fn nll_of_uniform_logits_is_log_vocab() {
        let mut sum = 0.0;
        add_nll(&[0.5; 8], 4, &[1, 3], &mut sum);
        assert!((sum - 2.0 * 4f64.ln()).abs() < 1e-12);
    }
}
