//! Append-only storage of quantized tokens: packed-code blocks and the layout that fills them.

use std::sync::Arc;

use burn::tensor::DType;
use rayon::prelude::*;

use super::codec::{
    Params, QuantBackend, decode_codes, dequant_code, pack_codes, quantize_groups, unpack_codes,
};

/// Which values share a scale and zero point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantAxis {
    /// Groups of `q_group_size` consecutive channels of one token (KIVI's value quantization;
    /// quanto `axis=0`, hqq `axis=1` in transformers' numbering).
    PerToken,
    /// Groups of `q_group_size` consecutive tokens of one channel (KIVI's key quantization;
    /// quanto `axis=-1`, hqq `axis=0`).
    PerChannel,
}

impl QuantAxis {
    /// Parses transformers' axis number for `backend`.
    pub fn from_transformers(backend: QuantBackend, axis: i64) -> Option<Self> {
        match (backend, axis) {
            (QuantBackend::Quanto, 0) | (QuantBackend::Hqq, 1) => Some(Self::PerToken),
            (QuantBackend::Quanto, -1) | (QuantBackend::Hqq, 0) => Some(Self::PerChannel),
            _ => None,
        }
    }
}

/// `tokens` consecutive tokens of one tensor (keys or values), all batch rows and heads.
#[derive(Debug, Clone)]
pub(super) struct Block {
    pub(super) tokens: usize,
    /// Packed codes in `[batch, heads, tokens, head_dim]` order.
    pub(super) codes: Vec<u8>,
    pub(super) scale: Params,
    pub(super) zero: Params,
}

/// Geometry shared by the blocks of one tensor.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    /// Batch rows × heads.
    pub(super) rows: usize,
    /// Head dimension.
    pub(super) dim: usize,
    /// Values per group.
    pub(super) group: usize,
    /// Which values share a scale and zero point.
    pub(super) axis: QuantAxis,
    /// Bits per code.
    pub(super) nbits: u8,
    /// Quantizer.
    pub(super) backend: QuantBackend,
}

impl Layout {
    /// Quantizes `n` tokens given as `[rows, n, dim]` f32.
    pub(super) fn quantize(&self, data: &[f32], n: usize, dtype: DType) -> Block {
        debug_assert_eq!(data.len(), self.rows * n * self.dim);
        // Gather the groups contiguously, quantize, and scatter the codes back.
        let grouped: Vec<f32> = match self.axis {
            QuantAxis::PerToken => data.to_vec(),
            QuantAxis::PerChannel => {
                let mut out = Vec::with_capacity(data.len());
                for row in 0..self.rows {
                    for tg in 0..n / self.group {
                        for d in 0..self.dim {
                            for i in 0..self.group {
                                let t = tg * self.group + i;
                                out.push(data[(row * n + t) * self.dim + d]);
                            }
                        }
                    }
                }
                out
            }
        };
        let q = quantize_groups(self.backend, &grouped, self.group, self.nbits, dtype);
        let codes = match self.axis {
            QuantAxis::PerToken => q.codes,
            QuantAxis::PerChannel => {
                let mut codes = vec![0u8; data.len()];
                let mut k = 0;
                for row in 0..self.rows {
                    for tg in 0..n / self.group {
                        for d in 0..self.dim {
                            for i in 0..self.group {
                                let t = tg * self.group + i;
                                codes[(row * n + t) * self.dim + d] = q.codes[k];
                                k += 1;
                            }
                        }
                    }
                }
                codes
            }
        };
        Block {
            tokens: n,
            codes: pack_codes(&codes, self.nbits),
            scale: Params::new(&q.scale, dtype),
            zero: Params::new(&q.zero, dtype),
        }
    }

    /// Dequantizes `blocks` into `[rows, total, dim]` f32.
    pub(super) fn dequantize(&self, blocks: &[Arc<Block>]) -> Vec<f32> {
        let total: usize = blocks.iter().map(|b| b.tokens).sum();
        let mut out = vec![0f32; self.rows * total * self.dim];
        if total == 0 {
            return out;
        }
        out.par_chunks_mut(total * self.dim)
            .enumerate()
            .for_each(|(row, dst)| {
                let mut at = 0;
                for block in blocks {
                    let len = block.tokens * self.dim;
                    self.dequantize_row(block, row, &mut dst[at..at + len]);
                    at += len;
                }
            });
        out
    }

    /// Dequantizes the tokens of batch-head `row` of `block` into `dst` (`tokens * dim`).
    fn dequantize_row(&self, block: &Block, row: usize, dst: &mut [f32]) {
        self.dequantize_tokens(block, row, 0, block.tokens, dst);
    }

    /// Dequantizes tokens `t0..t1` of batch-head `row` of `block` into `dst` (`(t1 - t0) * dim`);
    /// with per-channel groups `t0` must start a group.
    #[inline(always)]
    pub(super) fn dequantize_tokens(
        &self,
        block: &Block,
        row: usize,
        t0: usize,
        t1: usize,
        dst: &mut [f32],
    ) {
        let (n, dim, group) = (block.tokens, self.dim, self.group);
        debug_assert_eq!(dst.len(), (t1 - t0) * dim);
        decode_codes(&block.codes, self.nbits, (row * n + t0) * dim, dst);
        let backend = self.backend;
        match self.axis {
            QuantAxis::PerToken => {
                let per_token = dim / group;
                for (i, token) in dst.chunks_mut(dim).enumerate() {
                    let first = (row * n + t0 + i) * per_token;
                    for (g, values) in token.chunks_mut(group).enumerate() {
                        let (s, z) = (block.scale.get(first + g), block.zero.get(first + g));
                        for x in values {
                            *x = dequant_code(backend, *x, s, z);
                        }
                    }
                }
            }
            QuantAxis::PerChannel => {
                debug_assert!(t0.is_multiple_of(group));
                let (mut scales, mut zeros) = (vec![0f32; dim], vec![0f32; dim]);
                for (i, tokens) in dst.chunks_mut(group * dim).enumerate() {
                    let first = (row * (n / group) + t0 / group + i) * dim;
                    for d in 0..dim {
                        scales[d] = block.scale.get(first + d);
                        zeros[d] = block.zero.get(first + d);
                    }
                    for token in tokens.chunks_mut(dim) {
                        for ((x, &s), &z) in token.iter_mut().zip(&scales).zip(&zeros) {
                            *x = dequant_code(backend, *x, s, z);
                        }
                    }
                }
            }
        }
    }
    /// Keeps batch rows `indices` (each `rows / batch` heads) of a block, in that order.
    pub(super) fn select(&self, block: &Block, batch: usize, indices: &[usize]) -> Block {
        let heads = self.rows / batch;
        let n = block.tokens;
        let per_row = heads * n * self.dim;
        let codes = unpack_codes(&block.codes, self.nbits, self.rows * n * self.dim);
        let new_codes: Vec<u8> = indices
            .iter()
            .flat_map(|&i| codes[i * per_row..(i + 1) * per_row].iter().copied())
            .collect();
        let per_params = block.scale.len() / batch;
        let pick = |p: &Params| -> Vec<f32> {
            let v = p.to_f32();
            indices
                .iter()
                .flat_map(|&i| v[i * per_params..(i + 1) * per_params].iter().copied())
                .collect()
        };
        let dtype = match block.scale {
            Params::F32(_) => DType::F32,
            Params::F16(_) => DType::F16,
            Params::Bf16(_) => DType::BF16,
        };
        Block {
            tokens: n,
            codes: pack_codes(&new_codes, self.nbits),
            scale: Params::new(&pick(&block.scale), dtype),
            zero: Params::new(&pick(&block.zero), dtype),
        }
    }
}

/// Bytes the blocks hold: codes, scales and zero points.
pub(super) fn block_bytes(blocks: &[Arc<Block>]) -> usize {
    blocks
        .iter()
        .map(|b| b.codes.capacity() + b.scale.bytes() + b.zero.bytes())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantized::codec::dequant;
    use crate::quantized::testing::{host, random};

    #[test]
    fn block_dequantization_matches_the_group_reference() {
        // Odd sizes so that rows start in the middle of a byte (the slow decoding path) too.
        for (rows, n, dim, group) in [(3, 8, 16, 4), (3, 6, 6, 3), (2, 4, 10, 2)] {
            let data = host(random([1, rows, n, dim], 9, DType::F32));
            for backend in [QuantBackend::Quanto, QuantBackend::Hqq] {
                for nbits in [2u8, 4, 8] {
                    for axis in [QuantAxis::PerToken, QuantAxis::PerChannel] {
                        let layout = Layout {
                            rows,
                            dim,
                            group,
                            axis,
                            nbits,
                            backend,
                        };
                        let block = Arc::new(layout.quantize(&data, n, DType::F32));
                        let got = layout.dequantize(&[block.clone(), block]);
                        // Reference: the element-wise formula on unpacked codes.
                        let b = layout.quantize(&data, n, DType::F32);
                        let codes = unpack_codes(&b.codes, nbits, data.len());
                        for row in 0..rows {
                            for copy in 0..2 {
                                for t in 0..n {
                                    for d in 0..dim {
                                        let p = match axis {
                                            QuantAxis::PerToken => {
                                                (row * n + t) * (dim / group) + d / group
                                            }
                                            QuantAxis::PerChannel => {
                                                (row * (n / group) + t / group) * dim + d
                                            }
                                        };
                                        let e = (row * n + t) * dim + d;
                                        let want = dequant(
                                            backend,
                                            codes[e],
                                            b.scale.get(p),
                                            b.zero.get(p),
                                        );
                                        let at = (row * 2 * n + copy * n + t) * dim + d;
                                        assert_eq!(
                                            got[at], want,
                                            "{backend:?} {nbits} {axis:?} {rows}x{n}x{dim}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
