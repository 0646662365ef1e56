//! Entry hashes and arch digests bit-exact with optimum-neuron 0.4.5 (goldens computed by
//! `xtask/goldens/compile_cache.py` with optimum-neuron's own code).

use cachet_compile::{CacheEntry, CacheLayout, pyjson};
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
    assert!(records.len() >= 9);
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
        ("torch_dtype", pyjson::Value::from("float16")),
        ("sequence_length", 2048.into()),
        ("tp_degree", 8.into()),
        ("compiler_version", "2.20.0".into()),
        ("compiler_flags", vec!["-O2"].into()),
        ("checkpoint_revision", "main".into()),
        ("optimum_neuron_version", "0.4.6".into()),
    ] {
        let mut n = neuron.clone();
        n.as_object_mut().unwrap().insert(key.into(), value);
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
fn python_only_numbers_hash_like_optimum_neuron() {
    let records = goldens();
    let by_name = |n: &str| records.iter().find(|r| r["name"] == n).unwrap();
    let special = by_name("python-special-numbers");
    let config = special["config_json"].as_str().unwrap();
    // Strict JSON parsers refuse what Python writes; pyjson reads it exactly.
    assert!(serde_json::from_str::<Value>(config).is_err());
    let text = special["serialized"].as_str().unwrap();
    for needle in [
        "\"nan\": NaN",
        "\"inf\": Infinity",
        "\"ninf\": -Infinity",
        "\"batch_size\": 1180591620717411303424",
        "\"max_position_embeddings\": 1000000000000000000000000000000",
        "-0.0",
    ] {
        assert!(text.contains(needle), "{needle} in {text}");
    }
    let entry = build(special);
    assert_eq!(entry.serialize(), text);
    assert!(
        entry.compile_config()["eps"].as_f64().unwrap().is_nan(),
        "NaN factor kept"
    );
    assert_eq!(entry.compile_config()["batch_size"].as_u64(), None);

    // Raw text: 1e400 reads as Infinity, -1e-400 as -0.0, -0 as 0, the last duplicate wins and
    // an int at Python's 4300-digit limit is kept exactly.
    let raw = by_name("python-json-text");
    let entry = build(raw);
    let text = raw["serialized"].as_str().unwrap();
    assert_eq!(entry.serialize(), text);
    for needle in [
        "\"overflow\": Infinity",
        "\"neg_overflow\": -Infinity",
        "\"underflow\": -0.0",
        "\"minus_zero_int\": 0",
        "\"dup\": NaN",
    ] {
        assert!(text.contains(needle), "{needle} in {text}");
    }
    assert_eq!(entry.config()["limit"].as_f64(), None, "beyond i128");
    match &entry.config()["limit"] {
        pyjson::Value::Int(i) => assert_eq!(i.digits(), pyjson::INT_MAX_STR_DIGITS),
        other => panic!("{other}"),
    }
    // One digit more and Python's json.loads refuses the config too.
    let over = raw["config_json"]
        .as_str()
        .unwrap()
        .replace("\"limit\": 1", "\"limit\": 10");
    let err = CacheEntry::from_json_text("gpt2", None, &over, None).unwrap_err();
    assert!(err.to_string().contains("4301 digits"), "{err}");

    // The changed factor misses: NaN vs Infinity, a big int vs its neighbour.
    let neuron = special["neuron_json"].as_str().unwrap();
    for (from, to) in [
        ("NaN", "Infinity"),
        ("1180591620717411303424", "1180591620717411303425"),
    ] {
        let other = CacheEntry::from_json_text(
            "org/special",
            Some("text-generation"),
            config,
            Some(&neuron.replacen(from, to, 1)),
        )
        .unwrap();
        assert_ne!(other.hash(), build(special).hash(), "{from} -> {to}");
    }
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
