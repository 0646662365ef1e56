//! SwiGLU's elementwise part, [`silu_mul`], bit-identical to burn's CPU backend.

use rayon::prelude::*;

/// Elements per rayon task of [`silu_mul`].
const SILU_CHUNK: usize = 16 * 1024;

/// `gate[i] = silu(gate[i]) · up[i]` (SwiGLU's elementwise part), split over the rayon pool
/// for prompt-sized inputs. Bit-identical to burn's CPU `silu(gate) * up` (`x · sigmoid(x)`
/// with the C library's `expf`), so a model gives the same numbers whichever path it takes.
///
/// # Panics
/// If the slices differ in length.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "silu_mul: gate and up differ in length"
    );
    if gate.len() <= SILU_CHUNK {
        silu_mul_body(gate, up);
    } else {
        gate.par_chunks_mut(SILU_CHUNK)
            .zip(up.par_chunks(SILU_CHUNK))
            .for_each(|(g, u)| silu_mul_body(g, u));
    }
}

/// The logistic function as burn's CPU backend computes it (never overflows).
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = (x * sigmoid(x)) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as values;

    #[test]
    fn silu_mul_matches_the_definition() {
        let g: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) / 500.0).collect();
        let u = values(g.len(), 9);
        let mut got = g.clone();
        silu_mul(&mut got, &u);
        for ((x, y), got) in g.iter().zip(&u).zip(&got) {
            let want = (*x as f64) / (1.0 + (-(*x as f64)).exp()) * *y as f64;
            assert!(
                (*got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{x}: {got} vs {want}"
            );
        }
    }
}
