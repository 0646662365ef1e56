//! Text generation on the Llama-family model: greedy, sampling (temperature, top-k, top-p,
//! seeded) and beam search, over a batch of left-padded prompts, through any KV cache.
//!
//! Semantics follow transformers' `generate`: the attention mask covers past and new tokens,
//! position ids come from the mask, beam search keeps `2 * num_beams` candidates per step and
//! finalises hypotheses with `score / generated_len ** length_penalty`. Without a cache every
//! step re-runs the whole sequence.

use std::time::{Duration, Instant};

use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int, Tensor, TensorData};
use cachet_kv::{Cache, CacheConfig, CacheImplementation, DynamicCache, build_cache};
use serde::{Deserialize, Serialize};

use crate::llama::{Llama, TokenIds};
use cachet_nn::{ModelError, Result, SplitMix64};

/// transformers' `early_stopping`: `true`, `false` or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EarlyStopping {
    /// `true` / `false`.
    Flag(bool),
    /// `"never"`: the canonical beam search stopping rule.
    #[default]
    #[serde(skip)]
    Heuristic,
    /// `"never"`.
    Never(NeverTag),
}

/// The string `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NeverTag {
    /// `"never"`.
    Never,
}

impl EarlyStopping {
    fn is_true(self) -> bool {
        matches!(self, EarlyStopping::Flag(true))
    }
    fn is_never(self) -> bool {
        matches!(self, EarlyStopping::Never(_))
    }
}

/// Most sequences (prompts × beams) one generation runs at once.
pub(crate) const MAX_ROWS: usize = 1 << 16;

fn default_max_new_tokens() -> usize {
    20
}
fn one() -> usize {
    1
}
fn one_f() -> f32 {
    1.0
}
fn default_top_k() -> usize {
    50
}
fn yes() -> bool {
    true
}

/// Generation options, with the field names of transformers' `GenerationConfig` (so a
/// `generation_config.json` deserialises into it); `seed` and `max_cache_bytes` are ours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Tokens to generate at most, per sequence.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Sample instead of taking the most likely token.
    #[serde(default)]
    pub do_sample: bool,
    /// Logits are divided by this before sampling.
    #[serde(default = "one_f")]
    pub temperature: f32,
    /// Sample among the `top_k` most likely tokens (0 = all).
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Sample among the smallest set of tokens whose probability reaches `top_p`.
    #[serde(default = "one_f")]
    pub top_p: f32,
    /// Beams for beam search (1 = no beam search); prompts × beams is at most 65536.
    #[serde(default = "one")]
    pub num_beams: usize,
    /// Sequences returned per prompt (at most `num_beams`).
    #[serde(default = "one")]
    pub num_return_sequences: usize,
    /// Beam scores are divided by `generated_len ** length_penalty`.
    #[serde(default = "one_f")]
    pub length_penalty: f32,
    /// Beam search stopping rule.
    #[serde(default)]
    pub early_stopping: EarlyStopping,
    /// A sequence stops after any of these.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Id used for left padding and after a sequence has finished.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Whether to use a KV cache at all.
    #[serde(default = "yes")]
    pub use_cache: bool,
    /// Cache to build when none is passed (`dynamic` by default).
    #[serde(default)]
    pub cache_implementation: Option<String>,
    /// Options of that cache.
    #[serde(default)]
    pub cache_config: Option<CacheConfig>,
    /// Seed of the sampling RNG.
    #[serde(default)]
    pub seed: u64,
    /// Device-memory budget for the cache: if the cache would exceed it, generation falls back
    /// to the offloaded cache by itself (transformers' resilient-generate, built in).
    #[serde(default)]
    pub max_cache_bytes: Option<usize>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

impl GenerationConfig {
    /// Greedy decoding of `max_new_tokens` tokens, never stopping early.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            ..Self::default()
        }
    }

    fn eos(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Input(m));
        if self.num_beams == 0 {
            return bad("num_beams must be at least 1".into());
        }
        // transformers rejects it too: "max_new_tokens must be greater than 0".
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        if self.num_return_sequences == 0 || self.num_return_sequences > self.num_beams {
            return bad(format!(
                "num_return_sequences ({}) must be between 1 and num_beams ({})",
                self.num_return_sequences, self.num_beams
            ));
        }
        if self.do_sample && (self.temperature.is_nan() || self.temperature <= 0.0) {
            return bad(format!(
                "temperature must be positive, got {}",
                self.temperature
            ));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return bad(format!("top_p must be in [0, 1], got {}", self.top_p));
        }
        if self.do_sample && self.num_beams > 1 {
            return bad("beam sampling (do_sample with num_beams > 1) is not supported".into());
        }
        Ok(())
    }
}

/// What [`generate`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    /// Generated ids per returned sequence (`num_return_sequences` per prompt, in prompt order),
    /// prompt excluded, eos included, nothing after it.
    pub sequences: Vec<Vec<u32>>,
    /// Beam search: the length-normalised score of each returned sequence.
    pub sequence_scores: Option<Vec<f32>>,
    /// Wall time of the whole generation.
    pub elapsed: Duration,
    /// Wall time of the first forward (prefill).
    pub prefill: Duration,
    /// Bytes the cache held at the end (0 without a cache).
    pub cache_bytes: usize,
    /// Name of the cache used (`none` without one).
    pub cache: String,
}

impl GenerationOutput {
    /// Generated tokens per second of wall time, all sequences counted once per step.
    pub fn tokens_per_second(&self, num_prompts: usize) -> f64 {
        let per_prompt = self.sequences.len() / num_prompts.max(1);
        let count: usize = self
            .sequences
            .iter()
            .step_by(per_prompt.max(1))
            .map(Vec::len)
            .sum();
        count as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// Generates from each prompt with `config`, through `cache` if given (it may already hold a
/// prefix of every prompt: multi-turn chat and prefix caching), else through the cache
/// `config.cache_implementation` names (dynamic by default), or none if `use_cache` is false.
pub fn generate(
    model: &Llama,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    cache: Option<&mut dyn Cache>,
) -> Result<GenerationOutput> {
    generate_streaming(model, prompts, config, cache, &mut |_| true)
}

/// What a streamer sees after each decoding step: the token each prompt row got (`None` for a
/// row that had already finished).
pub type StepTokens<'a> = &'a [Option<u32>];

/// [`generate`] calling `streamer` after every step with the new tokens, as transformers'
/// `TextStreamer` is called: a caller prints text as it arrives, and returning `false` stops
/// generation after that step (a stop string was seen). Beam search does not stream (its
/// sequences are only known at the end; transformers refuses streamers there too).
pub fn generate_streaming(
    model: &Llama,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    cache: Option<&mut dyn Cache>,
    streamer: &mut (dyn FnMut(StepTokens<'_>) -> bool + Send),
) -> Result<GenerationOutput> {
    config.validate()?;
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
    if let Some(pad) = config.pad_token_id
        && pad as usize >= vocab
    {
        return Err(ModelError::Input(format!(
            "pad_token_id {pad} is outside the vocabulary (size {vocab})"
        )));
    }
    // Every beam of every prompt is a row of the batch: refuse a count no machine could hold
    // before anything is sized from it (a generation_config.json may say anything).
    if prompts
        .len()
        .checked_mul(config.num_beams)
        .is_none_or(|rows| rows > MAX_ROWS)
    {
        return Err(ModelError::Input(format!(
            "{} prompts x num_beams {} exceeds {MAX_ROWS} sequences",
            prompts.len(),
            config.num_beams
        )));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest
        .checked_add(config.max_new_tokens)
        .is_none_or(|n| n > isize::MAX as usize)
    {
        return Err(ModelError::Input(format!(
            "max_new_tokens {} with a prompt of {longest} tokens overflows the sequence length",
            config.max_new_tokens
        )));
    }
    let _span = tracing::info_span!(
        "generate",
        batch = prompts.len(),
        beams = config.num_beams,
        max_new_tokens = config.max_new_tokens
    )
    .entered();
    match cache {
        Some(cache) => run_with(model, prompts, config, Some(cache), streamer),
        None if !config.use_cache => run_with(model, prompts, config, None, streamer),
        None => {
            let mut owned = make_cache(model, prompts, config)?;
            run_with(model, prompts, config, Some(owned.as_mut()), streamer)
        }
    }
}

fn run_with(
    model: &Llama,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    cache: Option<&mut dyn Cache>,
    streamer: &mut (dyn FnMut(StepTokens<'_>) -> bool + Send),
) -> Result<GenerationOutput> {
    // The whole loop runs on a worker of the rayon pool, so the host kernels' parallel loops
    // start on this thread at once and join without a sleep/wake round trip through the OS
    // (hundreds of them per token when the caller is outside the pool).
    rayon::scope(move |_| {
        let run = Run::new(model, prompts, config, cache)?;
        if config.num_beams > 1 {
            run.beam_search()
        } else {
            run.sample_or_greedy(streamer)
        }
    })
}

fn make_cache(
    model: &Llama,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> Result<Box<dyn Cache>> {
    let mut implementation = match &config.cache_implementation {
        Some(name) => name
            .parse::<CacheImplementation>()
            .map_err(ModelError::cache)?,
        None => CacheImplementation::Dynamic,
    };
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_len = longest + config.max_new_tokens;
    let cache_config = config.cache_config.clone().unwrap_or_default();
    if let Some(budget) = config.max_cache_bytes {
        let rows = prompts.len() * config.num_beams;
        let c = &model.config;
        let dtype_size = model.embed_tokens.dtype().size();
        // Saturating: a fuzzed max_new_tokens makes the product overflow, which means "over".
        let estimate = [2, rows, c.kv_heads(), max_len, c.head_dim(), dtype_size]
            .into_iter()
            .fold(c.num_hidden_layers, usize::saturating_mul);
        let can_offload = matches!(
            implementation,
            CacheImplementation::Dynamic | CacheImplementation::Static
        );
        if estimate > budget && can_offload {
            let fallback = if implementation == CacheImplementation::Static {
                CacheImplementation::OffloadedStatic
            } else {
                CacheImplementation::Offloaded
            };
            tracing::warn!(estimate, budget, from = %implementation, to = %fallback, "cache would exceed the device memory budget; falling back to the offloaded cache");
            implementation = fallback;
        }
    }
    build_cache(
        implementation,
        &cache_config,
        &model.cache_info(),
        &model.device(),
        max_len,
    )
    .map_err(ModelError::cache)
}

/// State of one generation: host-side ids and mask per row, and the cache.
struct Run<'a, 'c> {
    model: &'a Llama,
    config: &'a GenerationConfig,
    cache: Option<&'c mut dyn Cache>,
    rows: Vec<Vec<i64>>,
    mask: Vec<Vec<i64>>,
    padded: bool,
    fed: usize,
    prompt_len: usize,
    start: Instant,
    prefill: Duration,
}

impl<'a, 'c> Run<'a, 'c> {
    fn new(
        model: &'a Llama,
        prompts: &[Vec<u32>],
        config: &'a GenerationConfig,
        cache: Option<&'c mut dyn Cache>,
    ) -> Result<Self> {
        let pad = config.pad_token_id.unwrap_or(0) as i64;
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let beams = config.num_beams;
        let mut rows = Vec::with_capacity(prompts.len() * beams);
        let mut mask = Vec::with_capacity(prompts.len() * beams);
        for prompt in prompts {
            let n_pad = width - prompt.len();
            let row: Vec<i64> = std::iter::repeat_n(pad, n_pad)
                .chain(prompt.iter().map(|&t| t as i64))
                .collect();
            let m: Vec<i64> = std::iter::repeat_n(0, n_pad)
                .chain(std::iter::repeat_n(1, prompt.len()))
                .collect();
            for _ in 0..beams {
                rows.push(row.clone());
                mask.push(m.clone());
            }
        }
        let padded = mask.iter().any(|m| m.contains(&0));
        let past = cache.as_ref().map_or(0, |c| c.seq_length(0));
        if past > 0 {
            if padded {
                return Err(ModelError::Input(
                    "continuing a filled cache needs prompts of equal length (no padding)".into(),
                ));
            }
            if past >= width {
                return Err(ModelError::Input(format!(
                    "the cache already holds {past} tokens but the prompts have only {width}: pass the whole conversation so far plus the new tokens"
                )));
            }
            let cached_rows = cache
                .as_ref()
                .and_then(|c| c.batch_size())
                .unwrap_or(rows.len());
            if cached_rows != rows.len() {
                return Err(ModelError::Input(format!(
                    "the cache holds {cached_rows} sequences but generation runs {} (prompts × beams)",
                    rows.len()
                )));
            }
        }
        Ok(Self {
            model,
            config,
            cache,
            rows,
            mask,
            padded,
            fed: past,
            prompt_len: width,
            start: Instant::now(),
            prefill: Duration::ZERO,
        })
    }

    fn tensor(&self, data: &[Vec<i64>], from: usize) -> Tensor<2, Int> {
        let cols = data[0].len() - from;
        let flat: Vec<i64> = data
            .iter()
            .flat_map(|r| r[from..].iter().copied())
            .collect();
        Tensor::from_data(
            TensorData::new(flat, [data.len(), cols]),
            &self.model.device(),
        )
    }

    /// Runs the model on the tokens not yet fed and returns last-position log-probabilities
    /// (`log_probs = true`) or logits, `[rows][vocab]` on the host.
    fn step(&mut self, log_probs: bool) -> Result<Vec<Vec<f32>>> {
        let from = if self.cache.is_some() { self.fed } else { 0 };
        let input = self.tensor(&self.rows, from);
        // Without padding every mask entry is 1: the model needs none (positions follow the
        // cache), which lets each layer skip masking altogether.
        let mask = self.padded.then(|| self.tensor(&self.mask, 0));
        let cache = self.cache.as_mut().map(|c| &mut **c as &mut dyn Cache);
        let logits = self.model.forward_keep(input, mask, None, cache, 1)?;
        self.fed = self.rows[0].len();
        let [rows, seq, vocab] = logits.dims();
        let last = logits.slice([0..rows, seq - 1..seq]).reshape([rows, vocab]);
        let last = if log_probs {
            log_softmax(last, 1)
        } else {
            last
        };
        let flat = last
            .try_into_data()
            .map_err(|err| cachet_tensor::TensorError::Transfer {
                what: "logits to host".into(),
                reason: err.to_string(),
            })?
            .try_cast(DType::F32)
            .and_then(|d| d.try_into_vec::<f32>())
            .map_err(|err| ModelError::Input(format!("reading logits: {err:?}")))?;
        if self.prefill.is_zero() {
            self.prefill = self.start.elapsed();
        }
        Ok(flat.chunks(vocab).map(<[f32]>::to_vec).collect())
    }

    fn push(&mut self, row: usize, token: i64) {
        self.rows[row].push(token);
        self.mask[row].push(1);
    }

    fn finish(self, sequences: Vec<Vec<u32>>, scores: Option<Vec<f32>>) -> GenerationOutput {
        let (cache_bytes, cache) = match &self.cache {
            Some(c) => (c.memory_bytes(), c.name().to_string()),
            None => (0, "none".to_string()),
        };
        GenerationOutput {
            sequences,
            sequence_scores: scores,
            elapsed: self.start.elapsed(),
            prefill: self.prefill,
            cache_bytes,
            cache,
        }
    }

    fn sample_or_greedy(
        mut self,
        streamer: &mut (dyn FnMut(StepTokens<'_>) -> bool + Send),
    ) -> Result<GenerationOutput> {
        let eos = self.config.eos();
        let pad = self.config.pad_token_id.unwrap_or(0) as i64;
        let batch = self.rows.len();
        let mut out = vec![Vec::new(); batch];
        let mut done = vec![false; batch];
        let mut rng = SplitMix64::new(self.config.seed);
        let mut step_tokens = vec![None; batch];
        for _ in 0..self.config.max_new_tokens {
            let logits = self.step(false)?;
            for (row, scores) in logits.into_iter().enumerate() {
                let token = if done[row] {
                    pad
                } else if self.config.do_sample {
                    sample(scores, self.config, &mut rng) as i64
                } else {
                    argmax(&scores) as i64
                };
                step_tokens[row] = (!done[row]).then_some(token as u32);
                if !done[row] {
                    out[row].push(token as u32);
                    done[row] = eos.contains(&(token as u32));
                }
                self.push(row, token);
            }
            let go_on = streamer(&step_tokens);
            if !go_on || done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(self.finish(out, None))
    }

    fn beam_search(mut self) -> Result<GenerationOutput> {
        let cfg = self.config;
        let nb = cfg.num_beams;
        let eos = cfg.eos();
        let batch = self.rows.len() / nb;
        let keep = 2.max(1 + eos.len()) * nb;
        let max_len = self.prompt_len + cfg.max_new_tokens;
        let lp = cfg.length_penalty;
        // Running beams: generated tokens and accumulated log-prob, per batch item.
        let mut running: Vec<Vec<(Vec<u32>, f32)>> = (0..batch)
            .map(|_| {
                (0..nb)
                    .map(|b| (Vec::new(), if b == 0 { 0.0 } else { -1e9 }))
                    .collect()
            })
            .collect();
        // Finished hypotheses: (tokens, normalised score), best first, at most nb.
        let mut finished: Vec<Vec<(Vec<u32>, f32)>> = vec![Vec::new(); batch];
        let mut improvable = vec![true; batch];
        let mut cur_len = self.prompt_len;
        while cur_len < max_len {
            let log_probs = self.step(true)?;
            let vocab = log_probs[0].len();
            let mut parents = Vec::with_capacity(batch * nb);
            let mut next_tokens = Vec::with_capacity(batch * nb);
            let mut all_hit = true;
            for item in 0..batch {
                // Top `keep` continuations over all beams of this item.
                let mut candidates: Vec<(f32, usize, u32)> = Vec::with_capacity(nb * vocab);
                for beam in 0..nb {
                    let base = running[item][beam].1;
                    for (token, &lp_tok) in log_probs[item * nb + beam].iter().enumerate() {
                        candidates.push((base + lp_tok, beam, token as u32));
                    }
                }
                let top = top_k_desc(candidates, keep);
                let hits: Vec<bool> = top
                    .iter()
                    .map(|&(_, _, t)| eos.contains(&t) || cur_len + 1 >= max_len)
                    .collect();
                all_hit &= hits.iter().all(|&h| h);
                // Finalise hypotheses among the top `nb` candidates that just finished.
                let generated = (cur_len + 1 - self.prompt_len) as f32;
                let full = finished[item].len() >= nb;
                let mut merged = finished[item].clone();
                for (rank, (&(score, beam, token), &hit)) in top.iter().zip(&hits).enumerate() {
                    let blocked = (full && cfg.early_stopping.is_true()) || !improvable[item];
                    if rank < nb && hit && !blocked {
                        let mut tokens = running[item][beam].0.clone();
                        tokens.push(token);
                        merged.push((tokens, score / generated.powf(lp)));
                    }
                }
                merged.sort_by(|a, b| b.1.total_cmp(&a.1));
                merged.truncate(nb);
                finished[item] = merged;
                // Next running beams: the best continuations that did not finish.
                let mut order: Vec<usize> = (0..top.len()).collect();
                let masked = |i: usize| top[i].0 + if hits[i] { -1e9 } else { 0.0 };
                order.sort_by(|&a, &b| masked(b).total_cmp(&masked(a)));
                let mut next = Vec::with_capacity(nb);
                for &i in order.iter().take(nb) {
                    let (_, beam, token) = top[i];
                    let mut tokens = running[item][beam].0.clone();
                    tokens.push(token);
                    next.push((tokens, masked(i)));
                    parents.push(item * nb + beam);
                    next_tokens.push(token);
                }
                running[item] = next;
            }
            // Rows follow their parent beams: the ids, the mask and the cache.
            let old_rows = std::mem::take(&mut self.rows);
            let old_mask = std::mem::take(&mut self.mask);
            self.rows = parents.iter().map(|&p| old_rows[p].clone()).collect();
            self.mask = parents.iter().map(|&p| old_mask[p].clone()).collect();
            if let Some(cache) = self.cache.as_mut() {
                cache.reorder(&parents).map_err(ModelError::cache)?;
            }
            for (row, &token) in next_tokens.iter().enumerate() {
                self.push(row, token as i64);
            }
            cur_len += 1;
            // Can a running beam still beat the worst finished hypothesis?
            for item in 0..batch {
                let best_len = if cfg.early_stopping.is_never() && lp > 0.0 {
                    max_len
                } else {
                    cur_len
                } - self.prompt_len;
                let best_running = running[item][0].1 / (best_len as f32).powf(lp);
                let worst_finished = if finished[item].len() >= nb {
                    finished[item].last().map_or(-1e9, |h| h.1)
                } else {
                    -1e9
                };
                improvable[item] &= best_running > worst_finished;
            }
            let open = !(cfg.early_stopping.is_true() && finished.iter().all(|f| f.len() >= nb));
            if !improvable.iter().any(|&i| i) || !open || all_hit {
                break;
            }
        }
        let mut sequences = Vec::with_capacity(batch * cfg.num_return_sequences);
        let mut scores = Vec::with_capacity(batch * cfg.num_return_sequences);
        for item in finished {
            for (tokens, score) in item.into_iter().take(cfg.num_return_sequences) {
                sequences.push(tokens);
                scores.push(score);
            }
        }
        Ok(self.finish(sequences, Some(scores)))
    }
}

/// Index of the largest value (the first one on ties, as torch's argmax).
fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// The `k` best `(score, beam, token)` candidates, best first; ties keep the lower index first.
fn top_k_desc(mut candidates: Vec<(f32, usize, u32)>, k: usize) -> Vec<(f32, usize, u32)> {
    let k = k.min(candidates.len());
    candidates.select_nth_unstable_by(k.saturating_sub(1), |a, b| b.0.total_cmp(&a.0));
    candidates.truncate(k);
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    candidates
}

/// Temperature, then top-k, then top-p (transformers' warper order), then a draw.
fn sample(mut logits: Vec<f32>, config: &GenerationConfig, rng: &mut SplitMix64) -> usize {
    for l in &mut logits {
        *l /= config.temperature;
    }
    if config.top_k > 0 && config.top_k < logits.len() {
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let threshold = sorted[config.top_k - 1];
        for l in &mut logits {
            if *l < threshold {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if config.top_p < 1.0 {
        // Drop the least likely tokens whose cumulative mass stays within 1 - top_p.
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));
        let mut cumulative = 0.0;
        for (rank, &i) in order.iter().enumerate() {
            cumulative += probs[i];
            if cumulative <= 1.0 - config.top_p && rank + 1 < order.len() {
                probs[i] = 0.0;
            }
        }
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let draw = rng.next_f32();
    let mut cumulative = 0.0;
    for (i, &p) in probs.iter().enumerate() {
        cumulative += p;
        if draw < cumulative {
            return i;
        }
    }
    argmax(&probs)
}

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

/// Greedy decoding through `cache` if given, else without any cache (the whole sequence every
/// step): the simplest entry point; [`generate`] has every option.
pub fn greedy(
    model: &Llama,
    prompts: &[Vec<u32>],
    options: &GreedyOptions,
    cache: Option<&mut dyn Cache>,
) -> Result<Generation> {
    let config = GenerationConfig {
        max_new_tokens: options.max_new_tokens,
        eos_token_id: Some(TokenIds::Many(options.eos_token_ids.clone())),
        pad_token_id: Some(options.pad_token_id),
        use_cache: cache.is_some(),
        ..GenerationConfig::default()
    };
    let out = generate(model, prompts, &config, cache)?;
    Ok(Generation {
        tokens: out.sequences,
        elapsed: out.elapsed,
        prefill: out.prefill,
    })
}

/// A new empty dynamic cache (the default of generation).
pub fn default_cache() -> DynamicCache {
    DynamicCache::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_generation_config_json() {
        let json = r#"{"max_new_tokens": 7, "do_sample": true, "top_k": 0, "top_p": 0.9, "eos_token_id": [2, 3],
            "num_beams": 1, "cache_implementation": "static", "cache_config": {"max_cache_len": 64},
            "early_stopping": "never", "transformers_version": "5.23.0"}"#;
        let config: GenerationConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.max_new_tokens, 7);
        assert_eq!(config.eos(), vec![2, 3]);
        assert!(config.early_stopping.is_never());
        assert_eq!(config.cache_config.unwrap().max_cache_len, Some(64));
        let flag: GenerationConfig = serde_json::from_str(r#"{"early_stopping": true}"#).unwrap();
        assert!(flag.early_stopping.is_true());
        let bad: std::result::Result<GenerationConfig, _> =
            serde_json::from_str(r#"{"cache_config": {"max_cache_lenn": 3}}"#);
        assert!(bad.is_err(), "unknown cache_config keys are rejected");
    }

    #[test]
    fn sampling_respects_top_k_and_top_p_and_is_seeded() {
        let logits = vec![0.0, 5.0, 4.9, -3.0, 1.0];
        let config = GenerationConfig {
            do_sample: true,
            top_k: 2,
            ..GenerationConfig::default()
        };
        let mut rng = SplitMix64::new(7);
        let draws: Vec<usize> = (0..200)
            .map(|_| sample(logits.clone(), &config, &mut rng))
            .collect();
        assert!(
            draws.iter().all(|&t| t == 1 || t == 2),
            "top-k keeps the two best"
        );
        assert!(draws.contains(&1) && draws.contains(&2));
        let config = GenerationConfig {
            do_sample: true,
            top_k: 0,
            top_p: 0.5,
            ..GenerationConfig::default()
        };
        let mut rng = SplitMix64::new(7);
        assert!(
            (0..100).all(|_| sample(logits.clone(), &config, &mut rng) == 1),
            "top-p 0.5 keeps only the best"
        );
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        assert_eq!(
            (0..5).map(|_| a.next_u64()).collect::<Vec<_>>(),
            (0..5).map(|_| b.next_u64()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn invalid_configs_are_rejected_with_a_reason() {
        let bad = GenerationConfig {
            num_beams: 2,
            num_return_sequences: 3,
            ..GenerationConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("num_return_sequences")
        );
        let bad = GenerationConfig {
            do_sample: true,
            temperature: 0.0,
            ..GenerationConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("temperature")
        );
    }
}
