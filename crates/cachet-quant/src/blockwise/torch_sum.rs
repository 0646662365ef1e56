//! torch's float32 `sum` / `mean` on CPU reproduced bit for bit (the double-quant offset).

/// `torch.mean` of a float32 vector on CPU, reproduced operation by operation: torch's cascade
/// sum (`SumKernel.cpp`: 8-lane vectors, 4 interleaved accumulators, 4 cascade levels, tail
/// added first), then one f32 division. Exact for up to 32768 values, where torch reduces on one
/// thread; beyond that torch splits the sum per thread, so its last bit depends on the thread
/// count and no single answer exists.
pub fn torch_mean_f32(values: &[f32]) -> f32 {
    torch_sum_f32(values) / values.len() as f32
}

/// The float32 sum of `torch.sum` on CPU for a contiguous vector (see [`torch_mean_f32`]).
pub fn torch_sum_f32(values: &[f32]) -> f32 {
    const LANES: usize = 8;
    let n = values.len();
    if n < LANES {
        let items: Vec<[f32; 1]> = values.iter().map(|&v| [v]).collect();
        return row_sum(&items)[0];
    }
    let vectors = n / LANES;
    let items: Vec<[f32; LANES]> = values[..vectors * LANES]
        .chunks_exact(LANES)
        .map(|c| std::array::from_fn(|l| c[l]))
        .collect();
    let lanes = row_sum(&items);
    let mut total = 0.0f32;
    for &v in &values[vectors * LANES..] {
        total += v;
    }
    for l in lanes {
        total += l;
    }
    total
}

fn add<const W: usize>(a: &mut [f32; W], b: &[f32; W]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// torch's `row_sum`: the items as a `(-1, 4)` array summed by `multi_row_sum`, the leftover
/// items into accumulator 0, then accumulators 1..4 into 0.
fn row_sum<const W: usize>(items: &[[f32; W]]) -> [f32; W] {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let size = items.len() / ILP;
    let ceil_log2 = if size <= 1 {
        0
    } else {
        usize::BITS - (size - 1).leading_zeros()
    } as usize;
    let level_power = 4.max(ceil_log2 / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; W]; ILP]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (a, item) in acc[0].iter_mut().zip(&items[i * ILP..(i + 1) * ILP]) {
                add(a, item);
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (u, l) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                add(u, l);
                *l = [0.0; W];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (a, item) in acc[0].iter_mut().zip(&items[i * ILP..(i + 1) * ILP]) {
            add(a, item);
        }
        i += 1;
    }
    for j in 1..LEVELS {
        let (first, rest) = acc.split_at_mut(1);
        for (a, u) in first[0].iter_mut().zip(&rest[j - 1]) {
            add(a, u);
        }
    }
    let mut partial = acc[0];
    for item in &items[size * ILP..] {
        add(&mut partial[0], item);
    }
    let mut out = partial[0];
    for p in &partial[1..] {
        add(&mut out, p);
    }
    out
}
