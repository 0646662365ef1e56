//! The Llama family's module layout, spelled once: the projections and norms `load_with` builds,
//! and the [`QuantizableModel`] description quantizers read from it.

use std::collections::BTreeSet;

use cachet_nn::{LinearSpec, QuantizableModel};

use super::config::LlamaConfig;
use super::model::Llama;

/// Token embeddings (`{EMBED_TOKENS}.weight`, `[vocab, hidden]`).
pub(super) const EMBED_TOKENS: &str = "model.embed_tokens";
/// Final norm before the head.
pub(super) const FINAL_NORM: &str = "model.norm";
/// Output projection, absent when tied to the embeddings.
pub(super) const LM_HEAD: &str = "lm_head";
/// Rotary embedding module: no weights, but a name a `device_map` may use.
const ROTARY_EMB: &str = "model.rotary_emb";

/// Module prefix of decoder layer `i`.
pub(super) fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

/// The two norms of decoder layer `i`: before attention and before the MLP.
pub(super) fn layer_norms(i: usize) -> [String; 2] {
    let p = layer_prefix(i);
    [
        format!("{p}.input_layernorm"),
        format!("{p}.post_attention_layernorm"),
    ]
}

/// The projections of one decoder layer as `load_with` builds them.
pub(super) struct LayerProjections {
    pub(super) q_proj: LinearSpec,
    pub(super) k_proj: LinearSpec,
    pub(super) v_proj: LinearSpec,
    pub(super) o_proj: LinearSpec,
    pub(super) gate_proj: LinearSpec,
    pub(super) up_proj: LinearSpec,
    pub(super) down_proj: LinearSpec,
}

impl LayerProjections {
    /// Decoder layer `i` of `config`: names, widths and biases.
    pub(super) fn new(config: &LlamaConfig, i: usize) -> Self {
        let p = layer_prefix(i);
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        let q_out = config.num_attention_heads * config.head_dim();
        let kv_out = config.kv_heads() * config.head_dim();
        let spec = |name: &str, in_features, out_features, bias| LinearSpec {
            name: format!("{p}.{name}"),
            in_features,
            out_features,
            bias,
        };
        let (qkv_bias, mlp_bias) = (config.qkv_bias(), config.mlp_bias);
        Self {
            q_proj: spec("self_attn.q_proj", hidden, q_out, qkv_bias),
            k_proj: spec("self_attn.k_proj", hidden, kv_out, qkv_bias),
            v_proj: spec("self_attn.v_proj", hidden, kv_out, qkv_bias),
            o_proj: spec("self_attn.o_proj", q_out, hidden, config.o_bias()),
            gate_proj: spec("mlp.gate_proj", hidden, inter, mlp_bias),
            up_proj: spec("mlp.up_proj", hidden, inter, mlp_bias),
            down_proj: spec("mlp.down_proj", inter, hidden, mlp_bias),
        }
    }

    /// The seven projections in load order.
    fn into_vec(self) -> Vec<LinearSpec> {
        vec![
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.o_proj,
            self.gate_proj,
            self.up_proj,
            self.down_proj,
        ]
    }
}

/// The output projection of `config`; `None` when tied to the embeddings.
pub(super) fn lm_head(config: &LlamaConfig) -> Option<LinearSpec> {
    (!config.tie_word_embeddings).then(|| LinearSpec {
        name: LM_HEAD.to_string(),
        in_features: config.hidden_size,
        out_features: config.vocab_size,
        bias: false,
    })
}

impl QuantizableModel for Llama {
    fn projections(config: &LlamaConfig) -> Vec<LinearSpec> {
        let mut out: Vec<LinearSpec> = (0..config.num_hidden_layers)
            .flat_map(|i| LayerProjections::new(config, i).into_vec())
            .collect();
        out.extend(lm_head(config));
        out
    }

    fn other_modules(config: &LlamaConfig) -> Vec<String> {
        let mut out = vec![EMBED_TOKENS.to_string()];
        out.extend((0..config.num_hidden_layers).flat_map(layer_norms));
        out.push(FINAL_NORM.to_string());
        out
    }

    fn module_names(config: &LlamaConfig) -> BTreeSet<String> {
        let projections = Self::projections(config);
        let others = Self::other_modules(config);
        let mut out = cachet_nn::module_prefixes(
            projections
                .iter()
                .map(|s| s.name.as_str())
                .chain(others.iter().map(String::as_str)),
        );
        // Named even with no decoder layer, and the weightless rotary embedding.
        out.insert("model.layers".to_string());
        out.insert(ROTARY_EMB.to_string());
        out
    }

    fn tied_weights(config: &LlamaConfig) -> Vec<String> {
        if config.tie_word_embeddings {
            vec![format!("{LM_HEAD}.weight")]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: usize, tied: bool) -> LlamaConfig {
        let json = format!(
            r#"{{"model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
                "num_attention_heads": 2, "num_key_value_heads": 1,
                "num_hidden_layers": {layers}, "vocab_size": 10, "tie_word_embeddings": {tied}}}"#
        );
        LlamaConfig::from_json(&json, "test").unwrap()
    }

    #[test]
    fn projections_follow_the_checkpoint_layout() {
        let c = config(2, false);
        let specs = Llama::projections(&c);
        assert_eq!(specs.len(), 2 * 7 + 1);
        assert_eq!(specs[0].name, "model.layers.0.self_attn.q_proj");
        assert_eq!((specs[1].in_features, specs[1].out_features), (8, 4));
        assert_eq!(specs[6].name, "model.layers.0.mlp.down_proj");
        assert_eq!((specs[6].in_features, specs[6].out_features), (16, 8));
        assert_eq!(specs[14].name, "lm_head");
        assert!(Llama::tied_weights(&c).is_empty());

        let tied = config(1, true);
        assert_eq!(Llama::projections(&tied).len(), 7);
        assert_eq!(
            Llama::tied_weights(&tied),
            vec!["lm_head.weight".to_string()]
        );
    }

    #[test]
    fn module_names_cover_every_placeable_prefix() {
        let names = Llama::module_names(&config(1, false));
        for name in [
            "model",
            "model.embed_tokens",
            "model.norm",
            "model.layers",
            "model.rotary_emb",
            "model.layers.0",
            "model.layers.0.self_attn",
            "model.layers.0.mlp.up_proj",
            "model.layers.0.input_layernorm",
            "model.layers.0.post_attention_layernorm",
            "lm_head",
        ] {
            assert!(names.contains(name), "{name}");
        }
        assert_eq!(
            Llama::other_modules(&config(1, false)),
            [
                "model.embed_tokens",
                "model.layers.0.input_layernorm",
                "model.layers.0.post_attention_layernorm",
                "model.norm",
            ]
        );
        let mut empty = config(1, true);
        empty.num_hidden_layers = 0;
        assert!(Llama::module_names(&empty).contains("model.layers"));
    }
}
