//! `cachet generate`: load a model (or the embedded default), generate, report speed and cache.
//! With a tokenizer (a model folder's tokenizer.json or a GGUF file's metadata) it takes text,
//! applies the chat template and streams the answer as text.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cachet::kv::CacheConfig;
use cachet::kv::{Cache, CacheImplementation, build_cache};
use cachet::models::TokenIds;
use cachet::models::{GenerationConfig, Llama, embedded, generate, generate_streaming};
use cachet::tensor::{DeviceSpec, Precision, human_bytes};
use cachet::text::{DecodeStream, Message, StopStrings, TextModel};

/// Window given to a sliding-window cache on a model that has none.
const DEFAULT_WINDOW: usize = 64;

/// Arguments of `cachet generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json + safetensors) or a `.gguf` file; the embedded tiny
    /// Llama when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt token ids, comma separated; repeat the flag for a batch (left-padded).
    #[arg(long, num_args = 1, action = clap::ArgAction::Append)]
    prompt_ids: Vec<String>,
    /// Prompt text (a user message under the chat template unless --raw); needs a tokenizer.
    #[arg(long, conflicts_with_all = ["prompt_ids", "messages"])]
    prompt: Option<String>,
    /// System message put before the prompt.
    #[arg(long)]
    system: Option<String>,
    /// A JSON file with the conversation: a list of {"role": …, "content": …}.
    #[arg(long, conflicts_with = "prompt_ids")]
    messages: Option<PathBuf>,
    /// Tokenize the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Stop when the generated text contains this string (repeatable).
    #[arg(long, num_args = 1, action = clap::ArgAction::Append)]
    stop: Vec<String>,
    /// Interactive chat: one user message per stdin line, answers streamed, KV cache kept
    /// across turns; ends on EOF.
    #[arg(long, conflicts_with_all = ["prompt_ids", "json"])]
    chat: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Device: cpu, wgpu, wgpu:N, wgpu:cpu or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// KV cache: dynamic, static, offloaded, offloaded_static, quantized, sliding_window, sink, or none.
    #[arg(long, default_value = "dynamic")]
    cache: String,
    /// Cache options as JSON, with transformers' cache_config keys (e.g. '{"max_cache_len": 64}').
    #[arg(long)]
    cache_config: Option<String>,
    /// Beams for beam search.
    #[arg(long, default_value_t = 1)]
    num_beams: usize,
    /// Sequences returned per prompt (beam search).
    #[arg(long)]
    num_return_sequences: Option<usize>,
    /// Sample instead of greedy decoding.
    #[arg(long)]
    do_sample: bool,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Sample among the top-k tokens (0 = all).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampling RNG.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device-memory budget for the cache in bytes; over it, fall back to the offloaded cache.
    #[arg(long)]
    max_cache_bytes: Option<usize>,
    /// A generation_config.json whose fields are used as defaults (flags still apply on top);
    /// the model folder's one when omitted.
    #[arg(long)]
    generation_config: Option<PathBuf>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of text; see the README for its fields.
    #[arg(long)]
    json: bool,
}

fn parse_prompts(raw: &[String]) -> Result<Vec<Vec<u32>>> {
    if raw.is_empty() {
        return Ok(vec![vec![1, 2, 3, 4, 5]]);
    }
    raw.iter()
        .map(|text| {
            let ids: Result<Vec<u32>, _> = text
                .split(',')
                .filter(|t| !t.trim().is_empty())
                .map(|t| t.trim().parse::<u32>())
                .collect();
            let ids = ids.with_context(|| {
                format!("--prompt-ids {text:?}: not a comma-separated list of token ids")
            })?;
            if ids.is_empty() {
                bail!("--prompt-ids needs at least one token id");
            }
            Ok(ids)
        })
        .collect()
}

/// Loads a checkpoint directory; bitsandbytes-quantized checkpoints (a `quantization_config` in
/// config.json) load into quantized layers when the `quant` feature is on.
fn load_model(
    dir: &std::path::Path,
    device: &cachet::tensor::Device,
    precision: Precision,
) -> Result<Llama> {
    #[cfg(feature = "quant")]
    {
        let model = cachet::quant::load_pretrained::<Llama>(dir, device, precision)?;
        Ok(model)
    }
    #[cfg(not(feature = "quant"))]
    {
        use cachet::nn::Pretrained;
        Ok(Llama::from_pretrained(dir, device, precision)?)
    }
}

/// Loads `--model`: a `.gguf` file (weights and tokenizer from one file) or a folder (the
/// tokenizer from its tokenizer.json when there is one).
pub(crate) fn load_any(
    path: &Path,
    device: &cachet::tensor::Device,
    precision: Precision,
) -> Result<(Llama, Option<TextModel>)> {
    if path.is_file() {
        let file = cachet::tensor::gguf::GgufFile::open(path)?;
        let model = Llama::from_gguf_file(&file, device, precision)?;
        // Say what happened to the stored formats: every GGUF weight is dequantized at load.
        let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
        for info in file.tensors() {
            *kinds.entry(info.ggml_type().to_string()).or_default() += 1;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        eprintln!(
            "note: {}: tensors stored as {}, dequantized to {precision} at load",
            path.display(),
            kinds.join(", ")
        );
        let text = match file.get("tokenizer.ggml.model") {
            Some(_) => Some(TextModel::from_gguf_file(&file)?),
            None => None,
        };
        return Ok((model, text));
    }
    let model = load_model(path, device, precision)?;
    Ok((model, folder_text(path)?))
}

/// A model folder's tokenizer and chat template, when it has a tokenizer.json.
pub(crate) fn folder_text(dir: &Path) -> Result<Option<TextModel>> {
    Ok(if dir.join("tokenizer.json").is_file() {
        Some(TextModel::from_dir(dir)?)
    } else {
        None
    })
}

/// The embedded tiny Llama's tokenizer and chat template.
pub(crate) fn embedded_text() -> Result<TextModel> {
    Ok(TextModel::from_json_strs(
        embedded::TOKENIZER_JSON,
        Some(embedded::TOKENIZER_CONFIG_JSON),
        embedded::NAME,
    )?)
}

/// The conversation given by --messages, or --system and --prompt.
fn conversation(args: &GenerateArgs) -> Result<Vec<Message>> {
    if let Some(path) = &args.messages {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut messages: Vec<Message> = serde_json::from_str(&text).with_context(|| {
            format!(
                "parsing {}: expected a list of {{\"role\": …, \"content\": …}}",
                path.display()
            )
        })?;
        if let Some(system) = &args.system {
            messages.insert(0, Message::system(system.clone()));
        }
        return Ok(messages);
    }
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::system(system.clone()));
    }
    if let Some(prompt) = &args.prompt {
        messages.push(Message::user(prompt.clone()));
    }
    Ok(messages)
}

/// Token ids of a conversation: through the chat template (generation prompt added) unless
/// `raw` or the model has none, in which case the messages' texts are tokenized as they are.
fn encode_conversation(text: &TextModel, messages: &[Message], raw: bool) -> Result<Vec<u32>> {
    if raw || text.chat_template.is_none() {
        let joined: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        return Ok(text.tokenizer.encode(&joined.join("\n"), true)?);
    }
    let rendered = text.render_chat(messages, true)?;
    // transformers' apply_chat_template(tokenize=True) adds no special tokens: the template has them.
    Ok(text.tokenizer.encode(&rendered, false)?)
}

fn check_context(model: &Llama, ids: &[u32], max_new_tokens: usize) -> Result<()> {
    let context = model.config.max_position_embeddings;
    if ids.len() > context {
        bail!(
            "the prompt has {} tokens but the model's context is {context} tokens; shorten it",
            ids.len()
        );
    }
    if ids.len().saturating_add(max_new_tokens) > context {
        eprintln!(
            "note: prompt ({}) + max_new_tokens ({max_new_tokens}) exceed the context ({context}); generation may stop early",
            ids.len()
        );
    }
    Ok(())
}

/// Streams generated tokens as text: incremental decoding, then stop strings.
struct TextSink<'a> {
    text: &'a TextModel,
    stream: DecodeStream,
    stops: StopStrings,
    out: String,
    print: bool,
    error: Option<cachet_text::TextError>,
}

impl<'a> TextSink<'a> {
    fn new(text: &'a TextModel, prompt: &[u32], stops: &[String], print: bool) -> Self {
        Self {
            text,
            stream: DecodeStream::with_context(true, prompt),
            stops: StopStrings::new(stops.iter().cloned()),
            out: String::new(),
            print,
            error: None,
        }
    }

    fn emit(&mut self, piece: &str) {
        let shown = self.stops.push(piece);
        self.show(&shown);
    }

    fn show(&mut self, shown: &str) {
        if shown.is_empty() {
            return;
        }
        self.out.push_str(shown);
        if self.print {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(shown.as_bytes());
            let _ = stdout.flush();
        }
    }

    /// Takes one step's token; false once a stop string was seen.
    fn step(&mut self, token: Option<u32>) -> bool {
        let Some(id) = token else { return true };
        match self.stream.step(&self.text.tokenizer, id) {
            Ok(Some(piece)) => self.emit(&piece),
            Ok(None) => {}
            Err(e) => {
                self.error = Some(e);
                return false;
            }
        }
        !self.stops.stopped()
    }

    fn finish(mut self) -> Result<String> {
        if let Some(e) = self.error {
            return Err(e.into());
        }
        if !self.stops.stopped() {
            let rest = self.stream.flush(&self.text.tokenizer)?;
            self.emit(&rest);
            let held = self.stops.flush();
            self.show(&held);
        }
        Ok(self.out)
    }
}

/// Runs `cachet generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let spec: DeviceSpec = args.device.parse()?;
    let device = spec.init()?;
    let precision: Precision = args.dtype.parse()?;

    let load_start = Instant::now();
    let (model, text, name) = match &args.model {
        Some(path) => {
            let (model, text) = load_any(path, &device, precision)
                .with_context(|| format!("loading model from {}", path.display()))?;
            (model, text, path.display().to_string())
        }
        None => (
            embedded::tiny_llama(&device, precision)?,
            Some(embedded_text()?),
            embedded::NAME.to_string(),
        ),
    };
    let load_seconds = load_start.elapsed().as_secs_f64();
    let text_mode = args.prompt.is_some() || args.messages.is_some() || args.chat;
    let text_model = match (&text, text_mode) {
        (Some(t), true) => Some(t),
        (None, true) => bail!(
            "{name} has no tokenizer (no tokenizer.json or GGUF tokenizer metadata): pass --prompt-ids"
        ),
        (_, false) => None,
    };
    let prompts = match text_model {
        Some(t) if !args.chat => {
            let messages = conversation(&args)?;
            if messages.is_empty() {
                bail!("--messages holds no messages");
            }
            vec![encode_conversation(t, &messages, args.raw)?]
        }
        Some(_) => Vec::new(),
        None => parse_prompts(&args.prompt_ids)?,
    };
    for prompt in &prompts {
        check_context(&model, prompt, args.max_new_tokens)?;
    }

    let default_generation_config = args
        .model
        .as_ref()
        .map(|m| m.join("generation_config.json"))
        .filter(|p| p.is_file());
    let mut config = match args
        .generation_config
        .as_ref()
        .or(default_generation_config.as_ref())
    {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str::<GenerationConfig>(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => GenerationConfig::default(),
    };
    config.max_new_tokens = args.max_new_tokens;
    config.num_beams = args.num_beams;
    config.num_return_sequences = args.num_return_sequences.unwrap_or(args.num_beams);
    config.do_sample = args.do_sample;
    config.temperature = args.temperature;
    config.top_k = args.top_k;
    config.top_p = args.top_p;
    config.seed = args.seed;
    config.max_cache_bytes = args.max_cache_bytes.or(config.max_cache_bytes);
    config.eos_token_id = if args.ignore_eos {
        None
    } else {
        let mut ids = config
            .eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_else(|| model.config.eos_ids());
        // The tokenizer's eos_token (e.g. a chat template's end-of-turn) ends a turn too.
        if let Some(id) = text.as_ref().and_then(TextModel::eos_token_id)
            && !ids.contains(&id)
        {
            ids.push(id);
        }
        Some(TokenIds::Many(ids))
    };
    if args.cache == "none" {
        config.use_cache = false;
    } else {
        config.cache_implementation = Some(args.cache.clone());
    }
    if let Some(text) = &args.cache_config {
        config.cache_config = Some(CacheConfig::from_json(text)?);
    }
    let windowless = model.cache_info().sliding_window.is_none();
    let window_given = config
        .cache_config
        .as_ref()
        .is_some_and(|c| c.sliding_window.is_some());
    if args.cache == "sliding_window" && windowless && !window_given {
        // A model without a window gets one from the cache; say so rather than fail.
        eprintln!(
            "note: {name} has no sliding_window; using a window of {DEFAULT_WINDOW} tokens (set it with --cache-config '{{\"sliding_window\": N}}')"
        );
        config
            .cache_config
            .get_or_insert_with(CacheConfig::default)
            .sliding_window = Some(DEFAULT_WINDOW);
    }

    if args.chat {
        let t = text_model.expect("chat needs a tokenizer, checked above");
        return chat(&args, &model, t, &config);
    }
    let streams = text_model.is_some() && config.num_beams == 1;
    let mut sink = text_model.map(|t| TextSink::new(t, &prompts[0], &args.stop, !args.json));
    let output = match sink.as_mut() {
        Some(sink) if streams => {
            generate_streaming(&model, &prompts, &config, None, &mut |step| {
                sink.step(step[0])
            })?
        }
        _ => generate(&model, &prompts, &config, None)?,
    };
    let generated_text = match (sink, text_model) {
        (Some(sink), Some(_)) if streams => Some(sink.finish()?),
        (_, Some(t)) => {
            // Beam search: decode the best sequence at the end, cut at a stop string.
            let mut stops = StopStrings::new(args.stop.iter().cloned());
            let mut s = stops.push(&t.tokenizer.decode(&output.sequences[0], true)?);
            s.push_str(&stops.flush());
            if !args.json {
                print!("{s}");
            }
            Some(s)
        }
        _ => None,
    };
    let tokens_per_second = output.tokens_per_second(prompts.len());
    if let (Some(_), false) = (&generated_text, args.json) {
        // The text went to stdout as it was generated; the statistics go to stderr.
        println!();
        eprintln!(
            "[{} tokens, {tokens_per_second:.1} tokens/s, prefill {:.3} s, cache {} holding {}]",
            output.sequences[0].len(),
            output.prefill.as_secs_f64(),
            output.cache,
            human_bytes(output.cache_bytes as u64)
        );
        return Ok(());
    }
    // Token ids given: the tokenizer, when there is one, still says what they read as.
    let generated_text = match (generated_text, &text) {
        (Some(t), _) => Some(t),
        (None, Some(t)) => Some(t.tokenizer.decode(&output.sequences[0], true)?),
        (None, None) => None,
    };
    if args.json {
        let tokens = if output.sequences.len() == 1 {
            serde_json::json!(output.sequences[0])
        } else {
            serde_json::json!(output.sequences)
        };
        let value = serde_json::json!({
            "model": name,
            "device": spec.to_string(),
            "dtype": precision.to_string(),
            "prompt_ids": prompts,
            "tokens": tokens,
            "sequences": output.sequences,
            "sequence_scores": output.sequence_scores,
            "num_tokens": output.sequences.iter().map(Vec::len).sum::<usize>(),
            "tokens_per_second": tokens_per_second,
            "prefill_seconds": output.prefill.as_secs_f64(),
            "total_seconds": output.elapsed.as_secs_f64(),
            "load_seconds": load_seconds,
            "cache": output.cache,
            "cache_bytes": output.cache_bytes,
        });
        let mut value = value;
        if let Some(text) = generated_text {
            value["text"] = serde_json::json!(text);
        }
        println!("{}", serde_json::to_string(&value)?);
    } else {
        println!("model:   {name} on {spec} ({precision})");
        for (i, sequence) in output.sequences.iter().enumerate() {
            let score = output
                .sequence_scores
                .as_ref()
                .map(|s| format!("  (score {:.4})", s[i]))
                .unwrap_or_default();
            println!("tokens:  {sequence:?}{score}");
        }
        if let Some(t) = &generated_text {
            let note = if args.model.is_none() {
                "  (random weights: arbitrary words)"
            } else {
                ""
            };
            println!("text:    {t:?}{note}");
        }
        println!(
            "speed:   {tokens_per_second:.1} tokens/s ({:.3} s, prefill {:.3} s)",
            output.elapsed.as_secs_f64(),
            output.prefill.as_secs_f64()
        );
        println!(
            "cache:   {} holding {}",
            output.cache,
            human_bytes(output.cache_bytes as u64)
        );
    }
    Ok(())
}

/// `--chat`: one user message per stdin line; the KV cache keeps the conversation so far, and
/// each turn feeds only the tokens past the longest prefix it already holds.
fn chat(
    args: &GenerateArgs,
    model: &Llama,
    text: &TextModel,
    config: &GenerationConfig,
) -> Result<()> {
    let implementation = match &config.cache_implementation {
        Some(name) => name.parse::<CacheImplementation>()?,
        None => CacheImplementation::Dynamic,
    };
    let context = model.config.max_position_embeddings;
    let mut cache: Box<dyn Cache> = build_cache(
        implementation,
        &config.cache_config.clone().unwrap_or_default(),
        &model.cache_info(),
        &model.device(),
        context,
    )?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::system(system.clone()));
    }
    // Ids whose keys and values the cache holds, in order.
    let mut cached: Vec<u32> = Vec::new();
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        let user = line.trim_end_matches(['\n', '\r']);
        if user.trim().is_empty() {
            continue;
        }
        messages.push(Message::user(user));
        let ids = encode_conversation(text, &messages, args.raw)?;
        if let Err(e) = check_context(model, &ids, args.max_new_tokens) {
            messages.pop();
            eprintln!("error: {e}");
            continue;
        }
        let common = cached.iter().zip(&ids).take_while(|(a, b)| a == b).count();
        let keep = common.min(ids.len() - 1);
        if keep < cache.seq_length(0) {
            if keep == 0 {
                cache.reset();
            } else {
                cache.crop(keep)?;
            }
        }
        let mut sink = TextSink::new(text, &ids, &args.stop, true);
        let output = generate_streaming(
            model,
            std::slice::from_ref(&ids),
            config,
            Some(cache.as_mut()),
            &mut |step| sink.step(step[0]),
        )?;
        let answer = sink.finish()?;
        println!();
        let generated = &output.sequences[0];
        cached = ids;
        cached.extend_from_slice(&generated[..generated.len().saturating_sub(1)]);
        messages.push(Message::assistant(answer));
    }
}
