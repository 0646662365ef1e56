//! Python's `json` module, byte for byte, for the values a model config holds.
//!
//! optimum-neuron hashes the text `json.dumps` produces, so the hash only matches when every byte
//! does: `ensure_ascii` escaping (`\u00e9`, surrogate pairs above U+FFFF), Python's float `repr`
//! (`1e-05`, `1e+16`, `0.1`, `100.0`), the `(", ", ": ")` or indented `(",", ": ")` separators
//! and `sort_keys` ordering by code point.
//!
//! [`Value`] holds everything Python's `json.loads` returns and `json.dumps` writes, which
//! `serde_json::Value` cannot: `NaN`, `Infinity` and `-Infinity` floats (and numbers that
//! overflow to them, like `1e400`), `-0.0`, and integers of any size (up to Python's default
//! 4300-digit conversion limit, beyond which Python refuses them too).

use std::collections::BTreeMap;
use std::fmt;

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// A JSON object. Keys are kept in code-point order (what `sort_keys=True` writes).
pub type Map = BTreeMap<String, Value>;

/// Python's limit on the digits of an `int` converted from or to text
/// (`sys.get_int_max_str_digits()`, 4300 by default since Python 3.11).
pub const INT_MAX_STR_DIGITS: usize = 4300;

/// A value as Python's `json.loads` returns it.
#[derive(Debug, Clone)]
pub enum Value {
    /// `None`.
    Null,
    /// `True` / `False`.
    Bool(bool),
    /// An `int` of any size.
    Int(Int),
    /// A `float`, including `nan`, `inf`, `-inf` and `-0.0`.
    Float(f64),
    /// A `str`.
    String(String),
    /// A `list`.
    Array(Vec<Value>),
    /// A `dict` with string keys.
    Object(Map),
}

/// An exact Python `int`: its canonical decimal text (no leading zeros, no `-0`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Int(String);

impl Int {
    /// Parses decimal digits with an optional leading `-`, as `int(text)` would for JSON text.
    pub fn parse(text: &str) -> Option<Self> {
        let (negative, digits) = match text.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, text),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = digits.trim_start_matches('0');
        Some(Self(match (digits.is_empty(), negative) {
            (true, _) => "0".to_owned(),
            (false, true) => format!("-{digits}"),
            (false, false) => digits.to_owned(),
        }))
    }

    /// The decimal text Python's `str(int)` writes.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number of decimal digits (without the sign).
    pub fn digits(&self) -> usize {
        self.0.trim_start_matches('-').len()
    }

    /// The value, if it fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        self.0.parse().ok()
    }

    /// The value, if it fits a `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        self.0.parse().ok()
    }

    /// The value, if it fits an `i128`.
    pub fn as_i128(&self) -> Option<i128> {
        self.0.parse().ok()
    }
}

impl fmt::Display for Int {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! int_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Int {
            fn from(v: $t) -> Self {
                Self(v.to_string())
            }
        }
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::Int(Int::from(v))
            }
        }
    )*};
}
int_from!(
    i8, i16, i32, i64, i128, isize, u8, u16, u32, u64, u128, usize
);

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::Float(v.into())
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::String(v)
    }
}

impl From<Map> for Value {
    fn from(v: Map) -> Self {
        Value::Object(v)
    }
}

impl<T: Into<Value>> From<Vec<T>> for Value {
    fn from(v: Vec<T>) -> Self {
        Value::Array(v.into_iter().map(Into::into).collect())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

impl From<serde_json::Value> for Value {
    /// Converts exactly: serde_json integers stay `int`, its floats stay `float`.
    fn from(v: serde_json::Value) -> Self {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    i.into()
                } else if let Some(u) = n.as_u64() {
                    u.into()
                } else {
                    // serde_json's `Number` is an i64, a u64 or a finite f64.
                    Value::Float(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            serde_json::Value::String(s) => Value::String(s),
            serde_json::Value::Array(items) => {
                Value::Array(items.into_iter().map(Into::into).collect())
            }
            serde_json::Value::Object(map) => {
                Value::Object(map.into_iter().map(|(k, v)| (k, v.into())).collect())
            }
        }
    }
}

impl From<serde_json::Map<String, serde_json::Value>> for Value {
    fn from(map: serde_json::Map<String, serde_json::Value>) -> Self {
        serde_json::Value::Object(map).into()
    }
}

impl From<&serde_json::Value> for Value {
    fn from(v: &serde_json::Value) -> Self {
        v.clone().into()
    }
}

impl PartialEq for Value {
    /// Equal when `json.dumps` writes both the same way: floats compare by bits (`NaN` equals
    /// itself, `-0.0` differs from `0.0`), and `1` differs from `1.0`.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Float(a), Value::Float(b)) => {
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
            }
            (Value::String(a), Value::String(b)) => a == b,
            (Value::Array(a), Value::Array(b)) => a == b,
            (Value::Object(a), Value::Object(b)) => a == b,
            _ => false,
        }
    }
}

impl Value {
    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(map) => map.get(key),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is an `int` that fits a `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(i) => i.as_u64(),
            _ => None,
        }
    }

    /// The integer, if this is an `int` that fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => i.as_i64(),
            _ => None,
        }
    }

    /// The number as a float (`float(x)` for ints that fit an `i128`).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => i.as_i128().map(|i| i as f64),
            _ => None,
        }
    }

    /// The map, if this is an object.
    pub fn as_object(&self) -> Option<&Map> {
        match self {
            Value::Object(map) => Some(map),
            _ => None,
        }
    }

    /// The map, mutably, if this is an object.
    pub fn as_object_mut(&mut self) -> Option<&mut Map> {
        match self {
            Value::Object(map) => Some(map),
            _ => None,
        }
    }

    /// Whether this is `None`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Whether strict JSON (and `serde_json`) can hold this value unchanged: no non-finite
    /// float and no integer beyond 64 bits anywhere inside.
    pub fn is_strict_json(&self) -> bool {
        match self {
            Value::Float(f) => f.is_finite(),
            Value::Int(i) => i.as_i64().is_some() || i.as_u64().is_some(),
            Value::Array(items) => items.iter().all(Value::is_strict_json),
            Value::Object(map) => map.values().all(Value::is_strict_json),
            _ => true,
        }
    }

    /// A `serde_json::Value` for display and `--json` output. Values strict JSON cannot hold
    /// become strings of their Python text (`"NaN"`, `"-Infinity"`, `"123…"`); use
    /// [`dumps`] where exact text matters.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a pyjson::Value always serialises")
    }
}

impl std::ops::Index<&str> for Value {
    type Output = Value;

    /// The member `key` of an object, or `Null` (like `serde_json::Value`'s indexing).
    fn index(&self, key: &str) -> &Value {
        static NULL: Value = Value::Null;
        self.get(key).unwrap_or(&NULL)
    }
}

impl Serialize for Value {
    /// Serialises like [`Value::to_json`]: non-finite floats and integers beyond 64 bits as
    /// strings of their Python text, everything else unchanged.
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => {
                if let Some(v) = i.as_i64() {
                    s.serialize_i64(v)
                } else if let Some(v) = i.as_u64() {
                    s.serialize_u64(v)
                } else {
                    s.serialize_str(i.as_str())
                }
            }
            Value::Float(f) if f.is_finite() => s.serialize_f64(*f),
            Value::Float(f) => s.serialize_str(&float_repr(*f)),
            Value::String(v) => s.serialize_str(v),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Object(map) => {
                let mut m = s.serialize_map(Some(map.len()))?;
                for (k, v) in map {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
    }
}

impl fmt::Display for Value {
    /// `json.dumps(value, sort_keys=True)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&dumps(self, DumpOptions::COMPACT_SORTED))
    }
}

/// Options of Python's `json.dumps` that optimum-neuron uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DumpOptions {
    /// `indent=N`: newline plus `N` spaces per level, and `","` as item separator.
    pub indent: Option<usize>,
    /// `sort_keys=True`: object keys in code-point order. [`Map`] keeps its keys in that order
    /// already, so `false` writes the same text (Python's insertion order is not kept).
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

/// Serialises `value` exactly as Python's `json.dumps(value, ensure_ascii=True,
/// allow_nan=True, ...)` would.
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
        Value::Int(i) => out.push_str(i.as_str()),
        Value::Float(f) => out.push_str(&float_repr(*f)),
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
            // A BTreeMap of `String`s iterates in UTF-8 byte order, which is code-point order,
            // like Python's `sort_keys`.
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
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

/// Parses JSON text like Python's `json.loads`: correctly rounded floats (Rust's `f64` parser,
/// like Python's `float`), floats that overflow read as infinities (`1e400`), the `NaN`,
/// `Infinity` and `-Infinity` literals, exact integers of any size up to
/// [`INT_MAX_STR_DIGITS`] digits, and the last of duplicate keys. Lone surrogates (which a Rust
/// `String` cannot hold) are refused rather than hashed differently.
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
            Some(b'N') if self.eat("NaN") => Ok(Value::Float(f64::NAN)),
            Some(b'I') if self.eat("Infinity") => Ok(Value::Float(f64::INFINITY)),
            Some(b'-') if self.eat("-Infinity") => Ok(Value::Float(f64::NEG_INFINITY)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("expected a JSON value")),
        };
        self.depth -= 1;
        v
    }

    fn object(&mut self) -> Result<Value, LoadError> {
        self.i += 1;
        let mut map = Map::new();
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
            // Like Python's `float(text)`: overflow reads as an infinity, underflow as zero.
            let f: f64 = text.parse().map_err(|_| self.err("invalid number"))?;
            return Ok(Value::Float(f));
        }
        let int = Int::parse(text).expect("digits checked above");
        if int.digits() > INT_MAX_STR_DIGITS {
            self.i = start;
            return Err(self.err(&format!(
                "integer of {} digits exceeds Python's limit of {INT_MAX_STR_DIGITS} digits",
                int.digits()
            )));
        }
        Ok(Value::Int(int))
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

    fn j(v: serde_json::Value) -> Value {
        v.into()
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
            j(json!({"a": 2}))
        );
        assert_eq!(loads(r#""\ud83d\ude00""#).unwrap(), j(json!("😀")));
        for bad in [
            "[1,]",
            "01",
            "\"\\ud800\"",
            "{} x",
            "-NaN",
            "nan",
            "inf",
            "Infinityx",
            "- 1",
            "-",
        ] {
            assert!(loads(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn python_only_numbers_round_trip_like_python() {
        // What `json.loads` then `json.dumps` writes in Python 3.11.
        for (text, py) in [
            ("NaN", "NaN"),
            ("Infinity", "Infinity"),
            ("-Infinity", "-Infinity"),
            ("1e400", "Infinity"),
            ("-1e400", "-Infinity"),
            ("1e-400", "0.0"),
            ("-1e-400", "-0.0"),
            ("-0", "0"),
            ("-0.0", "-0.0"),
            ("18446744073709551616", "18446744073709551616"),
            ("-9223372036854775809", "-9223372036854775809"),
            (
                "[NaN, -Infinity, 123456789012345678901234567890123456789012345678901234567890]",
                "[NaN, -Infinity, 123456789012345678901234567890123456789012345678901234567890]",
            ),
            (
                r#"{"b": Infinity, "a": -123456789012345678901234567890}"#,
                r#"{"a": -123456789012345678901234567890, "b": Infinity}"#,
            ),
        ] {
            let v = loads(text).unwrap();
            assert_eq!(dumps(&v, DumpOptions::COMPACT_SORTED), py, "{text}");
            assert_eq!(loads(py).unwrap(), v, "{py} reads back equal");
        }
        assert!(loads("NaN").unwrap().as_f64().unwrap().is_nan());
        assert_eq!(
            loads("NaN").unwrap(),
            loads("NaN").unwrap(),
            "same text, same value"
        );
        assert_ne!(loads("0.0").unwrap(), loads("-0.0").unwrap());
        assert_ne!(loads("1").unwrap(), loads("1.0").unwrap());
        let big = loads("340282366920938463463374607431768211456").unwrap();
        assert_eq!(big.as_u64(), None);
        assert!(!big.is_strict_json());
        assert_eq!(
            big.to_json(),
            json!("340282366920938463463374607431768211456")
        );
        assert_eq!(
            loads("[NaN, 1.5, 7]").unwrap().to_json(),
            json!(["NaN", 1.5, 7])
        );
    }

    #[test]
    fn python_int_digit_limit() {
        let ok = "9".repeat(INT_MAX_STR_DIGITS);
        assert_eq!(dumps(&loads(&ok).unwrap(), DumpOptions::ENTRY), ok);
        assert_eq!(
            dumps(&loads(&format!("-{ok}")).unwrap(), DumpOptions::ENTRY),
            format!("-{ok}")
        );
        let err = loads(&format!("[{ok}9]")).unwrap_err();
        assert_eq!(err.offset, 1);
        assert!(err.message.contains("4301 digits"), "{err}");
    }

    #[test]
    fn serde_json_values_convert_exactly() {
        let v = j(json!({"i": -3, "u": u64::MAX, "f": 2.0, "s": "x", "n": null, "l": [true]}));
        assert_eq!(
            dumps(&v, DumpOptions::COMPACT_SORTED),
            r#"{"f": 2.0, "i": -3, "l": [true], "n": null, "s": "x", "u": 18446744073709551615}"#
        );
        assert_eq!(
            v.to_json(),
            json!({"i": -3, "u": u64::MAX, "f": 2.0, "s": "x", "n": null, "l": [true]})
        );
        assert!(v.is_strict_json());
    }

    #[test]
    fn dumps_matches_python_layouts() {
        let v = j(json!({"b": [1, 2.0, {"z": null}], "a": "é😀\u{7f}\"\\\n", "c": {}, "d": []}));
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
