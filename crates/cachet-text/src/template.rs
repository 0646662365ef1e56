//! Chat templates: the Jinja template of `tokenizer_config.json`, `chat_template.jinja` or a GGUF
//! file's `tokenizer.chat_template`, rendered with minijinja in the environment transformers'
//! `apply_chat_template` sets up (trim_blocks, lstrip_blocks, `raise_exception`, a Python-style
//! `tojson`, `strftime_now`, Python string methods).

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{Result, TextError, error::chain};

/// One chat message; `role` is `system`, `user`, `assistant` or whatever the template knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: String,
    /// What they say.
    pub content: String,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template with the special tokens its context provides.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
    /// Values passed to every render besides `messages` (`bos_token`, `eos_token`, …).
    pub special_tokens: Vec<(String, String)>,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; `origin` names where it came from in errors.
    pub fn new(source: impl Into<String>, origin: impl Into<String>) -> Result<Self> {
        let origin = origin.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.into())
            .map_err(|e| TextError::TemplateSyntax {
                origin: origin.clone(),
                reason: chain(&e),
            })?;
        Ok(Self {
            env,
            origin,
            special_tokens: Vec::new(),
        })
    }

    /// Renders `messages`; `add_generation_prompt` appends the header of the assistant's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(Value::from_serialize(messages), add_generation_prompt, &[])
    }

    /// Renders any message values (tool calls, lists of content parts) with extra context
    /// variables (`tools`, `documents`, …), as `apply_chat_template(**kwargs)` passes them.
    pub fn render_with(
        &self,
        messages: Value,
        add_generation_prompt: bool,
        extra: &[(&str, Value)],
    ) -> Result<String> {
        let mut ctx: std::collections::BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), messages);
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        for (k, v) in extra {
            ctx.insert((*k).to_string(), v.clone());
        }
        let template = self.env.get_template(NAME).expect("added in new");
        template
            .render(Value::from_serialize(&ctx))
            .map_err(|e| TextError::TemplateRender {
                origin: self.origin.clone(),
                reason: chain(&e),
            })
    }
}

/// Parses JSON into a template value keeping object key order (as Python's `json.load` does), so
/// `tojson` prints tools and messages in the order they were written.
pub fn json_value(text: &str) -> serde_json::Result<Value> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = <Ordered as serde::Deserialize>::deserialize(&mut de)?;
    de.end()?;
    Ok(v.0)
}

struct Ordered(Value);

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(OrderedVisitor)
    }
}

struct OrderedVisitor;

impl<'de> serde::de::Visitor<'de> for OrderedVisitor {
    type Value = Ordered;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Ordered, E> {
        Ok(Ordered(Value::from(v)))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Ordered, E> {
        Ok(Ordered(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Ordered, E> {
        Ok(Ordered(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Ordered, E> {
        Ok(Ordered(Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Ordered, E> {
        Ok(Ordered(Value::from(v)))
    }
    fn visit_unit<E>(self) -> std::result::Result<Ordered, E> {
        Ok(Ordered(Value::from(())))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Ordered, A::Error> {
        let mut items = Vec::new();
        while let Some(Ordered(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Ordered(Value::from(items)))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Ordered, A::Error> {
        let mut entries: Vec<(String, Value)> = Vec::new();
        while let Some((k, Ordered(v))) = map.next_entry::<String, Ordered>()? {
            entries.push((k, v));
        }
        Ok(Ordered(Value::from_iter(entries)))
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=…, separators=…, sort_keys=…)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None => Some(v.to_string()),
        },
    };
    let (item, key) = match separators {
        Some(v) if v.len() == Some(2) => (
            v.get_item(&Value::from(0))?.to_string(),
            v.get_item(&Value::from(1))?.to_string(),
        ),
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    py_dumps(
        &value,
        &Style {
            indent,
            item,
            key,
            sort_keys: sort_keys.unwrap_or(false),
        },
        0,
        &mut out,
    );
    Ok(Value::from_safe_string(out))
}

struct Style {
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
}

fn py_dumps(v: &Value, s: &Style, depth: usize, out: &mut String) {
    use minijinja::value::ValueKind as K;
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &s.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    let items: Vec<Value> = match v.kind() {
        K::Seq | K::Iterable | K::Map => v.try_iter().map(Iterator::collect).unwrap_or_default(),
        _ => Vec::new(),
    };
    match v.kind() {
        K::Seq | K::Iterable if !items.is_empty() => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&s.item);
                }
                newline(out, depth + 1);
                py_dumps(x, s, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        K::Seq | K::Iterable => out.push_str("[]"),
        K::Map if !items.is_empty() => {
            out.push('{');
            let mut keys = items;
            if s.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&s.item);
                }
                newline(out, depth + 1);
                out.push_str(&json_string(&k.to_string()));
                out.push_str(&s.key);
                py_dumps(&v.get_item(k).unwrap_or_default(), s, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        K::Map => out.push_str("{}"),
        K::String => out.push_str(&json_string(v.as_str().unwrap_or_default())),
        K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        K::Number if v.is_integer() => out.push_str(&v.to_string()),
        K::Number => {
            let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
            if f.is_nan() {
                out.push_str("NaN");
            } else if f.is_infinite() {
                out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
            } else if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&f.to_string());
            }
        }
        _ => out.push_str("null"),
    }
}

/// A JSON string literal with non-ASCII characters kept (`ensure_ascii=False`).
fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialise")
}

/// `strftime_now(format)`: the current UTC time formatted with the common strftime codes.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(secs, &format)
}

/// Formats Unix time `secs` (UTC) with `%Y %m %d %e %B %b %A %a %H %M %S %j %y %p %I %%`.
fn strftime(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let d = doy_mar - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", (h + 11) % 12 + 1)),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 15:05:09 UTC, a Friday.
        assert_eq!(
            strftime(1_722_006_309, "%d %b %Y %H:%M:%S %A %j"),
            "26 Jul 2024 15:05:09 Friday 208"
        );
    }

    #[test]
    fn raise_exception_is_a_render_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "test").unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
    }

    #[test]
    fn tojson_matches_python() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}", "test").unwrap();
        let x = serde_json::json!({"a": [1, 2.0], "é": "<b>"});
        let out = t
            .render_with(Value::from(()), false, &[("x", Value::from_serialize(&x))])
            .unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, 2.0], \"é\": \"<b>\"}|{\n  \"a\": [\n    1,\n    2.0\n  ],\n  \"é\": \"<b>\"\n}"
        );
    }
}
