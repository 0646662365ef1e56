//! Reading and writing safetensors checkpoints.
//!
//! [`Checkpoint`] memory-maps one `.safetensors` file or every shard of a sharded checkpoint
//! (`model.safetensors.index.json`), validates each header completely up front (dtypes, shapes,
//! byte ranges, overlaps and gaps), and copies a tensor's bytes out of the mapping only when that
//! tensor is loaded. Every error names the file and, where there is one, the tensor.
//!
//! [`save`] writes a file atomically (temporary file in the same directory, then rename), with
//! the header padded with spaces to a multiple of 8 bytes as the format prescribes.
//!
//! The header is parsed here rather than by the `safetensors` crate so that diagnostics can name
//! the offending file and tensor; files written by either implementation are read by the other.

mod error;
mod header;
mod index;
mod read;
mod write;

pub use error::SafetensorsError;
pub use header::StoredDType;
pub use read::Checkpoint;
pub use write::{save, save_tensors};

use header::TensorInfo;

/// Largest header accepted, as in the reference implementation (100 MB).
const MAX_HEADER_LEN: u64 = 100_000_000;
/// Size of the little-endian header-length prefix.
const PREFIX_LEN: usize = 8;
/// The reserved header key holding free-form string metadata.
const METADATA_KEY: &str = "__metadata__";
/// File name looked for first when a directory is opened.
const INDEX_FILE: &str = "model.safetensors.index.json";
/// Single-file name looked for when a directory holds no index.
const SINGLE_FILE: &str = "model.safetensors";

type Result<T, E = SafetensorsError> = std::result::Result<T, E>;

/// Swaps element bytes between little-endian and native order in place (its own inverse; a no-op
/// on little-endian hosts).
fn swap_le_native(bytes: &mut [u8], elem_size: usize) {
    if cfg!(target_endian = "big") && elem_size > 1 {
        for elem in bytes.chunks_exact_mut(elem_size) {
            elem.reverse();
        }
    }
}
