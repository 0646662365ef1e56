//! [`SafetensorsError`]: every way reading or writing a checkpoint can fail.

use std::path::PathBuf;

use super::StoredDType;

/// Everything that can go wrong while reading or writing safetensors; each variant names the
/// file (or index) and, where there is one, the tensor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SafetensorsError {
    /// An operating-system call on a file failed.
    #[error("{}: cannot {op}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// What was being attempted ("open", "memory-map", "write", ...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than the 8-byte header-length prefix.
    #[error(
        "{file}: file is {len} bytes long, too short to be a safetensors file (it must start with an 8-byte header length)"
    )]
    TooSmall {
        /// File name.
        file: String,
        /// Its length in bytes.
        len: u64,
    },
    /// The declared header length runs past the end of the file.
    #[error(
        "{file}: header length {header_len} runs past the end of the file ({file_len} bytes, so at most {} bytes of header)",
        file_len.saturating_sub(8)
    )]
    HeaderTooLarge {
        /// File name.
        file: String,
        /// The header length read from the first 8 bytes.
        header_len: u64,
        /// The file length.
        file_len: u64,
    },
    /// The header is not UTF-8, not JSON, not a JSON object, or has the wrong structure.
    #[error("{file}: invalid header: {reason}")]
    InvalidHeader {
        /// File name.
        file: String,
        /// What is wrong (including serde's message where there is one).
        reason: String,
    },
    /// One tensor's header entry has the wrong structure (missing or mistyped field, ...).
    #[error("{file}: tensor {tensor:?}: invalid header entry: {reason}")]
    InvalidTensorEntry {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// What is wrong (serde's message where there is one).
        reason: String,
    },
    /// A tensor's dtype string is not one the safetensors format defines.
    #[error("{file}: tensor {tensor:?}: unknown dtype {dtype:?}")]
    UnknownDtype {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// The dtype string as written.
        dtype: String,
    },
    /// A tensor's `data_offsets` end before they begin.
    #[error("{file}: tensor {tensor:?}: data_offsets [{begin}, {end}] end before they begin")]
    ReversedOffsets {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// First byte (relative to the data section).
        begin: usize,
        /// One past the last byte.
        end: usize,
    },
    /// A tensor's `data_offsets` run past the end of the data section.
    #[error(
        "{file}: tensor {tensor:?}: data_offsets [{begin}, {end}] run past the end of the data section ({data_len} bytes)"
    )]
    OffsetsOutOfRange {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// First byte (relative to the data section).
        begin: usize,
        /// One past the last byte.
        end: usize,
        /// Length of the data section.
        data_len: usize,
    },
    /// A tensor's byte range does not match its shape and dtype.
    #[error(
        "{file}: tensor {tensor:?}: data_offsets span {actual} bytes but dtype {dtype} with shape {shape:?} needs {expected}"
    )]
    SizeMismatch {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// Stored dtype.
        dtype: StoredDType,
        /// Stored shape.
        shape: Vec<usize>,
        /// Bytes implied by shape and dtype.
        expected: usize,
        /// Bytes spanned by `data_offsets`.
        actual: usize,
    },
    /// Two tensors' byte ranges overlap.
    #[error(
        "{file}: tensors {first:?} (bytes [{}, {}]) and {second:?} (bytes [{}, {}]) overlap",
        first_offsets.0, first_offsets.1, second_offsets.0, second_offsets.1
    )]
    Overlap {
        /// File name.
        file: String,
        /// The tensor that starts first.
        first: String,
        /// Its `data_offsets`.
        first_offsets: (usize, usize),
        /// The tensor that starts inside it.
        second: String,
        /// Its `data_offsets`.
        second_offsets: (usize, usize),
    },
    /// Part of the data section belongs to no tensor (the format requires it to be fully indexed).
    #[error(
        "{file}: bytes [{begin}, {end}) of the data section belong to no tensor (the data section must be entirely indexed)"
    )]
    Gap {
        /// File name.
        file: String,
        /// First unindexed byte.
        begin: usize,
        /// One past the last unindexed byte.
        end: usize,
    },
    /// The header is consistent but the file ends before the data it describes.
    #[error(
        "{file}: file is truncated: the header indexes {expected} bytes of tensor data but only {actual} are present (tensor {tensor:?} is cut short)"
    )]
    Truncated {
        /// File name.
        file: String,
        /// The first tensor that runs past the end.
        tensor: String,
        /// Data-section length the header describes.
        expected: usize,
        /// Data-section length present.
        actual: usize,
    },
    /// A tensor's bytes are not a valid representation of its dtype (e.g. a BOOL byte of 2).
    #[error("{file}: tensor {tensor:?}: invalid data: {reason}")]
    InvalidData {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor name asked for is not in the checkpoint.
    #[error("{checkpoint}: no tensor named {name:?} (the checkpoint holds {count} tensors)")]
    MissingTensor {
        /// The checkpoint's file or index.
        checkpoint: String,
        /// The name asked for.
        name: String,
        /// How many tensors the checkpoint holds.
        count: usize,
    },
    /// A shard listed in an index's `weight_map` does not exist.
    #[error("{index}: shard file {shard:?} listed in weight_map does not exist")]
    MissingShard {
        /// The index file.
        index: String,
        /// The shard file name as listed.
        shard: String,
    },
    /// The index file is not valid JSON or lacks a `weight_map` of strings.
    #[error("{index}: invalid checkpoint index: {reason}")]
    InvalidIndex {
        /// The index file.
        index: String,
        /// What is wrong.
        reason: String,
    },
    /// The index maps a tensor to a shard that does not contain it.
    #[error(
        "{index}: weight_map puts tensor {tensor:?} in shard {shard:?}, which does not contain it"
    )]
    TensorNotInShard {
        /// The index file.
        index: String,
        /// The shard file name as listed.
        shard: String,
        /// Tensor name.
        tensor: String,
    },
    /// The same tensor name is stored in two shards.
    #[error("tensor {tensor:?} is stored in two shards: {first} and {second}")]
    DuplicateTensor {
        /// Tensor name.
        tensor: String,
        /// One shard holding it.
        first: String,
        /// The other shard holding it.
        second: String,
    },
    /// The tensor's stored rank differs from the rank asked for.
    #[error(
        "{file}: tensor {tensor:?}: expected rank {expected} but the stored tensor has rank {actual} (shape {shape:?})"
    )]
    RankMismatch {
        /// File holding the tensor.
        file: String,
        /// Tensor name.
        tensor: String,
        /// Rank asked for.
        expected: usize,
        /// Rank stored.
        actual: usize,
        /// Stored shape.
        shape: Vec<usize>,
    },
    /// The stored dtype cannot be converted to (or stored as) the dtype asked for.
    #[error("{file}: tensor {tensor:?}: cannot convert {from} to {to}")]
    UnsupportedConversion {
        /// File holding (or receiving) the tensor.
        file: String,
        /// Tensor name.
        tensor: String,
        /// Source dtype.
        from: String,
        /// Target dtype.
        to: String,
    },
    /// An integer value does not fit the int dtype it is loaded as.
    #[error(
        "{file}: tensor {tensor:?}: element {index} has value {value}, which does not fit the device int dtype {to}"
    )]
    ValueOutOfRange {
        /// File holding the tensor.
        file: String,
        /// Tensor name.
        tensor: String,
        /// Flat index of the first offending element.
        index: usize,
        /// Its value.
        value: i128,
        /// The target dtype.
        to: String,
    },
    /// A tensor name given to [`save`](super::save) is empty, reserved or repeated.
    #[error("{file}: cannot save tensor {tensor:?}: {reason}")]
    InvalidTensorName {
        /// File being written.
        file: String,
        /// The offending name.
        tensor: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// Reading a tensor back from its device (to save it) failed.
    #[error("{file}: cannot read tensor {tensor:?} back from its device: {reason}")]
    ReadBack {
        /// File being written.
        file: String,
        /// Tensor name.
        tensor: String,
        /// The backend's message.
        reason: String,
    },
    /// A path given to [`Checkpoint::open`](super::Checkpoint::open) is neither a checkpoint file, an index, nor a
    /// directory holding exactly one of them.
    #[error("{}: not a safetensors checkpoint: {reason}", path.display())]
    NotACheckpoint {
        /// The path given.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
}
