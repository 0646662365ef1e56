//! Shared by every crate's `tests/fuzz.rs` (included with `#[path]`; not a module of the
//! integration-test crate): the proptest configuration, byte and JSON mutators that start from a
//! valid input, and a counting allocator that bounds what one parse may allocate.
//!
//! Budget: `CACHET_FUZZ_CASES` cases per property (default [`DEFAULT_CASES`]); `cargo xtask fuzz`
//! raises it and loops. Failing seeds persist under `target/proptest-regressions/`, never in the
//! source tree; a crash found there becomes a named regression test in the crate's `fuzz.rs`.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::{Map, Value};

/// Cases per property in a plain `cargo test`.
pub const DEFAULT_CASES: u32 = 256;

/// Where failing seeds are kept: the workspace's `target/`, never the source tree.
const PERSISTENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../target/proptest-regressions/",
    env!("CARGO_PKG_NAME"),
    "-fuzz.txt"
);

/// The proptest configuration of every fuzz property.
pub fn config() -> Config {
    let cases = std::env::var("CACHET_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_CASES);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(PERSISTENCE))),
        // Shrinking a crash to a small input is what makes it a readable regression test; cap
        // it so a pathological case cannot stall a long run.
        max_shrink_time: 60_000,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Allocation bound
// ---------------------------------------------------------------------------------------------

/// The system allocator, counting this thread's live bytes and their peak.
pub struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // `try_with`: allocations during thread teardown are not counted.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are updated around it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on as is.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            track(layout.size() as isize);
        }
        ptr
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            track(layout.size() as isize);
        }
        ptr
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        new
    }
}

/// Runs `f` and returns its result, the most bytes this thread held at once above what it held
/// before, and the wall time.
pub fn measured<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    let peak = PEAK.with(Cell::get);
    (out, (peak - base).max(0) as usize, took)
}

/// The most a parse may allocate for an input of `len` bytes: a small multiple of the input
/// (every parsed value is bigger than its text) plus a constant.
pub fn alloc_bound(len: usize) -> usize {
    64 * len + (4 << 20)
}

/// Runs a parser on an input of `len` bytes and fails the case if it allocated more than
/// [`alloc_bound`] on this thread.
pub fn bounded<T>(len: usize, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    let (out, peak, _) = measured(f);
    prop_assert!(
        peak <= alloc_bound(len),
        "a {len}-byte input made the parser hold {peak} bytes (bound {})",
        alloc_bound(len)
    );
    Ok(out)
}

/// Asserts that `f` fails within `limit` (absurd sizes must be refused before any work).
#[track_caller]
pub fn fails_fast<T, E: std::fmt::Display>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> Result<T, E>,
) -> String {
    let (out, peak, took) = measured(f);
    let err = match out {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => e.to_string(),
    };
    assert!(took < limit, "{what}: took {took:?} to fail ({err})");
    assert!(
        peak < 64 << 20,
        "{what}: held {peak} bytes before failing ({err})"
    );
    err
}

// ---------------------------------------------------------------------------------------------
// Arbitrary input
// ---------------------------------------------------------------------------------------------

/// Arbitrary bytes, mostly short.
pub fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..512)
}

/// Arbitrary text: any Unicode, or JSON's punctuation, digits and a few words (which reach
/// further into a JSON parser than random code points do).
pub fn any_text() -> impl Strategy<Value = String> {
    let jsonish = prop::collection::vec(
        prop_oneof![
            prop::sample::select(vec![
                "{",
                "}",
                "[",
                "]",
                ",",
                ":",
                "\"",
                "\\",
                " ",
                "-",
                ".",
                "e",
                "E",
                "+",
                "0",
                "1",
                "9",
                "true",
                "false",
                "null",
                "NaN",
                "Infinity",
                "\"a\"",
                "\\u00e9",
                "\\ud800",
                "18446744073709551616",
                "1e400",
            ])
            .prop_map(str::to_owned),
            any::<char>().prop_map(String::from),
        ],
        0..96,
    )
    .prop_map(|parts| parts.concat());
    prop_oneof![any::<String>(), jsonish]
}

/// An arbitrary JSON value (objects keyed by `keys` or random words), nested a few levels.
pub fn any_json(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (0u64..300).prop_map(Value::from),
        "[a-z0-9_.]{0,12}".prop_map(Value::String),
    ];
    let key = prop_oneof![
        prop::sample::select(keys.to_vec()).prop_map(str::to_owned),
        "[a-z_]{1,10}"
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// Byte mutations of a valid input
// ---------------------------------------------------------------------------------------------

/// Values worth writing over a little-endian length or count field.
pub const INTERESTING_U64: [u64; 12] = [
    0,
    1,
    2,
    7,
    255,
    0xFFFF_FFFF,
    1 << 32,
    1 << 40,
    1 << 60,
    i64::MAX as u64,
    u64::MAX - 7,
    u64::MAX,
];

/// One edit of a byte string.
#[derive(Debug, Clone)]
pub enum ByteOp {
    /// Flip one bit.
    Flip(Index, u8),
    /// Overwrite one byte.
    Set(Index, u8),
    /// Insert bytes.
    Insert(Index, Vec<u8>),
    /// Delete a run of bytes.
    Delete(Index, usize),
    /// Keep a prefix.
    Truncate(Index),
    /// Overwrite 8 bytes with an interesting little-endian u64 (a length, count or offset).
    U64(Index, u64),
    /// Overwrite 4 bytes with an interesting little-endian u32 (a type id or version).
    U32(Index, u32),
}

/// A random edit.
pub fn byte_op() -> impl Strategy<Value = ByteOp> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| ByteOp::Flip(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteOp::Set(i, b)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| ByteOp::Insert(i, b)),
        1 => (any::<Index>(), 1usize..32).prop_map(|(i, n)| ByteOp::Delete(i, n)),
        1 => any::<Index>().prop_map(ByteOp::Truncate),
        2 => (any::<Index>(), prop::sample::select(INTERESTING_U64.to_vec()))
            .prop_map(|(i, v)| ByteOp::U64(i, v)),
        1 => (any::<Index>(), prop_oneof![Just(0u32), Just(1), Just(4), Just(13), Just(39),
            Just(u32::MAX), any::<u32>()])
            .prop_map(|(i, v)| ByteOp::U32(i, v)),
    ]
}

/// Applies `ops` to `bytes` in order.
pub fn apply_bytes(mut bytes: Vec<u8>, ops: &[ByteOp]) -> Vec<u8> {
    for op in ops {
        let len = bytes.len();
        match op {
            ByteOp::Flip(i, bit) if len > 0 => bytes[i.index(len)] ^= 1 << bit,
            ByteOp::Set(i, b) if len > 0 => bytes[i.index(len)] = *b,
            ByteOp::Insert(i, b) => {
                let at = i.index(len + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            ByteOp::Delete(i, n) if len > 0 => {
                let at = i.index(len);
                bytes.drain(at..(at + n).min(len));
            }
            ByteOp::Truncate(i) => bytes.truncate(i.index(len + 1)),
            ByteOp::U64(i, v) if len >= 8 => {
                let at = i.index(len - 7);
                bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            ByteOp::U32(i, v) if len >= 4 => {
                let at = i.index(len - 3);
                bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
    bytes
}

/// `valid` with one to six random edits.
pub fn mutated_bytes(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(byte_op(), 1..6).prop_map(move |ops| apply_bytes(valid.clone(), &ops))
}

// ---------------------------------------------------------------------------------------------
// JSON mutations of a valid input
// ---------------------------------------------------------------------------------------------

/// Placeholders that [`render`] turns into text `serde_json::Value` cannot hold.
const RAW: [(&str, &str); 6] = [
    ("\"@@nan@@\"", "NaN"),
    ("\"@@inf@@\"", "Infinity"),
    ("\"@@ninf@@\"", "-Infinity"),
    ("\"@@e999@@\"", "1e999"),
    ("\"@@negzero@@\"", "-0.0"),
    (
        "\"@@bigint@@\"",
        "123456789012345678901234567890123456789012345678901234567890",
    ),
];

/// A replacement value: huge, negative, fractional, non-finite, of the wrong type, or nested
/// deeply.
pub fn odd_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            Value::from(0),
            Value::from(-1),
            Value::from(1),
            Value::from(3),
            Value::from(u64::MAX),
            Value::from(1u64 << 60),
            Value::from(1u64 << 32),
            Value::from(i64::MIN),
            Value::from(usize::MAX / 2 + 1),
            Value::from(0.5),
            Value::from(-0.5),
            Value::from(1e308),
            Value::from(-1e308),
            Value::from(1e-300),
            Value::Null,
            Value::Bool(true),
            Value::Bool(false),
            Value::from(""),
            Value::from("x"),
            Value::from("nf4"),
            Value::from("-1"),
            Value::Array(vec![]),
            Value::Object(Map::new()),
            Value::from("@@nan@@"),
            Value::from("@@inf@@"),
            Value::from("@@ninf@@"),
            Value::from("@@e999@@"),
            Value::from("@@negzero@@"),
            Value::from("@@bigint@@"),
        ]),
        (1usize..600).prop_map(|depth| {
            let mut v = Value::from(1);
            for _ in 0..depth {
                v = Value::Array(vec![v]);
            }
            v
        }),
        prop::collection::vec(prop::sample::select(INTERESTING_U64.to_vec()), 0..6)
            .prop_map(|v| Value::Array(v.into_iter().map(Value::from).collect())),
        "\\PC{0,40}".prop_map(Value::String),
    ]
}

/// Numbers worth putting where a number was: edges of every integer width, signs, fractions.
pub fn odd_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(vec![
            Value::from(0),
            Value::from(1),
            Value::from(2),
            Value::from(3),
            Value::from(4),
            Value::from(7),
            Value::from(8),
            Value::from(16),
            Value::from(31),
            Value::from(64),
            Value::from(255),
            Value::from(256),
            Value::from(1024),
            Value::from(65536),
            Value::from(i32::MAX),
            Value::from(1u64 << 32),
            Value::from(1u64 << 40),
            Value::from(1u64 << 53),
            Value::from(1u64 << 60),
            Value::from(i64::MAX),
            Value::from(u64::MAX),
            Value::from(-1),
            Value::from(-2),
            Value::from(i64::MIN),
            Value::from(0.5),
            Value::from(1.5),
            Value::from(1e-9),
            Value::from(1e300),
            Value::from(-1e300),
            Value::from("@@nan@@"),
            Value::from("@@inf@@"),
            Value::from("@@e999@@"),
            Value::from("@@negzero@@"),
        ]),
        1 => (0u64..100).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
    ]
}

/// One edit of a JSON document.
#[derive(Debug, Clone)]
pub enum JsonOp {
    /// Replace the value at a node.
    Replace(Index, Value),
    /// Replace a number (if the document has one) with another.
    Renumber(Index, Value),
    /// Remove the value at a node (a key of its object, an element of its array).
    Remove(Index),
    /// Add a key to an object node.
    AddKey(Index, String, Value),
    /// Duplicate an array element.
    Duplicate(Index),
}

/// A random JSON edit.
pub fn json_op(keys: &'static [&'static str]) -> impl Strategy<Value = JsonOp> {
    let key = prop_oneof![
        4 => prop::sample::select(keys.to_vec()).prop_map(str::to_owned),
        1 => "[a-z_]{1,12}"
    ];
    prop_oneof![
        3 => (any::<Index>(), odd_json()).prop_map(|(i, v)| JsonOp::Replace(i, v)),
        5 => (any::<Index>(), odd_number()).prop_map(|(i, v)| JsonOp::Renumber(i, v)),
        2 => any::<Index>().prop_map(JsonOp::Remove),
        2 => (any::<Index>(), key, prop_oneof![odd_number(), odd_json()])
            .prop_map(|(i, k, v)| JsonOp::AddKey(i, k, v)),
        1 => any::<Index>().prop_map(JsonOp::Duplicate),
    ]
}

/// Every node's path (`None` segments are array indices stored as numbers).
fn paths(value: &Value, prefix: &mut Vec<PathSeg>, out: &mut Vec<Vec<PathSeg>>) {
    out.push(prefix.clone());
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                prefix.push(PathSeg::Index(i));
                paths(item, prefix, out);
                prefix.pop();
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                prefix.push(PathSeg::Key(k.clone()));
                paths(item, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum PathSeg {
    Key(String),
    Index(usize),
}

fn node<'v>(value: &'v mut Value, path: &[PathSeg]) -> &'v mut Value {
    path.iter().fold(value, |v, seg| match seg {
        PathSeg::Key(k) => &mut v[k.as_str()],
        PathSeg::Index(i) => &mut v[*i],
    })
}

/// Applies `op` to `value`.
pub fn apply_json(value: &mut Value, op: &JsonOp) {
    let mut all: Vec<Vec<PathSeg>> = Vec::new();
    paths(value, &mut Vec::new(), &mut all);
    let pick = |i: &Index, among: &[Vec<PathSeg>]| among[i.index(among.len())].clone();
    match op {
        JsonOp::Replace(i, v) => *node(value, &pick(i, &all)) = v.clone(),
        JsonOp::Renumber(i, v) => {
            let numbers: Vec<Vec<PathSeg>> = all
                .into_iter()
                .filter(|p| node(value, p).is_number())
                .collect();
            if !numbers.is_empty() {
                *node(value, &pick(i, &numbers)) = v.clone();
            }
        }
        JsonOp::Remove(i) => {
            let path = pick(i, &all);
            if let Some((last, parent)) = path.split_last() {
                match (node(value, parent), last) {
                    (Value::Object(map), PathSeg::Key(k)) => {
                        map.remove(k);
                    }
                    (Value::Array(items), PathSeg::Index(i)) => {
                        items.remove(*i);
                    }
                    _ => {}
                }
            }
        }
        JsonOp::AddKey(i, k, v) => {
            let objects: Vec<Vec<PathSeg>> = all
                .into_iter()
                .filter(|p| node(value, p).is_object())
                .collect();
            if !objects.is_empty()
                && let Value::Object(map) = node(value, &pick(i, &objects))
            {
                map.insert(k.clone(), v.clone());
            }
        }
        JsonOp::Duplicate(i) => {
            if let Value::Array(items) = node(value, &pick(i, &all))
                && let Some(first) = items.first().cloned()
            {
                items.push(first);
            }
        }
    }
}

/// A text-level edit applied after rendering.
#[derive(Debug, Clone)]
pub enum TextOp {
    /// Leave the text as rendered.
    None,
    /// Cut it short.
    Truncate(Index),
    /// Append garbage after the document.
    Trailing(String),
    /// Repeat the first key of the top-level object (JSON allows duplicate keys in text).
    DuplicateFirstKey,
}

fn text_op() -> impl Strategy<Value = TextOp> {
    prop_oneof![
        12 => Just(TextOp::None),
        1 => any::<Index>().prop_map(TextOp::Truncate),
        1 => prop::sample::select(vec![" x", "}", ",", "{}", "\u{0}"])
            .prop_map(|s| TextOp::Trailing(s.to_owned())),
        1 => Just(TextOp::DuplicateFirstKey),
    ]
}

/// Renders `value` as JSON text, turning the placeholders into `NaN`, `Infinity`, `1e999`, ...
pub fn render(value: &Value, text_op: &TextOp) -> String {
    let mut text = value.to_string();
    for (placeholder, raw) in RAW {
        text = text.replace(placeholder, raw);
    }
    match text_op {
        TextOp::None => {}
        TextOp::Truncate(i) => {
            let mut at = i.index(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text.truncate(at);
        }
        TextOp::Trailing(s) => text.push_str(s),
        TextOp::DuplicateFirstKey => {
            if let Some((k, v)) = value.as_object().and_then(|m| m.iter().next()) {
                let pair = format!("{}:{},", Value::from(k.as_str()), v);
                text.insert_str(1, &pair);
            }
        }
    }
    text
}

/// `valid` with one to four JSON edits and maybe a text edit, rendered as text.
pub fn mutated_json(valid: Value, keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    (prop::collection::vec(json_op(keys), 1..4), text_op()).prop_map(move |(ops, text_op)| {
        let mut value = valid.clone();
        for op in &ops {
            apply_json(&mut value, op);
        }
        render(&value, &text_op)
    })
}

/// Every fuzz binary counts allocations (see [`bounded`]).
#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Whether `text` is exactly one JSON document (any depth), with nothing but whitespace after it.
pub fn one_json_document(text: &str) -> bool {
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<serde::de::IgnoredAny>();
    matches!(stream.next(), Some(Ok(_))) && stream.next().is_none()
}
