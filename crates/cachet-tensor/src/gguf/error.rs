//! Errors of the GGUF reader; every variant names the file and, where there is one, the
//! metadata key or tensor.

use std::path::PathBuf;

use super::types::GgmlType;

/// Everything that can go wrong while reading, validating, dequantizing or writing a GGUF file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// An operating-system call on a file failed.
    #[error("{}: cannot {op}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What was being attempted ("open", "memory-map", "write", ...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the bytes `GGUF`.
    #[error("{file}: not a GGUF file: it starts with {found:02x?}, not the magic \"GGUF\"")]
    BadMagic {
        /// File name.
        file: String,
        /// The first bytes of the file (up to four).
        found: Vec<u8>,
    },
    /// The format version is not 2 or 3 (or the file is big-endian).
    #[error("{file}: unsupported GGUF version {version}: {reason}")]
    UnsupportedVersion {
        /// File name.
        file: String,
        /// The version field as read (little-endian).
        version: u32,
        /// Why it is not read.
        reason: &'static str,
    },
    /// The file ends inside the header, a metadata value, a tensor info or a tensor's data.
    #[error(
        "{file}: file is truncated: {what} needs {needed} bytes at offset {offset}, but only {available} remain"
    )]
    Truncated {
        /// File name.
        file: String,
        /// What was being read (names the key or tensor).
        what: String,
        /// Offset in the file where it starts.
        offset: u64,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left in the file from `offset`.
        available: u64,
    },
    /// A count or length is larger than the rest of the file could possibly hold.
    #[error(
        "{file}: {what}: count {count} is impossible: at least {min_bytes} bytes each, but only {available} bytes remain in the file"
    )]
    CountTooLarge {
        /// File name.
        file: String,
        /// The count's meaning (tensor count, metadata count, array of key ...).
        what: String,
        /// The count as read.
        count: u64,
        /// Smallest encoding of one element, in bytes.
        min_bytes: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// A metadata value's type id is not one GGUF defines.
    #[error("{file}: metadata key {key:?}: unknown value type {type_id}")]
    UnknownValueType {
        /// File name.
        file: String,
        /// The key (with `[i]` for array elements).
        key: String,
        /// The type id as read.
        type_id: u32,
    },
    /// Arrays are nested deeper than the reader accepts.
    #[error("{file}: metadata key {key:?}: arrays nested more than {max} deep")]
    NestingTooDeep {
        /// File name.
        file: String,
        /// The key.
        key: String,
        /// Deepest nesting accepted.
        max: usize,
    },
    /// A string (key, value or tensor name) is not UTF-8.
    #[error("{file}: {what} is not valid UTF-8 (bad byte at string offset {valid_up_to})")]
    InvalidUtf8 {
        /// File name.
        file: String,
        /// Which string (names the key or tensor).
        what: String,
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// A boolean metadata value is neither 0 nor 1.
    #[error("{file}: metadata key {key:?}: boolean byte {value} is neither 0 nor 1")]
    InvalidBool {
        /// File name.
        file: String,
        /// The key (with `[i]` for array elements).
        key: String,
        /// The byte as read.
        value: u8,
    },
    /// The same metadata key appears twice.
    #[error("{file}: metadata key {key:?} appears more than once")]
    DuplicateKey {
        /// File name.
        file: String,
        /// The key.
        key: String,
    },
    /// `general.alignment` has the wrong type or is not a positive power of two.
    #[error("{file}: metadata key \"general.alignment\": {reason}")]
    InvalidAlignment {
        /// File name.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// Two tensors have the same name.
    #[error("{file}: tensor name {tensor:?} appears more than once")]
    DuplicateTensor {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
    },
    /// A tensor has more dimensions than ggml supports (4).
    #[error("{file}: tensor {tensor:?}: {n_dims} dimensions (ggml supports at most {max})")]
    TooManyDims {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// Dimension count as read.
        n_dims: u32,
        /// Most dimensions accepted.
        max: u32,
    },
    /// A tensor's ggml type id is not one this reader knows.
    #[error("{file}: tensor {tensor:?}: unknown ggml type {type_id}")]
    UnknownGgmlType {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// The type id as read.
        type_id: u32,
    },
    /// The product of a tensor's dimensions (or its byte size) overflows.
    #[error(
        "{file}: tensor {tensor:?}: dimensions {dims:?} (ggml order) overflow the address space"
    )]
    DimsOverflow {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// The dimensions as read, innermost first.
        dims: Vec<u64>,
    },
    /// A quantized tensor's rows are not a whole number of blocks.
    #[error(
        "{file}: tensor {tensor:?}: row length {row} is not a multiple of the {ggml_type} block size {block}"
    )]
    PartialBlock {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// Its ggml type.
        ggml_type: GgmlType,
        /// Innermost dimension.
        row: u64,
        /// Elements per block of the type.
        block: usize,
    },
    /// A tensor's offset is not a multiple of the file's alignment.
    #[error(
        "{file}: tensor {tensor:?}: offset {offset} is not a multiple of the alignment {alignment}"
    )]
    Misaligned {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// Offset relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A tensor's bytes lie (partly) past the end of the data section.
    #[error(
        "{file}: tensor {tensor:?}: bytes [{offset}, {end}) of the data section run past its end ({data_len} bytes)"
    )]
    OutOfRange {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// Offset relative to the data section.
        offset: u64,
        /// One past its last byte (saturated).
        end: u64,
        /// Length of the data section.
        data_len: u64,
    },
    /// Two tensors' bytes overlap.
    #[error(
        "{file}: tensors {first:?} (bytes [{}, {})) and {second:?} (bytes [{}, {})) overlap",
        first_range.0, first_range.1, second_range.0, second_range.1
    )]
    Overlap {
        /// File name.
        file: String,
        /// The tensor that starts first.
        first: String,
        /// Its byte range in the data section.
        first_range: (u64, u64),
        /// The tensor that starts inside it.
        second: String,
        /// Its byte range in the data section.
        second_range: (u64, u64),
    },
    /// A tensor name asked for is not in the file.
    #[error("{file}: no tensor named {name:?} (the file holds {count} tensors)")]
    MissingTensor {
        /// File name.
        file: String,
        /// The name asked for.
        name: String,
        /// How many tensors the file holds.
        count: usize,
    },
    /// A tensor cannot be converted to floats.
    #[error("{file}: tensor {tensor:?}: {source}")]
    Dequantize {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// What failed.
        #[source]
        source: DequantizeError,
    },
    /// A tensor's rank differs from the rank asked for.
    #[error(
        "{file}: tensor {tensor:?}: expected rank {expected} but the stored tensor has shape {shape:?}"
    )]
    RankMismatch {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// Rank asked for.
        expected: usize,
        /// Stored shape (outermost first).
        shape: Vec<usize>,
    },
    /// A tensor or key given to [`GgufWriter`](super::GgufWriter) is rejected.
    #[error("cannot write {what}: {reason}")]
    InvalidWrite {
        /// The key or tensor.
        what: String,
        /// Why.
        reason: String,
    },
}

/// Why a block of bytes cannot be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DequantizeError {
    /// The type has no dequantizer here (the IQ and ternary types, integers, ...).
    #[error("dequantizing {0} is not supported")]
    Unsupported(GgmlType),
    /// The byte or element counts do not match the type's block layout.
    #[error(
        "{ggml_type}: {bytes} bytes do not hold {elements} elements ({block} elements per {type_size}-byte block)"
    )]
    Length {
        /// The type.
        ggml_type: GgmlType,
        /// Bytes given.
        bytes: usize,
        /// Elements asked for.
        elements: usize,
        /// Elements per block.
        block: usize,
        /// Bytes per block.
        type_size: usize,
    },
}
