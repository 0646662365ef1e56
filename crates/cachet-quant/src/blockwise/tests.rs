//! Tests of the blockwise kernels: every SIMD level against the portable one, bit for bit.

use super::quantize4::{quantize_block, quantize_block_portable};
use super::*;
use crate::codes::midpoints;

/// Pseudo-random values in ±0.15 (xorshift, no RNG dependency).
fn values(state: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            ((*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.3
        })
        .collect()
}

/// The SIMD levels this CPU has besides the portable reference.
fn simd_levels() -> Vec<SimdLevel> {
    let levels: Vec<SimdLevel> = [SimdLevel::Avx512, SimdLevel::Avx2]
        .into_iter()
        .filter(|l| l.is_available())
        .collect();
    if levels.is_empty() {
        eprintln!("no SIMD level on this CPU: nothing to compare");
    }
    levels
}

/// Every SIMD block kernel against the portable one, on values that include every midpoint
/// exactly (bucketize ties), ±1 after scaling, zeros and a zero block; a NaN is reported.
#[test]
fn simd_blocks_equal_the_portable_ones() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for level in simd_levels() {
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            let (bounds, order) = midpoints(quant_type);
            for blocksize in VALID_4BIT_BLOCKSIZES {
                for case in 0..6 {
                    let mut block = values(&mut state, blocksize);
                    match case {
                        0 => {}
                        1 => {
                            // absmax 1: the midpoints themselves appear.
                            block[0] = 1.0;
                            for (v, b) in block[1..].iter_mut().zip(bounds.iter().cycle()) {
                                *v = *b;
                            }
                        }
                        2 => block.fill(0.0),
                        3 => block.iter_mut().step_by(3).for_each(|v| *v = -*v * 7.0),
                        4 => block.iter_mut().step_by(5).for_each(|v| *v = 0.0),
                        _ => block[blocksize / 2] = -2.5,
                    }
                    let what = format!("{level} {quant_type} {blocksize} case {case}");
                    let mut want = vec![0u8; blocksize / 2];
                    let mut want_am = 0.0f32;
                    assert!(quantize_block_portable(
                        &block,
                        &mut want,
                        &mut want_am,
                        true,
                        &bounds,
                        &order
                    ));
                    let mut got = vec![0u8; blocksize / 2];
                    let mut am = f32::NAN;
                    let (b, o) = (&bounds, &order);
                    assert!(quantize_block(
                        level, &block, &mut got, &mut am, blocksize, b, o
                    ));
                    assert_eq!(am.to_bits(), want_am.to_bits(), "{what}");
                    assert_eq!(got, want, "{what}");
                    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                        block[1] = bad;
                        assert!(!quantize_block(
                            level, &block, &mut got, &mut am, blocksize, b, o
                        ));
                    }
                }
            }
        }
    }
}

/// Edge values for a tensor: zeros, ±absmax, every midpoint times the absmax (ties after
/// scaling when the absmax is a power of two), code values times the absmax.
fn edge_tensor(state: &mut u64, n: usize, blocksize: usize, quant_type: QuantType) -> Vec<f32> {
    let (bounds, _) = midpoints(quant_type);
    let code = quant_type.code();
    let mut data = values(state, n);
    for (b, block) in data.chunks_mut(blocksize).enumerate() {
        let scale = [1.0f32, 0.5, 0.25, 3.0, 0.1][b % 5];
        match b % 4 {
            0 => {
                for (i, v) in block.iter_mut().enumerate() {
                    *v = match i % 4 {
                        0 => bounds[(i / 4) % 15] * scale,
                        1 => -bounds[(i / 4 + 7) % 15] * scale,
                        2 => code[i % 16] * scale,
                        _ => 0.0,
                    };
                }
                block[0] = scale;
                if block.len() > 1 {
                    block[block.len() - 1] = -scale;
                }
            }
            1 => block.fill(0.0),
            2 => {
                block.iter_mut().step_by(3).for_each(|v| *v = 0.0);
                if let Some(v) = block.last_mut() {
                    *v = -0.2;
                }
            }
            _ => {}
        }
    }
    data
}

/// Whole tensors (partial trailing blocks included) through every SIMD level: the same
/// bytes and absmax as the portable path, for every block size, NF4 and FP4.
#[test]
fn simd_quantize_4bit_equals_portable() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let levels = simd_levels();
    for quant_type in [QuantType::Nf4, QuantType::Fp4] {
        for blocksize in VALID_4BIT_BLOCKSIZES {
            for n in [
                1,
                7,
                blocksize - 1,
                blocksize,
                blocksize + 1,
                3 * blocksize + 17,
                8 * blocksize,
                (1 << 16) + blocksize + 2,
            ] {
                let data = edge_tensor(&mut state, n, blocksize, quant_type);
                let run = |level| {
                    let mut packed = vec![0u8; n.div_ceil(2)];
                    let mut absmax = vec![0.0f32; n.div_ceil(blocksize)];
                    let args = (blocksize, quant_type, level);
                    assert!(quantize_4bit_codes(
                        &data,
                        args.0,
                        args.1,
                        args.2,
                        &mut packed,
                        &mut absmax
                    ));
                    (
                        packed,
                        absmax.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                    )
                };
                let want = run(SimdLevel::Portable);
                for &level in &levels {
                    let got = run(level);
                    let what = format!("{level} {quant_type} blocksize {blocksize} n {n}");
                    assert_eq!(got.1, want.1, "absmax, {what}");
                    assert_eq!(got.0, want.0, "codes, {what}");
                }
            }
        }
    }
}

/// Dequantization through every SIMD level equals the portable loop bit for bit: whole
/// tensors, ranges starting on and off block boundaries, partial trailing blocks.
#[test]
fn simd_dequantize_equals_portable() {
    let mut state = 0x1234_5678_9abc_def1u64;
    let levels = simd_levels();
    for quant_type in [QuantType::Nf4, QuantType::Fp4] {
        let code = quant_type.code();
        for blocksize in VALID_4BIT_BLOCKSIZES {
            let n = 5 * blocksize + 37;
            let data = edge_tensor(&mut state, n, blocksize, quant_type);
            let q = quantize_4bit("t", &data, &[n], blocksize, quant_type, false).unwrap();
            let absmax = q.absmax.to_f32();
            for (start, len) in [
                (0, n),
                (0, 2 * blocksize),
                (blocksize, 3 * blocksize + 5),
                (2 * blocksize, n - 2 * blocksize),
                (2, blocksize),
                (blocksize + 16, 2 * blocksize + 1),
            ] {
                let run = |level| {
                    let mut out = vec![f32::NAN; len];
                    dequantize_4bit_with(
                        &q.packed, &absmax, blocksize, code, start, &mut out, level,
                    );
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                let want = run(SimdLevel::Portable);
                for &level in &levels {
                    assert_eq!(
                        run(level),
                        want,
                        "{level} {quant_type} blocksize {blocksize} [{start}, +{len})"
                    );
                }
            }
        }
    }
}
