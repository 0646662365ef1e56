//! cache-dit's `steps_mask`: which denoising steps always compute (1) and which may cache (0),
//! from explicit compute/cache bins or the predefined `slow`/`medium`/`fast`/`ultra` policies.

use crate::error::{DiffusionError, Result};

/// Interleaves compute and cache bins into a mask of `total_steps` (cache-dit's `_steps_mask`).
pub fn steps_mask_from_bins(
    compute_bins: &[usize],
    cache_bins: &[usize],
    total_steps: Option<usize>,
) -> Result<Vec<u8>> {
    let sum: usize = compute_bins.iter().sum::<usize>() + cache_bins.iter().sum::<usize>();
    let total = match total_steps {
        Some(t) if sum < t => {
            return Err(DiffusionError::InvalidOption {
                field: "steps_mask",
                reason: format!(
                    "compute + cache bins cover {sum} steps, fewer than total_steps = {t}"
                ),
            });
        }
        Some(t) => t,
        None => sum,
    };
    let mut mask = Vec::with_capacity(sum);
    let (mut compute, mut cache) = (compute_bins.iter(), cache_bins.iter());
    while mask.len() < total {
        let c = compute.next();
        if let Some(&c) = c {
            mask.extend(std::iter::repeat_n(1u8, c));
        }
        let k = cache.next();
        if let Some(&k) = k {
            mask.extend(std::iter::repeat_n(0u8, k));
        }
        if c.is_none() && k.is_none() {
            break;
        }
    }
    mask.truncate(total);
    Ok(mask)
}

type Policy = (Vec<usize>, Vec<usize>);

fn policy_sum(p: &Policy) -> usize {
    p.0.iter().sum::<usize>() + p.1.iter().sum::<usize>()
}

fn truncate_policy(p: &mut Policy, target: usize) {
    while policy_sum(p) > target {
        if let Some(last) = p.1.last_mut() {
            *last -= 1;
            if *last == 0 {
                p.1.pop();
            }
        }
        if policy_sum(p) <= target {
            break;
        }
        if let Some(last) = p.0.last_mut() {
            *last -= 1;
            if *last == 0 {
                p.0.pop();
            }
        }
        if policy_sum(p) <= target {
            break;
        }
    }
}

fn policies(list: [(&'static str, &[usize], &[usize]); 4]) -> Vec<(&'static str, Policy)> {
    list.iter()
        .map(|(n, c, k)| (*n, (c.to_vec(), k.to_vec())))
        .collect()
}

/// cache-dit's `steps_mask(total_steps=…, mask_policy=…)`: a predefined policy scaled to
/// `total_steps`; the last step always computes.
pub fn steps_mask(total_steps: usize, mask_policy: &str) -> Result<Vec<u8>> {
    let mut table = policies([
        ("slow", &[8, 3, 3, 2, 1, 1], &[1, 2, 2, 2, 3]),
        ("medium", &[6, 2, 2, 2, 2, 1], &[1, 3, 3, 3, 3]),
        ("fast", &[6, 1, 1, 1, 1, 1], &[1, 3, 4, 5, 4]),
        ("ultra", &[4, 1, 1, 1, 1], &[2, 5, 6, 7]),
    ]);
    if total_steps > 28 {
        for (_, policy) in table.iter_mut() {
            let min_len = policy.0.len().min(policy.1.len());
            let (compute0, cache0) = (policy.0.clone(), policy.1.clone());
            let scale = total_steps as f64 / 28.0 * 0.5;
            'grow: while policy_sum(policy) < total_steps {
                for i in 0..min_len {
                    policy.0[i] += ((compute0[i] as f64 * scale) as usize).max(1);
                    if policy_sum(policy) >= total_steps {
                        break 'grow;
                    }
                    policy.1[i] += ((cache0[i] as f64 * scale) as usize).max(1);
                    if policy_sum(policy) >= total_steps {
                        break 'grow;
                    }
                }
                if let Some(last) = policy.0.last_mut() {
                    *last += 1;
                }
            }
            truncate_policy(policy, total_steps);
        }
    } else if (16..28).contains(&total_steps) {
        for (_, policy) in table.iter_mut() {
            truncate_policy(policy, total_steps);
        }
    } else if (8..16).contains(&total_steps) {
        if total_steps > 8 {
            table = policies([
                ("slow", &[4, 2, 2, 2, 1], &[1, 1, 1, 1]),
                ("medium", &[4, 2, 1, 1, 1], &[1, 1, 2, 2]),
                ("fast", &[3, 1, 1, 1, 1], &[1, 2, 2, 3]),
                ("ultra", &[2, 1, 1, 1, 1], &[1, 2, 3, 3]),
            ]);
            if total_steps == 9 {
                table = policies([
                    ("slow", &[5, 2, 1], &[1]),
                    ("medium", &[5, 1, 1], &[1, 1]),
                    ("fast", &[4, 1, 1], &[1, 2]),
                    ("ultra", &[3, 1, 1], &[2, 2]),
                ]);
            }
        } else {
            table = policies([
                ("slow", &[5, 1, 1], &[1]),
                ("medium", &[4, 1, 1], &[1, 1]),
                ("fast", &[3, 1, 1], &[1, 2]),
                ("ultra", &[2, 1, 1], &[2, 2]),
            ]);
            for (_, policy) in table.iter_mut() {
                truncate_policy(policy, total_steps);
            }
        }
    } else if total_steps < 8 {
        let constant: Policy = match total_steps {
            4 => (vec![2, 1], vec![1]),
            6 => (vec![3, 1], vec![2]),
            other => {
                return Err(DiffusionError::InvalidOption {
                    field: "steps_mask",
                    reason: format!(
                        "predefined masks below 8 steps exist for 4 or 6 steps only, not {other}"
                    ),
                });
            }
        };
        table = ["slow", "medium", "fast", "ultra"]
            .into_iter()
            .map(|n| (n, constant.clone()))
            .collect();
    }
    let (_, (compute, cache)) = table
        .iter()
        .find(|(n, _)| *n == mask_policy)
        .ok_or_else(|| DiffusionError::InvalidOption {
            field: "mask_policy",
            reason: format!("{mask_policy:?}: choose slow, medium, fast or ultra"),
        })?;
    let mut mask = steps_mask_from_bins(compute, cache, Some(total_steps))?;
    if let Some(last) = mask.last_mut() {
        *last = 1;
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twenty_eight_step_medium_is_the_documented_table() {
        // compute [6, 2, 2, 2, 2, 1] interleaved with cache [1, 3, 3, 3, 3]; the last step computes.
        let text: String = steps_mask(28, "medium")
            .unwrap()
            .iter()
            .map(|m| m.to_string())
            .collect();
        assert_eq!(text, "1111110110001100011000110001");
        let slow: String = steps_mask(28, "slow")
            .unwrap()
            .iter()
            .map(|m| m.to_string())
            .collect();
        assert_eq!(slow, "1111111101110011100110010001");
        let slow_forced = {
            let mut s = slow.clone();
            s.replace_range(27..28, "1");
            s
        };
        assert_eq!(slow, slow_forced);
    }

    #[test]
    fn bins_and_errors() {
        assert_eq!(
            steps_mask_from_bins(&[2, 1], &[1], None).unwrap(),
            vec![1, 1, 0, 1]
        );
        assert!(steps_mask_from_bins(&[1], &[1], Some(5)).is_err());
        assert!(steps_mask(5, "fast").is_err());
        assert!(steps_mask(28, "warp").is_err());
        assert_eq!(steps_mask(50, "slow").unwrap().len(), 50);
    }
}
