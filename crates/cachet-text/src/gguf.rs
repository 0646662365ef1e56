//! Tokenizers from a GGUF file's `tokenizer.ggml.*` metadata, converted the way transformers'
//! GGUF loader converts them: `gpt2` (byte-level BPE from tokens + merges, the pre-tokenizer
//! regex picked by `tokenizer.ggml.pre`) and `llama` (SentencePiece BPE with byte fallback, merges
//! derived from tokens + scores).

use std::collections::HashMap;

use cachet_tensor::gguf::{Array, GgufFile};
use serde_json::{Value as Json, json};

use crate::{Result, TextError, Tokenizer};

/// What the GGUF metadata yields.
pub(crate) struct Parts {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub specials: Vec<(String, String)>,
}

/// llama.cpp's token types.
const NORMAL: i64 = 1;
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub(crate) fn build(file: &GgufFile) -> Result<Parts> {
    let origin = file.label().to_string();
    let err = |reason: String| TextError::Gguf {
        origin: origin.clone(),
        reason,
    };
    let get = |key: &str| file.get(key);
    let model = get("tokenizer.ggml.model")
        .and_then(|v| v.as_str())
        .ok_or_else(|| err("no tokenizer.ggml.model (this file carries no tokenizer)".into()))?
        .to_string();
    let tokens = get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .and_then(Array::as_strings)
        .ok_or_else(|| err("tokenizer.ggml.tokens is missing or not a list of strings".into()))?;
    let types: Vec<i64> = match get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
        Some(a) => (0..a.len())
            .map(|i| a.get(i).and_then(|v| v.as_i64()).unwrap_or(NORMAL))
            .collect(),
        None => vec![NORMAL; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let id = |key: &str| -> Result<Option<u32>> {
        match get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(i) if (i as usize) < tokens.len() => Ok(Some(i as u32)),
                _ => Err(err(format!(
                    "{key} is not a token id below {}",
                    tokens.len()
                ))),
            },
        }
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let unk = id("tokenizer.ggml.unknown_token_id")?;
    let pad = id("tokenizer.ggml.padding_token_id")?;
    let flag = |key: &str| get(key).and_then(|v| v.as_bool());

    let mut added = Vec::new();
    for (i, (token, &ty)) in tokens.iter().zip(&types).enumerate() {
        let special =
            matches!(ty, CONTROL | UNKNOWN) || Some(i as u32) == bos || Some(i as u32) == eos;
        if special || ty == USER_DEFINED {
            added.push(json!({
                "id": i, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": !special, "special": special,
            }));
        }
    }
    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama");
    let add_eos = flag("tokenizer.ggml.add_eos_token").unwrap_or(false);
    let mut single = Vec::new();
    let mut special_tokens = serde_json::Map::new();
    let mut piece = |id: Option<u32>, single: &mut Vec<Json>| {
        if let Some(id) = id {
            let t = &tokens[id as usize];
            single.push(json!({"SpecialToken": {"id": t, "type_id": 0}}));
            special_tokens.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
    };
    if add_bos {
        piece(bos, &mut single);
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if add_eos {
        piece(eos, &mut single);
    }
    let post_processor = json!({
        "type": "TemplateProcessing", "single": single,
        "pair": single.iter().cloned().chain([json!({"Sequence": {"id": "B", "type_id": 1}})]).collect::<Vec<_>>(),
        "special_tokens": special_tokens,
    });
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();

    let tokenizer_json = match model.as_str() {
        "gpt2" => {
            let merges = get("tokenizer.ggml.merges")
                .and_then(|v| v.as_array())
                .and_then(Array::as_strings)
                .ok_or_else(|| err("tokenizer.ggml.merges is missing (needed by gpt2)".into()))?;
            let pre = get("tokenizer.ggml.pre")
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            let split = |regex: &str| {
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
                ]})
            };
            // Unknown pre-tokenizer names fall back to GPT-2's regex, as llama.cpp does.
            let pre_tokenizer = match pre {
                "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" | "falcon3" => split(LLAMA3_REGEX),
                "qwen2" | "deepseek-r1-qwen" => split(QWEN2_REGEX),
                _ => {
                    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
                }
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added, "normalizer": null,
                "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": false, "byte_fallback": false, "ignore_merges": pre != "default" && pre != "gpt2" && pre != "smollm",
                    "vocab": vocab, "merges": merges},
            })
        }
        "llama" => {
            let scores: Vec<f64> = match get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
                Some(a) => (0..a.len())
                    .map(|i| a.get(i).and_then(|v| v.as_f64()).unwrap_or(0.0))
                    .collect(),
                None => {
                    return Err(err(
                        "tokenizer.ggml.scores is missing (needed by llama)".into()
                    ));
                }
            };
            let merges = spm_merges(tokens, &types, &scores);
            let space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
            // As transformers' GGUF conversion builds it: `LlamaTokenizer`'s Metaspace
            // pre-tokenizer (a prefix `▁` only where the text does not start with one, so "  hi"
            // is "▁▁hi"), except Phi-3, whose prefix comes from a normalizer ("▁▁▁hi").
            let (normalizer, pre_tokenizer) = if file.architecture() == Some("phi3") {
                let mut normalizers = Vec::new();
                if space_prefix {
                    normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
                }
                normalizers.push(
                    json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
                );
                (
                    json!({"type": "Sequence", "normalizers": normalizers}),
                    Json::Null,
                )
            } else {
                let scheme = if space_prefix { "first" } else { "never" };
                (
                    Json::Null,
                    json!({"type": "Metaspace", "replacement": "\u{2581}",
                        "prepend_scheme": scheme, "split": false}),
                )
            };
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added,
                "normalizer": normalizer,
                "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {"type": "BPE", "dropout": null,
                    "unk_token": unk.map(|u| tokens[u as usize].clone()),
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                    "vocab": vocab, "merges": merges},
            })
        }
        other => {
            return Err(err(format!(
                "tokenizer.ggml.model {other:?} is not supported (gpt2 and llama are)"
            )));
        }
    };
    let text = serde_json::to_string(&tokenizer_json).map_err(|e| err(e.to_string()))?;
    let tokenizer = Tokenizer::from_json_str(&text, origin.clone())?;
    let mut specials = Vec::new();
    for (key, id) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("unk_token", unk),
        ("pad_token", pad),
    ] {
        if let Some(id) = id {
            specials.push((key.to_string(), tokens[id as usize].clone()));
        }
    }
    let chat_template = get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    Ok(Parts {
        tokenizer,
        chat_template,
        specials,
    })
}

/// BPE merges of a SentencePiece vocabulary: every split of a normal piece into two pieces of
/// the vocabulary, the highest-scoring merged piece first (tokenizers' SentencePieceExtractor).
fn spm_merges(tokens: &[String], types: &[i64], scores: &[f64]) -> Vec<[String; 2]> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if types[i] != NORMAL && types[i] != USER_DEFINED {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((scores.get(i).copied().unwrap_or(0.0), i, li, ri));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    merges
        .into_iter()
        .map(|(_, _, l, r)| [tokens[l].clone(), tokens[r].clone()])
        .collect()
}
