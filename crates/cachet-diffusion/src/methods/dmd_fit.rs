//! The numerical core of the DMD calibrator, on the host in f64: one Dynamic Mode Decomposition
//! fit of a `[d, n]` snapshot trajectory (cache-dit's `_dmd_fit_one`) and its forecast at a
//! (fractional) horizon (`_dmd_eval`).
//!
//! The matrices are small (n ≤ the snapshot history, d = tokens × width of one batch item), so a
//! few textbook routines do: Householder QR, one-sided Jacobi SVD of the `n × n` factor, a
//! Hessenberg + shifted-QR complex Schur form for the eigenvalues of the propagator, and Gaussian
//! elimination. The forecast does not depend on the SVD's signs or the eigenvectors' scaling, so
//! it equals torch's (`linalg.svd`, `linalg.eig`, `linalg.lstsq`) up to rounding.

// Matrix code indexes rows and columns side by side; iterators would hide the algebra.
#![allow(clippy::needless_range_loop)]

use std::ops::{Add, Div, Mul, Neg, Sub};

/// A complex number in f64.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct C64 {
    pub(crate) re: f64,
    pub(crate) im: f64,
}

impl C64 {
    pub(crate) const ZERO: C64 = C64 { re: 0.0, im: 0.0 };
    pub(crate) const ONE: C64 = C64 { re: 1.0, im: 0.0 };

    pub(crate) fn new(re: f64, im: f64) -> Self {
        Self { re, im }
    }

    fn real(re: f64) -> Self {
        Self { re, im: 0.0 }
    }

    pub(crate) fn abs(self) -> f64 {
        self.re.hypot(self.im)
    }

    fn conj(self) -> Self {
        Self::new(self.re, -self.im)
    }

    fn scale(self, k: f64) -> Self {
        Self::new(self.re * k, self.im * k)
    }

    fn sqrt(self) -> Self {
        let r = self.abs();
        if r == 0.0 {
            return Self::ZERO;
        }
        let re = ((r + self.re) / 2.0).sqrt();
        let im = ((r - self.re) / 2.0).sqrt().copysign(self.im);
        Self::new(re, im)
    }

    /// `self^k` on the principal branch (`torch.pow` of a complex tensor by a real exponent).
    pub(crate) fn powf(self, k: f64) -> Self {
        if k == 0.0 {
            return Self::ONE;
        }
        let r = self.abs();
        if r == 0.0 {
            return Self::ZERO;
        }
        let (mag, arg) = (r.powf(k), self.im.atan2(self.re) * k);
        Self::new(mag * arg.cos(), mag * arg.sin())
    }
}

impl Add for C64 {
    type Output = C64;
    fn add(self, o: C64) -> C64 {
        C64::new(self.re + o.re, self.im + o.im)
    }
}

impl Sub for C64 {
    type Output = C64;
    fn sub(self, o: C64) -> C64 {
        C64::new(self.re - o.re, self.im - o.im)
    }
}

impl Mul for C64 {
    type Output = C64;
    fn mul(self, o: C64) -> C64 {
        C64::new(
            self.re * o.re - self.im * o.im,
            self.re * o.im + self.im * o.re,
        )
    }
}

impl Div for C64 {
    type Output = C64;
    fn div(self, o: C64) -> C64 {
        // Smith's algorithm: no overflow for large components.
        if o.re.abs() >= o.im.abs() {
            let t = o.im / o.re;
            let d = o.re + o.im * t;
            C64::new((self.re + self.im * t) / d, (self.im - self.re * t) / d)
        } else {
            let t = o.re / o.im;
            let d = o.re * t + o.im;
            C64::new((self.re * t + self.im) / d, (self.im * t - self.re) / d)
        }
    }
}

impl Neg for C64 {
    type Output = C64;
    fn neg(self) -> C64 {
        C64::new(-self.re, -self.im)
    }
}

/// A dense matrix, column-major: `cols[j][i]` is row `i` of column `j`.
type Cols = Vec<Vec<f64>>;

/// Householder QR of a tall `d × m` matrix (`d ≥ m`): the reflectors and the `m × m` factor R.
struct Householder {
    /// Unit reflectors `v_k` (entries before `k` are zero).
    reflectors: Vec<Vec<f64>>,
    /// `r[j][i]`: row `i`, column `j` of R.
    r: Cols,
}

impl Householder {
    fn new(mut a: Cols) -> Self {
        let m = a.len();
        let d = a.first().map_or(0, Vec::len);
        let mut reflectors = Vec::with_capacity(m);
        for k in 0..m {
            let norm = a[k][k..].iter().map(|x| x * x).sum::<f64>().sqrt();
            let mut v = vec![0.0; d];
            if norm > 0.0 {
                let alpha = if a[k][k] > 0.0 { -norm } else { norm };
                v[k..].copy_from_slice(&a[k][k..]);
                v[k] -= alpha;
                let vn = v[k..].iter().map(|x| x * x).sum::<f64>().sqrt();
                if vn > 0.0 {
                    v[k..].iter_mut().for_each(|x| *x /= vn);
                }
            }
            for col in a.iter_mut().skip(k) {
                reflect(&v, k, col);
            }
            reflectors.push(v);
        }
        let r = a
            .into_iter()
            .enumerate()
            .map(|(j, col)| (0..m).map(|i| if i <= j { col[i] } else { 0.0 }).collect())
            .collect();
        Self { reflectors, r }
    }

    /// The first `m` entries of `Qᵀ x`.
    fn qt(&self, x: &[f64]) -> Vec<f64> {
        let mut y = x.to_vec();
        for (k, v) in self.reflectors.iter().enumerate() {
            reflect(v, k, &mut y);
        }
        y.truncate(self.reflectors.len());
        y
    }
}

/// `x ← (I − 2 v vᵀ) x`, with `v` zero before `k`.
fn reflect(v: &[f64], k: usize, x: &mut [f64]) {
    let dot: f64 = v[k..].iter().zip(&x[k..]).map(|(a, b)| a * b).sum();
    if dot != 0.0 {
        for (xi, vi) in x[k..].iter_mut().zip(&v[k..]) {
            *xi -= 2.0 * dot * vi;
        }
    }
}

/// Economy SVD `X = U S Vᵀ` of a tall matrix through its QR factor: `U = Q U_R`.
struct ThinSvd {
    qr: Householder,
    /// Singular values, descending.
    s: Vec<f64>,
    /// `u_r[j]`: column `j` of `U_R` (`m` entries), zero where `s[j] == 0`.
    u_r: Cols,
    /// `v[j]`: column `j` of V.
    v: Cols,
}

impl ThinSvd {
    fn new(x: Cols) -> Option<Self> {
        let m = x.len();
        let qr = Householder::new(x);
        // One-sided Jacobi on the columns of R: R V = W, W's columns orthogonal.
        let mut w = qr.r.clone();
        let mut v: Cols = (0..m)
            .map(|j| (0..m).map(|i| f64::from(u8::from(i == j))).collect())
            .collect();
        let mut converged = false;
        for _ in 0..60 {
            let mut rotated = false;
            for p in 0..m {
                for q in p + 1..m {
                    let alpha: f64 = w[p].iter().map(|x| x * x).sum();
                    let beta: f64 = w[q].iter().map(|x| x * x).sum();
                    let gamma: f64 = w[p].iter().zip(&w[q]).map(|(a, b)| a * b).sum();
                    if gamma == 0.0 || gamma.abs() <= f64::EPSILON * (alpha * beta).sqrt() {
                        continue;
                    }
                    rotated = true;
                    let zeta = (beta - alpha) / (2.0 * gamma);
                    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                    let c = 1.0 / (1.0 + t * t).sqrt();
                    let s = c * t;
                    for cols in [&mut w, &mut v] {
                        let (left, right) = cols.split_at_mut(q);
                        for (a, b) in left[p].iter_mut().zip(right[0].iter_mut()) {
                            let (x, y) = (*a, *b);
                            *a = c * x - s * y;
                            *b = s * x + c * y;
                        }
                    }
                }
            }
            if !rotated {
                converged = true;
                break;
            }
        }
        if !converged {
            return None;
        }
        let mut order: Vec<usize> = (0..m).collect();
        let norms: Vec<f64> = w
            .iter()
            .map(|c| c.iter().map(|x| x * x).sum::<f64>().sqrt())
            .collect();
        order.sort_by(|a, b| norms[*b].total_cmp(&norms[*a]));
        let s: Vec<f64> = order.iter().map(|&j| norms[j]).collect();
        let u_r = order
            .iter()
            .map(|&j| {
                let n = norms[j];
                w[j].iter()
                    .map(|x| if n > 0.0 { x / n } else { 0.0 })
                    .collect()
            })
            .collect();
        let v = order.iter().map(|&j| v[j].clone()).collect();
        Some(Self { qr, s, u_r, v })
    }
}

/// A fitted DMD for one trajectory: `forecast(k) = M · Re(W (λ^k ⊙ b))`, which is torch's
/// `Re(Φ (λ^k ⊙ b))` with `Φ = M W`.
#[derive(Clone, Debug)]
pub(crate) struct DmdFit {
    /// `M = X' V_r Σ_r⁻¹`, `d × r` column-major.
    m: Cols,
    /// Eigenvectors of the reduced propagator, `w[j][i]` row `i` of column `j`.
    w: Vec<Vec<C64>>,
    /// Eigenvalues.
    evals: Vec<C64>,
    /// Mode amplitudes.
    b: Vec<C64>,
}

impl DmdFit {
    /// cache-dit's `_dmd_fit_one`: `traj` holds `n` snapshots of `d` values (oldest first).
    /// `None` on a degenerate fit, where cache-dit falls back to reusing the newest snapshot.
    pub(crate) fn new(traj: &[Vec<f64>], rank: i64, ridge: f64) -> Option<Self> {
        let n = traj.len();
        if n < 2 || traj.iter().flatten().any(|x| !x.is_finite()) {
            return None;
        }
        let x: Cols = traj[..n - 1].to_vec();
        let xp: &[Vec<f64>] = &traj[1..];
        let svd = ThinSvd::new(x)?;
        let m = svd.s.len();
        let s0 = svd.s[0];
        let mut r = if rank <= 0 {
            svd.s.iter().filter(|s| **s > s0 * 1e-4).count().max(1)
        } else {
            usize::try_from(rank).unwrap_or(usize::MAX)
        };
        r = r.clamp(1, m);
        let sinv: Vec<f64> = svd.s[..r].iter().map(|s| 1.0 / (s + ridge)).collect();
        // X' V_r (d × r) and Qᵀ X' (m × m, columns of X').
        let xp_v: Cols = (0..r)
            .map(|j| {
                let mut col = vec![0.0; xp[0].len()];
                for (t, snap) in xp.iter().enumerate() {
                    let c = svd.v[j][t];
                    if c != 0.0 {
                        col.iter_mut().zip(snap).for_each(|(a, b)| *a += c * b);
                    }
                }
                col
            })
            .collect();
        let qt_xp: Cols = xp.iter().map(|col| svd.qr.qt(col)).collect();
        // Ã = U_rᵀ X' V_r Σ_r⁻¹ (r × r): row i, column j.
        let mut a = vec![vec![0.0; r]; r];
        for (i, row) in a.iter_mut().enumerate() {
            // (U_rᵀ Qᵀ X')[i][t] for each snapshot t, then times V_r's column j.
            let ut: Vec<f64> = qt_xp
                .iter()
                .map(|col| svd.u_r[i].iter().zip(col).map(|(u, x)| u * x).sum())
                .collect();
            for (j, cell) in row.iter_mut().enumerate() {
                let dot: f64 = ut.iter().zip(&svd.v[j]).map(|(u, v)| u * v).sum();
                *cell = dot * sinv[j];
            }
        }
        let (evals, w) = eig(&a)?;
        let m_cols: Cols = xp_v
            .into_iter()
            .zip(&sinv)
            .map(|(col, s)| col.into_iter().map(|x| x * s).collect())
            .collect();
        // lstsq(Φ, y) = W⁻¹ lstsq(M, y) when M has full column rank and W is invertible.
        let c = least_squares(&m_cols, &traj[n - 1])?;
        let b = solve(&w, &c.iter().map(|x| C64::real(*x)).collect::<Vec<_>>())?;
        Some(Self {
            m: m_cols,
            w,
            evals,
            b,
        })
    }

    /// cache-dit's `_dmd_eval`: the forecast `k` snapshot spacings after the newest snapshot.
    pub(crate) fn forecast(&self, k: f64) -> Vec<f64> {
        let r = self.evals.len();
        let scaled: Vec<C64> = self
            .evals
            .iter()
            .zip(&self.b)
            .map(|(l, b)| l.powf(k) * *b)
            .collect();
        let z: Vec<f64> = (0..r)
            .map(|i| {
                (0..r)
                    .map(|j| self.w[j][i] * scaled[j])
                    .fold(C64::ZERO, |acc, x| acc + x)
                    .re
            })
            .collect();
        let d = self.m.first().map_or(0, Vec::len);
        let mut out = vec![0.0; d];
        for (col, zj) in self.m.iter().zip(&z) {
            out.iter_mut().zip(col).for_each(|(o, x)| *o += zj * x);
        }
        out
    }

    /// Bytes held by the fit.
    pub(crate) fn bytes(&self) -> usize {
        let r = self.evals.len();
        self.m.iter().map(Vec::len).sum::<usize>() * 8 + (r * r + 2 * r) * 16
    }
}

/// `argmin ‖M c − y‖` for a tall `M` with full column rank; `None` when it is rank-deficient.
fn least_squares(m: &Cols, y: &[f64]) -> Option<Vec<f64>> {
    let r = m.len();
    let qr = Householder::new(m.clone());
    let rhs = qr.qt(y);
    let scale = (0..r).map(|j| qr.r[j][j].abs()).fold(0.0, f64::max);
    let mut c = vec![0.0; r];
    for i in (0..r).rev() {
        let diag = qr.r[i][i];
        if diag.abs() <= scale * 1e-13 || diag == 0.0 {
            return None;
        }
        let sum: f64 = (i + 1..r).map(|j| qr.r[j][i] * c[j]).sum();
        c[i] = (rhs[i] - sum) / diag;
    }
    Some(c)
}

/// Solves `A x = b` (A given by columns) by Gaussian elimination with partial pivoting.
fn solve(a_cols: &[Vec<C64>], b: &[C64]) -> Option<Vec<C64>> {
    let n = b.len();
    // Row-major copy: a[i][j].
    let mut a: Vec<Vec<C64>> = (0..n)
        .map(|i| (0..n).map(|j| a_cols[j][i]).collect())
        .collect();
    let mut x = b.to_vec();
    let scale = a.iter().flatten().map(|v| v.abs()).fold(0.0, f64::max);
    for k in 0..n {
        let p = (k..n).max_by(|i, j| a[*i][k].abs().total_cmp(&a[*j][k].abs()))?;
        if a[p][k].abs() <= scale * 1e-14 {
            return None;
        }
        a.swap(k, p);
        x.swap(k, p);
        for i in k + 1..n {
            let f = a[i][k] / a[k][k];
            for j in k..n {
                let t = a[k][j];
                a[i][j] = a[i][j] - f * t;
            }
            let t = x[k];
            x[i] = x[i] - f * t;
        }
    }
    for i in (0..n).rev() {
        let sum = (i + 1..n)
            .map(|j| a[i][j] * x[j])
            .fold(C64::ZERO, |acc, v| acc + v);
        x[i] = (x[i] - sum) / a[i][i];
    }
    Some(x)
}

/// Eigenvalues and eigenvectors (columns) of a real square matrix `a[i][j]`; `None` when the QR
/// iteration does not converge.
pub(crate) fn eig(a: &[Vec<f64>]) -> Option<(Vec<C64>, Vec<Vec<C64>>)> {
    let n = a.len();
    // Real Householder reduction to upper Hessenberg form, Z accumulating the reflections.
    let mut h: Vec<Vec<f64>> = a.to_vec();
    let mut z: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    for k in 0..n.saturating_sub(2) {
        let norm = (k + 1..n).map(|i| h[i][k] * h[i][k]).sum::<f64>().sqrt();
        if norm == 0.0 {
            continue;
        }
        let alpha = if h[k + 1][k] > 0.0 { -norm } else { norm };
        let mut v = vec![0.0; n];
        for i in k + 1..n {
            v[i] = h[i][k];
        }
        v[k + 1] -= alpha;
        let vn = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if vn == 0.0 {
            continue;
        }
        v.iter_mut().for_each(|x| *x /= vn);
        // H ← P H P, Z ← Z P with P = I − 2 v vᵀ.
        for j in 0..n {
            let dot: f64 = (k + 1..n).map(|i| v[i] * h[i][j]).sum();
            for i in k + 1..n {
                h[i][j] -= 2.0 * v[i] * dot;
            }
        }
        for row in h.iter_mut().chain(z.iter_mut()) {
            let dot: f64 = (k + 1..n).map(|j| row[j] * v[j]).sum();
            for j in k + 1..n {
                row[j] -= 2.0 * dot * v[j];
            }
        }
    }
    let mut t: Vec<Vec<C64>> = h
        .iter()
        .map(|row| row.iter().map(|x| C64::real(*x)).collect())
        .collect();
    let mut zc: Vec<Vec<C64>> = z
        .iter()
        .map(|row| row.iter().map(|x| C64::real(*x)).collect())
        .collect();
    schur(&mut t, &mut zc)?;
    // Eigenvectors of the triangular T by back substitution, then mapped back by Z.
    let norm = t.iter().flatten().map(|v| v.abs()).fold(0.0, f64::max);
    let small = (norm * f64::EPSILON).max(f64::MIN_POSITIVE);
    let evals: Vec<C64> = (0..n).map(|i| t[i][i]).collect();
    let mut vectors = Vec::with_capacity(n);
    for k in 0..n {
        let mut y = vec![C64::ZERO; n];
        y[k] = C64::ONE;
        for j in (0..k).rev() {
            let sum = (j + 1..=k)
                .map(|m| t[j][m] * y[m])
                .fold(C64::ZERO, |acc, v| acc + v);
            let mut denom = t[j][j] - evals[k];
            if denom.abs() < small {
                denom = C64::real(small);
            }
            y[j] = -(sum / denom);
        }
        let mut v: Vec<C64> = (0..n)
            .map(|i| {
                (0..=k)
                    .map(|m| zc[i][m] * y[m])
                    .fold(C64::ZERO, |acc, x| acc + x)
            })
            .collect();
        let vnorm = v.iter().map(|x| x.abs().powi(2)).sum::<f64>().sqrt();
        if vnorm > 0.0 {
            v.iter_mut().for_each(|x| *x = x.scale(1.0 / vnorm));
        }
        vectors.push(v);
    }
    Some((evals, vectors))
}

/// Complex Schur form of an upper Hessenberg `t` by single-shift QR with Wilkinson shifts and
/// deflation: on return `t` is upper triangular and `z ← z Q`.
fn schur(t: &mut [Vec<C64>], z: &mut [Vec<C64>]) -> Option<()> {
    let n = t.len();
    if n == 0 {
        return Some(());
    }
    let mut hi = n - 1;
    let mut iterations = 0;
    while hi > 0 {
        let mut lo = hi;
        while lo > 0 {
            let s = t[lo - 1][lo - 1].abs() + t[lo][lo].abs();
            let s = if s == 0.0 { 1.0 } else { s };
            if t[lo][lo - 1].abs() <= f64::EPSILON * s {
                t[lo][lo - 1] = C64::ZERO;
                break;
            }
            lo -= 1;
        }
        if lo == hi {
            hi -= 1;
            iterations = 0;
            continue;
        }
        iterations += 1;
        if iterations > 60 * n.max(1) {
            return None;
        }
        // Wilkinson shift: the eigenvalue of the trailing 2 × 2 block nearer its corner.
        let (a, b, c, d) = (t[hi - 1][hi - 1], t[hi - 1][hi], t[hi][hi - 1], t[hi][hi]);
        let mut mu = if iterations % 11 == 10 {
            // An exceptional shift breaks cycles.
            d + C64::real(t[hi][hi - 1].abs())
        } else {
            let half = (a - d).scale(0.5);
            let disc = (half * half + b * c).sqrt();
            let (l1, l2) = (d + half + disc, d + half - disc);
            if (l1 - d).abs() <= (l2 - d).abs() {
                l1
            } else {
                l2
            }
        };
        if !mu.re.is_finite() || !mu.im.is_finite() {
            mu = d;
        }
        for i in lo..=hi {
            t[i][i] = t[i][i] - mu;
        }
        let mut rotations = Vec::with_capacity(hi - lo);
        for k in lo..hi {
            let (x, y) = (t[k][k], t[k + 1][k]);
            let r = x.abs().hypot(y.abs());
            let (c, s) = if r == 0.0 {
                (1.0, C64::ZERO)
            } else if x.abs() == 0.0 {
                (0.0, y.conj().scale(1.0 / y.abs()))
            } else {
                (
                    x.abs() / r,
                    (x.scale(1.0 / x.abs()) * y.conj()).scale(1.0 / r),
                )
            };
            for j in k..n {
                let (p, q) = (t[k][j], t[k + 1][j]);
                t[k][j] = p.scale(c) + s * q;
                t[k + 1][j] = q.scale(c) - s.conj() * p;
            }
            rotations.push((k, c, s));
        }
        for &(k, c, s) in &rotations {
            let top = (k + 2).min(hi);
            for row in t.iter_mut().take(top + 1) {
                let (p, q) = (row[k], row[k + 1]);
                row[k] = p.scale(c) + s.conj() * q;
                row[k + 1] = q.scale(c) - s * p;
            }
            for row in z.iter_mut() {
                let (p, q) = (row[k], row[k + 1]);
                row[k] = p.scale(c) + s.conj() * q;
                row[k + 1] = q.scale(c) - s * p;
            }
        }
        for i in lo..=hi {
            t[i][i] = t[i][i] + mu;
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn residual(a: &[Vec<f64>], l: C64, v: &[C64]) -> f64 {
        (0..a.len())
            .map(|i| {
                let av = (0..a.len())
                    .map(|j| C64::real(a[i][j]) * v[j])
                    .fold(C64::ZERO, |x, y| x + y);
                (av - l * v[i]).abs()
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn eig_of_a_rotation_and_a_general_matrix() {
        let rot = vec![vec![0.0, -1.0], vec![1.0, 0.0]];
        let (l, v) = eig(&rot).unwrap();
        let mut ims: Vec<f64> = l.iter().map(|x| x.im).collect();
        ims.sort_by(f64::total_cmp);
        assert!((ims[0] + 1.0).abs() < 1e-12 && (ims[1] - 1.0).abs() < 1e-12);
        for (l, v) in l.iter().zip(&v) {
            assert!(residual(&rot, *l, v) < 1e-12);
        }
        let a = vec![
            vec![0.9, 0.2, -0.1, 0.05, 0.3],
            vec![-0.3, 0.8, 0.1, 0.0, -0.2],
            vec![0.05, -0.1, 1.1, 0.4, 0.1],
            vec![0.2, 0.0, -0.5, 0.7, 0.0],
            vec![0.0, 0.3, 0.2, -0.1, 0.95],
        ];
        let (l, v) = eig(&a).unwrap();
        let trace: f64 = l.iter().map(|x| x.re).sum();
        assert!((trace - 4.45).abs() < 1e-10, "{trace}");
        for (l, v) in l.iter().zip(&v) {
            assert!(residual(&a, *l, v) < 1e-10, "{l:?}");
        }
    }

    #[test]
    fn dmd_recovers_a_damped_oscillation_exactly() {
        // y_t = Re(c λ^t) + μ^t u per coordinate: three exponential modes, exact for DMD.
        let lam = C64::new(0.9 * 0.3f64.cos(), 0.9 * 0.3f64.sin());
        let mu: f64 = 0.7;
        let d = 40;
        let snap = |t: f64| -> Vec<f64> {
            (0..d)
                .map(|i| {
                    let c = C64::new((i as f64 * 0.37).sin(), (i as f64 * 0.11).cos());
                    (c * lam.powf(t)).re + mu.powf(t) * (1.0 + i as f64 * 0.01)
                })
                .collect()
        };
        let traj: Vec<Vec<f64>> = (0..6).map(|t| snap(t as f64)).collect();
        let fit = DmdFit::new(&traj, 0, 1e-12).unwrap();
        for k in [1.0, 2.0, 3.0] {
            let want = snap(5.0 + k);
            let got = fit.forecast(k);
            let err = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-8, "k = {k}: {err}");
        }
        assert!(fit.bytes() > 0);
    }

    #[test]
    fn degenerate_trajectories_are_refused() {
        assert!(DmdFit::new(&[vec![1.0, 2.0]], 0, 1e-8).is_none());
        assert!(DmdFit::new(&[vec![f64::NAN], vec![1.0], vec![1.0]], 0, 1e-8).is_none());
    }

    #[test]
    fn thin_svd_reconstructs() {
        let x: Cols = vec![
            vec![1.0, 2.0, 0.0, -1.0],
            vec![0.5, -1.0, 3.0, 2.0],
            vec![2.0, 0.0, 1.0, 1.0],
        ];
        let svd = ThinSvd::new(x.clone()).unwrap();
        assert!(svd.s.windows(2).all(|w| w[0] >= w[1]));
        // Qᵀ X = U_R S Vᵀ.
        for (j, col) in x.iter().enumerate() {
            let qt = svd.qr.qt(col);
            for i in 0..3 {
                let rec: f64 = (0..3).map(|k| svd.u_r[k][i] * svd.s[k] * svd.v[k][j]).sum();
                assert!((rec - qt[i]).abs() < 1e-12);
            }
        }
    }
}
