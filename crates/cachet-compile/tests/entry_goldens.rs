//! Entry hashes and arch digests bit-exact with optimum-neuron 0.4.5 (goldens computed by
//! `xtask/goldens/compile_cache.py` with optimum-neuron's own code).

use cachet_compile::{CacheEntry, CacheLayout};
use serde_json::Value;

fn goldens() -> Vec<Value> {
    let text = include_str!("fixtures/entry_hashes.json");
    let doc: Value = serde_json::from_str(text).unwrap();
    assert_eq!(doc["optimum_neuron_version"], "0.4.5");
    doc["entries"].as_array().unwrap().clone()
}

fn build(record: &Value) -> CacheEntry {
    CacheEntry::from_json_text(
        record["model_id"].as_str().unwrap(),
        record["task"].as_str(),
        record["config_json"].as_str().unwrap(),
        record["neuron_json"].as_str(),
    )
    .unwrap()
}

#[test]
fn serialisation_hash_and_arch_digest_match_optimum_neuron() {
    let records = goldens();
    assert!(records.len() >= 7);
    for record in &records {
        let name = record["name"].as_str().unwrap();
        let entry = build(record);
        assert_eq!(
            entry.serialize(),
            record["serialized"].as_str().unwrap(),
            "serialisation of {name}"
        );
        assert_eq!(
            entry.hash(),
            record["hash"].as_str().unwrap(),
            "hash of {name}"
        );
        assert_eq!(
            entry.arch_digest(),
            record["arch_digest"].as_str().unwrap(),
            "arch digest of {name}"
        );
        assert_eq!(entry.model_type(), record["model_type"].as_str().unwrap());
    }
}

#[test]
fn registry_round_trip_keeps_the_hash() {
    for record in goldens() {
        let entry = build(&record);
        let again = CacheEntry::deserialize(&entry.serialize(), "test").unwrap();
        assert_eq!(again, entry);
        assert_eq!(again.hash(), record["hash"].as_str().unwrap());
        // optimum-neuron's own serialised text parses to the same entry.
        let theirs =
            CacheEntry::deserialize(record["serialized"].as_str().unwrap(), "golden").unwrap();
        assert_eq!(theirs.hash(), entry.hash());
    }
}

#[test]
fn any_changed_factor_misses_and_volatile_keys_do_not() {
    let records = goldens();
    let base = build(&records[0]);
    let by_name = |n: &str| build(records.iter().find(|r| r["name"] == n).unwrap());
    assert_ne!(
        base.hash(),
        by_name("llama-batch-1").hash(),
        "batch size is a factor"
    );
    assert_eq!(
        base.arch_digest(),
        by_name("llama-batch-1").arch_digest(),
        "same architecture"
    );
    assert_ne!(
        base.hash(),
        by_name("llama-no-task").hash(),
        "task is a factor"
    );
    assert_ne!(base.arch_digest(), by_name("llama-no-task").arch_digest());

    // Volatile keys do not change anything.
    let mut config: Value =
        serde_json::from_str(records[0]["config_json"].as_str().unwrap()).unwrap();
    config["transformers_version"] = "9.9.9".into();
    config["_name_or_path"] = "/some/local/dir".into();
    config["eos_token_id"] = 7.into();
    let neuron =
        cachet_compile::pyjson::loads(records[0]["neuron_json"].as_str().unwrap()).unwrap();
    let same = CacheEntry::new(
        "meta-llama/Llama-3.2-1B",
        Some("text-generation"),
        config.clone(),
        Some(neuron.clone()),
    )
    .unwrap();
    assert_eq!(same.hash(), base.hash());

    // Each model, compilation and environment factor changes the hash.
    let mut variants = Vec::new();
    for (key, value) in [
        ("torch_dtype", Value::from("float16")),
        ("sequence_length", 2048.into()),
        ("tp_degree", 8.into()),
        ("compiler_version", "2.20.0".into()),
        ("compiler_flags", serde_json::json!(["-O2"])),
        ("checkpoint_revision", "main".into()),
        ("optimum_neuron_version", "0.4.6".into()),
    ] {
        let mut n = neuron.clone();
        n[key] = value;
        variants.push(
            CacheEntry::new(
                "meta-llama/Llama-3.2-1B",
                Some("text-generation"),
                config.clone(),
                Some(n),
            )
            .unwrap(),
        );
    }
    let mut c = config.clone();
    c["num_hidden_layers"] = 8.into();
    variants.push(
        CacheEntry::new(
            "meta-llama/Llama-3.2-1B",
            Some("text-generation"),
            c,
            Some(neuron.clone()),
        )
        .unwrap(),
    );
    variants.push(
        CacheEntry::new(
            "my-org/Llama-3.2-1B",
            Some("text-generation"),
            config,
            Some(neuron),
        )
        .unwrap(),
    );
    let mut hashes: Vec<String> = variants.iter().map(|e| e.hash()).collect();
    hashes.push(base.hash());
    let n = hashes.len();
    hashes.sort();
    hashes.dedup();
    assert_eq!(hashes.len(), n, "every factor must change the hash");
}

#[test]
fn layout_paths_are_optimum_neurons() {
    let entry = build(&goldens()[0]);
    let layout = CacheLayout::neuron("2.19.8089.0+8ab9f450");
    assert_eq!(
        layout.module_dir("abc"),
        "neuronxcc-2.19.8089.0+8ab9f450/MODULE_abc"
    );
    assert_eq!(
        layout.registry_path(&entry),
        format!(
            "neuronxcc-2.19.8089.0+8ab9f450/0_REGISTRY/0.4.5/{}/{}.json",
            entry.arch_digest(),
            entry.hash()
        )
    );
    assert_eq!(
        layout.alias_path(&entry),
        format!(
            "neuronxcc-2.19.8089.0+8ab9f450/0_REGISTRY/0.4.5/llama/meta-llama/Llama-3.2-1B/{}.json",
            entry.hash()
        )
    );
}

#[test]
fn bad_configs_are_typed_errors() {
    let err = CacheEntry::new("m", None, serde_json::json!([1]), None).unwrap_err();
    assert!(err.to_string().contains("not a JSON object"), "{err}");
    let err = CacheEntry::new("m", None, serde_json::json!({"a": 1}), None).unwrap_err();
    assert!(err.to_string().contains("model_type"), "{err}");
    let err = CacheEntry::deserialize("{not json", "hub:x.json").unwrap_err();
    assert!(err.to_string().contains("hub:x.json"), "{err}");
}
