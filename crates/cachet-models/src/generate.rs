//! Greedy decoding over a batch of prompts, with or without a KV cache.
//!
//! Prompts of different lengths are left-padded and masked, as transformers' `generate` does.
//! Without a cache every step re-runs the whole sequence; with one, only the new token.

use std::time::{Duration, Instant};

use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::llama::Llama;
use cachet_kv::Cache;

/// Options of [`greedy`].
#[derive(Debug, Clone)]
pub struct GreedyOptions {
    /// Tokens to generate at most, per prompt.
    pub max_new_tokens: usize,
    /// Generation of a sequence stops after any of these ids.
    pub eos_token_ids: Vec<u32>,
    /// Id used for left padding and after a sequence has finished.
    pub pad_token_id: u32,
}

/// What [`greedy`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids per prompt, prompt excluded, eos included, nothing after it.
    pub tokens: Vec<Vec<u32>>,
    /// Wall time of the whole generation.
    pub elapsed: Duration,
    /// Wall time of the first forward (prefill).
    pub prefill: Duration,
}

impl Generation {
    /// Generated tokens (all prompts) per second of wall time.
    pub fn tokens_per_second(&self) -> f64 {
        let count: usize = self.tokens.iter().map(Vec::len).sum();
        count as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// Greedily extends each prompt; with `cache`, the prompt is prefilled once and each step feeds
/// only the new token.
pub fn greedy(
    model: &Llama,
    prompts: &[Vec<u32>],
    options: &GreedyOptions,
    mut cache: Option<&mut dyn Cache>,
) -> Result<Generation> {
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::Input(
            "every prompt needs at least one token".into(),
        ));
    }
    let vocab = model.config.vocab_size;
    if let Some(bad) = prompts.iter().flatten().find(|&&id| id as usize >= vocab) {
        return Err(ModelError::Input(format!(
            "prompt token {bad} is outside the vocabulary (size {vocab})"
        )));
    }
    let _span = tracing::info_span!(
        "generate",
        batch = prompts.len(),
        max_new_tokens = options.max_new_tokens
    )
    .entered();
    let device = model.device();
    let batch = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // Left-padded ids and mask, kept on the host and grown by one column per step.
    let mut ids: Vec<Vec<i64>> = Vec::with_capacity(batch);
    let mut mask: Vec<Vec<i64>> = Vec::with_capacity(batch);
    for prompt in prompts {
        let pad = width - prompt.len();
        ids.push(
            std::iter::repeat_n(options.pad_token_id as i64, pad)
                .chain(prompt.iter().map(|&t| t as i64))
                .collect(),
        );
        mask.push(
            std::iter::repeat_n(0, pad)
                .chain(std::iter::repeat_n(1, prompt.len()))
                .collect(),
        );
    }
    let padded = mask.iter().any(|row| row.contains(&0));
    let to_tensor = |rows: &[Vec<i64>], from: usize| {
        let cols = rows[0].len() - from;
        let flat: Vec<i64> = rows
            .iter()
            .flat_map(|r| r[from..].iter().copied())
            .collect();
        Tensor::<2, Int>::from_data(TensorData::new(flat, [rows.len(), cols]), &device)
    };

    let start = Instant::now();
    let mut prefill = Duration::ZERO;
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut done = vec![false; batch];
    let mut fed = 0; // tokens already in the cache
    for step in 0..options.max_new_tokens {
        let input = if cache.is_some() {
            to_tensor(&ids, fed)
        } else {
            to_tensor(&ids, 0)
        };
        let attention_mask = padded.then(|| to_tensor(&mask, 0));
        let logits = match cache.as_mut() {
            Some(c) => model.forward_with_cache(input, attention_mask, None, Some(&mut **c))?,
            None => model.forward(input, attention_mask, None)?,
        };
        fed = ids[0].len();
        let [_, seq, _] = logits.dims();
        let next = logits
            .slice([0..batch, seq - 1..seq])
            .argmax(2)
            .reshape([batch])
            .into_data()
            .try_cast(DType::I64)
            .and_then(|data| data.try_into_vec::<i64>())
            .map_err(|err| ModelError::Input(format!("reading logits: {err:?}")))?;
        if step == 0 {
            prefill = start.elapsed();
        }
        for (row, &token) in next.iter().enumerate() {
            let token = if done[row] {
                options.pad_token_id as i64
            } else {
                token
            };
            if !done[row] {
                out[row].push(token as u32);
                done[row] = options.eos_token_ids.contains(&(token as u32));
            }
            ids[row].push(token);
            mask[row].push(1);
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    Ok(Generation {
        tokens: out,
        elapsed: start.elapsed(),
        prefill,
    })
}
