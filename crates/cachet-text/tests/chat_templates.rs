//! Chat templates render exactly what transformers' `apply_chat_template(tokenize=False)` renders
//! (goldens from xtask/goldens/chat_templates.py).

use std::path::Path;

use cachet_text::ChatTemplate;
use cachet_text::Value;

#[test]
fn templates_match_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let goldens: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("chat_templates.json")).unwrap())
            .unwrap();
    let specials = vec![
        (
            "bos_token".to_string(),
            goldens["bos_token"].as_str().unwrap().to_string(),
        ),
        (
            "eos_token".to_string(),
            goldens["eos_token"].as_str().unwrap().to_string(),
        ),
    ];
    let text = std::fs::read_to_string(dir.join("chat_templates.json")).unwrap();
    let ordered = cachet_text::json_value(&text).unwrap();
    let cases = goldens["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for (i, case) in cases.iter().enumerate() {
        let ordered_case = ordered
            .get_attr("cases")
            .unwrap()
            .get_item(&Value::from(i))
            .unwrap();
        let name = case["template"].as_str().unwrap();
        let source = std::fs::read_to_string(dir.join(name)).unwrap();
        let mut template = ChatTemplate::new(source, name).unwrap();
        template.special_tokens = specials.clone();
        let tools = ordered_case.get_attr("tools").unwrap();
        let extra: Vec<(&str, Value)> = if case["tools"].is_null() {
            Vec::new()
        } else {
            vec![("tools", tools)]
        };
        let out = template
            .render_with(
                ordered_case.get_attr("messages").unwrap(),
                case["add_generation_prompt"].as_bool().unwrap(),
                &extra,
            )
            .unwrap();
        assert_eq!(
            out,
            case["expected"].as_str().unwrap(),
            "{name}: {}",
            case["messages"]
        );
    }
}

#[test]
fn typed_messages_render_like_json_ones() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let t = ChatTemplate::new(
        std::fs::read_to_string(dir.join("smollm2.jinja")).unwrap(),
        "smollm2",
    )
    .unwrap();
    let out = t
        .render(
            &[cachet_text::Message::user("What is the capital of France?")],
            true,
        )
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn render_errors_name_the_template() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let t = ChatTemplate::new(
        std::fs::read_to_string(dir.join("controls.jinja")).unwrap(),
        "controls.jinja",
    )
    .unwrap();
    let err = t.render(&[], true).unwrap_err().to_string();
    assert!(
        err.contains("controls.jinja") && err.contains("at least one message is required"),
        "{err}"
    );
    let err = ChatTemplate::new("{% for %}", "broken.jinja")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("broken.jinja") && err.contains("does not parse"),
        "{err}"
    );
}
