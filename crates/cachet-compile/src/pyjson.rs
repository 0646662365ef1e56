//! Python's `json.dumps`, byte for byte, for the values a model config holds.
//!
//! optimum-neuron hashes the text `json.dumps` produces, so the hash only matches when every byte
//! does: `ensure_ascii` escaping (`\u00e9`, surrogate pairs above U+FFFF), Python's float `repr`
//! (`1e-05`, `1e+16`, `0.1`, `100.0`), the `(", ", ": ")` or indented `(",", ": ")` separators
//! and `sort_keys` ordering by code point.

use serde_json::{Number, Value};

/// Options of Python's `json.dumps` that optimum-neuron uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DumpOptions {
    /// `indent=N`: newline plus `N` spaces per level, and `","` as item separator.
    pub indent: Option<usize>,
    /// `sort_keys=True`: object keys in code-point order.
    pub sort_keys: bool,
}

impl DumpOptions {
    /// `json.dumps(obj, indent=2, sort_keys=True)`: the entry serialisation that is hashed.
    pub const ENTRY: Self = Self {
        indent: Some(2),
        sort_keys: true,
    };
    /// `json.dumps(obj, sort_keys=True)`: the architecture digest text.
    pub const COMPACT_SORTED: Self = Self {
        indent: None,
        sort_keys: true,
    };
}

/// Serialises `value` exactly as Python's `json.dumps(value, ensure_ascii=True, ...)` would.
pub fn dumps(value: &Value, options: DumpOptions) -> String {
    let mut out = String::with_capacity(256);
    write_value(&mut out, value, options, 0);
    out
}

fn newline(out: &mut String, indent: usize, level: usize) {
    out.push('\n');
    for _ in 0..indent * level {
        out.push(' ');
    }
}

fn write_value(out: &mut String, value: &Value, options: DumpOptions, level: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(if options.indent.is_some() { "," } else { ", " });
                }
                if let Some(indent) = options.indent {
                    newline(out, indent, level + 1);
                }
                write_value(out, item, options, level + 1);
            }
            if let Some(indent) = options.indent {
                newline(out, indent, level);
            }
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if options.sort_keys {
                // Rust orders `str` by UTF-8 bytes, which is code-point order, like Python.
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(if options.indent.is_some() { "," } else { ", " });
                }
                if let Some(indent) = options.indent {
                    newline(out, indent, level + 1);
                }
                write_string(out, key);
                out.push_str(": ");
                write_value(out, item, options, level + 1);
            }
            if let Some(indent) = options.indent {
                newline(out, indent, level);
            }
            out.push('}');
        }
    }
}

fn write_string(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        out.push_str(&i.to_string());
    } else if let Some(u) = n.as_u64() {
        out.push_str(&u.to_string());
    } else if let Some(f) = n.as_f64() {
        out.push_str(&float_repr(f));
    }
}

/// Python's `float.__repr__`: shortest round-trip digits, fixed notation for decimal exponents
/// in `-4..16`, otherwise `d.ddde±XX`; `NaN`/`Infinity` as `json.dumps` writes them.
pub fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` prints the shortest round-tripping digits, like Python's repr.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` exponent is an integer");
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::with_capacity(digits.len() + 8);
    if negative {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp < 0 {
            out.push_str("0.");
            for _ in 0..(-exp - 1) {
                out.push('0');
            }
            out.push_str(&digits);
        } else {
            let point = exp as usize + 1;
            if digits.len() > point {
                out.push_str(&digits[..point]);
                out.push('.');
                out.push_str(&digits[point..]);
            } else {
                out.push_str(&digits);
                for _ in digits.len()..point {
                    out.push('0');
                }
                out.push_str(".0");
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.abs()));
    }
    out
}

/// A JSON text that Python's `json.loads` would read differently than we can represent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JSON error at byte {offset}: {message}")]
pub struct LoadError {
    /// Byte offset in the text.
    pub offset: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses JSON text like Python's `json.loads`, with correctly rounded floats (Rust's `f64`
/// parser) so the re-serialised text and hash match Python's, independent of serde_json's
/// float-parsing features. Integers beyond 64 bits and `NaN`/`Infinity` are refused rather than
/// silently hashed differently.
pub fn loads(text: &str) -> Result<Value, LoadError> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
        depth: 0,
    };
    p.ws();
    let v = p.value()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(p.err("extra data after the JSON value"));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn err(&self, message: &str) -> LoadError {
        LoadError {
            offset: self.i,
            message: message.to_owned(),
        }
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &str) -> bool {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Result<Value, LoadError> {
        self.depth += 1;
        if self.depth > 512 {
            return Err(self.err("nesting too deep"));
        }
        let v = match self.s.get(self.i) {
            None => Err(self.err("unexpected end of text")),
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => self.string().map(Value::String),
            Some(b't') if self.eat("true") => Ok(Value::Bool(true)),
            Some(b'f') if self.eat("false") => Ok(Value::Bool(false)),
            Some(b'n') if self.eat("null") => Ok(Value::Null),
            Some(b'N' | b'I') => Err(self.err("NaN/Infinity are not supported in hashed configs")),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("expected a JSON value")),
        };
        self.depth -= 1;
        v
    }

    fn object(&mut self) -> Result<Value, LoadError> {
        self.i += 1;
        let mut map = serde_json::Map::new();
        self.ws();
        if self.eat("}") {
            return Ok(Value::Object(map));
        }
        loop {
            self.ws();
            if self.s.get(self.i) != Some(&b'"') {
                return Err(self.err("expected a string key"));
            }
            let key = self.string()?;
            self.ws();
            if !self.eat(":") {
                return Err(self.err("expected ':'"));
            }
            self.ws();
            let v = self.value()?;
            map.insert(key, v); // duplicate keys: the last wins, as in Python
            self.ws();
            if self.eat(",") {
                continue;
            }
            if self.eat("}") {
                return Ok(Value::Object(map));
            }
            return Err(self.err("expected ',' or '}'"));
        }
    }

    fn array(&mut self) -> Result<Value, LoadError> {
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.eat("]") {
            return Ok(Value::Array(items));
        }
        loop {
            self.ws();
            items.push(self.value()?);
            self.ws();
            if self.eat(",") {
                continue;
            }
            if self.eat("]") {
                return Ok(Value::Array(items));
            }
            return Err(self.err("expected ',' or ']'"));
        }
    }

    fn hex4(&mut self) -> Result<u32, LoadError> {
        let h = self
            .s
            .get(self.i..self.i + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| self.err("invalid \\u escape"))?;
        self.i += 4;
        Ok(h)
    }

    fn string(&mut self) -> Result<String, LoadError> {
        self.i += 1;
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.i < self.s.len() && !matches!(self.s[self.i], b'"' | b'\\') {
                if self.s[self.i] < 0x20 {
                    return Err(self.err("control character in string"));
                }
                self.i += 1;
            }
            out.push_str(
                std::str::from_utf8(&self.s[start..self.i])
                    .map_err(|_| self.err("invalid UTF-8"))?,
            );
            match self.s.get(self.i) {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                _ => {}
            }
            self.i += 1; // backslash
            let c = *self
                .s
                .get(self.i)
                .ok_or_else(|| self.err("unterminated escape"))?;
            self.i += 1;
            match c {
                b'"' => out.push('"'),
                b'\\' => out.push('\\'),
                b'/' => out.push('/'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let hi = self.hex4()?;
                    let code =
                        if (0xD800..0xDC00).contains(&hi) && self.s[self.i..].starts_with(b"\\u") {
                            let save = self.i;
                            self.i += 2;
                            let lo = self.hex4()?;
                            if (0xDC00..0xE000).contains(&lo) {
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else {
                                self.i = save;
                                hi
                            }
                        } else {
                            hi
                        };
                    // Python keeps lone surrogates; a Rust String cannot hold them.
                    out.push(
                        char::from_u32(code).ok_or_else(|| self.err("lone surrogate in string"))?,
                    );
                }
                _ => return Err(self.err("invalid escape")),
            }
        }
    }

    fn number(&mut self) -> Result<Value, LoadError> {
        let start = self.i;
        let digits = |p: &mut Self| {
            let s = p.i;
            while p.i < p.s.len() && p.s[p.i].is_ascii_digit() {
                p.i += 1;
            }
            p.i - s
        };
        if self.s[self.i] == b'-' {
            self.i += 1;
        }
        let int_start = self.i;
        if digits(self) == 0 {
            return Err(self.err("expected digits"));
        }
        if self.s[int_start] == b'0' && self.i - int_start > 1 {
            return Err(self.err("leading zeros are not JSON"));
        }
        let mut float = false;
        if self.s.get(self.i) == Some(&b'.') {
            self.i += 1;
            float = true;
            if digits(self) == 0 {
                return Err(self.err("expected fraction digits"));
            }
        }
        if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            float = true;
            if matches!(self.s.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return Err(self.err("expected exponent digits"));
            }
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).expect("ASCII");
        if float {
            let f: f64 = text.parse().map_err(|_| self.err("invalid number"))?;
            return Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| self.err("number out of range (Python reads inf)"));
        }
        if let Ok(i) = text.parse::<i64>() {
            Ok(Value::from(i))
        } else if let Ok(u) = text.parse::<u64>() {
            Ok(Value::from(u))
        } else {
            Err(self.err("integer beyond 64 bits (Python keeps it exact; not supported)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn float_repr_matches_python() {
        for (f, py) in [
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (0.1, "0.1"),
            (100.0, "100.0"),
            (-2.5e-7, "-2.5e-07"),
            (1.5e300, "1.5e+300"),
            (5e-324, "5e-324"),
            (0.3333333333333333, "0.3333333333333333"),
            (-0.0, "-0.0"),
            (1e100, "1e+100"),
        ] {
            assert_eq!(float_repr(f), py, "{f}");
        }
    }

    #[test]
    fn loads_is_exact_and_strict() {
        for text in [
            "2.2250738585072014e-308",
            "0.30000000000000004",
            "1.7976931348623157e308",
            "9007199254740993.0",
            "12345.678e-10",
            "5e-324",
            "0.1e1",
        ] {
            let v = loads(text).unwrap();
            assert_eq!(v.as_f64().unwrap(), text.parse::<f64>().unwrap(), "{text}");
        }
        assert_eq!(
            loads(r#"{"a": "\u00e9\ud83d\ude00", "a": 2}"#).unwrap(),
            json!({"a": 2})
        );
        assert_eq!(loads(r#""\ud83d\ude00""#).unwrap(), json!("😀"));
        for bad in [
            "NaN",
            "1e400",
            "18446744073709551616",
            "[1,]",
            "01",
            "\"\\ud800\"",
            "{} x",
        ] {
            assert!(loads(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dumps_matches_python_layouts() {
        let v = json!({"b": [1, 2.0, {"z": null}], "a": "é😀\u{7f}\"\\\n", "c": {}, "d": []});
        assert_eq!(
            dumps(&v, DumpOptions::COMPACT_SORTED),
            r#"{"a": "\u00e9\ud83d\ude00\u007f\"\\\n", "b": [1, 2.0, {"z": null}], "c": {}, "d": []}"#
        );
        assert_eq!(
            dumps(&v, DumpOptions::ENTRY),
            "{\n  \"a\": \"\\u00e9\\ud83d\\ude00\\u007f\\\"\\\\\\n\",\n  \"b\": [\n    1,\n    2.0,\n    {\n      \"z\": null\n    }\n  ],\n  \"c\": {},\n  \"d\": []\n}"
        );
    }
}
