//! One LSTM cell per row, with the float helpers the kernels' element-wise loops share: f64 by
//! the standard library, f32 by a branch-free e^x the compiler vectorises. Gate order i, f, g, o
//! (PyTorch's), cell state s, hidden state h = a_o ⊙ tanh s.

use super::cpu::Real;

/// The float operations the kernel needs beyond [`Real`].
pub(crate) trait Float: Real + std::ops::Neg<Output = Self> {
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn abs(self) -> Self;
    /// σ of each element, in place.
    fn sigmoids(x: &mut [Self]);
    /// tanh of each element, in place.
    fn tanhs(x: &mut [Self]);
}

/// f64, the precision of the tests against the candle graph: the standard library's functions.
impl Float for f64 {
    fn exp(self) -> Self {
        self.exp()
    }
    fn ln(self) -> Self {
        self.ln()
    }
    fn abs(self) -> Self {
        self.abs()
    }
    fn sigmoids(x: &mut [Self]) {
        x.iter_mut().for_each(|v| *v = sigmoid(*v));
    }
    fn tanhs(x: &mut [Self]) {
        x.iter_mut().for_each(|v| *v = v.tanh());
    }
}

/// f32, the precision of training: σ and tanh over [`exp_f32`], in loops the compiler vectorises
/// (libm's `tanhf` and `expf`, a call per element, took most of a training step).
impl Float for f32 {
    fn exp(self) -> Self {
        self.exp()
    }
    fn ln(self) -> Self {
        self.ln()
    }
    fn abs(self) -> Self {
        self.abs()
    }
    fn sigmoids(x: &mut [Self]) {
        x.iter_mut().for_each(|v| *v = 1.0 / (1.0 + exp_f32(-*v)));
    }
    fn tanhs(x: &mut [Self]) {
        x.iter_mut().for_each(|v| *v = 1.0 - 2.0 / (exp_f32(2.0 * *v) + 1.0));
    }
}

/// e^x by Cephes' `expf` (round x·log₂e to n, e^r for r = x − n·ln 2 by a degree-7 polynomial, times
/// 2^n), branch-free so that loops over it vectorise: within 2 ulp of e^x for x in [−87, 88.3], the
/// range where 2^n is a normal f32, to which x is clamped first. NaN stays NaN.
fn exp_f32(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds to an integer n, which is then the low bits of the sum's mantissa.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.3);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(shifted.to_bits().wrapping_sub(ROUND.to_bits() - 127) << 23)
}

pub(crate) fn one<T: Real>() -> T {
    T::from_f64(1.0)
}

pub(crate) fn sigmoid<T: Float>(x: T) -> T {
    one::<T>() / (one::<T>() + (-x).exp())
}

/// The four gate blocks i, f, g, o of a row of 4H.
fn blocks<T>(row: &[T], hd: usize) -> [&[T]; 4] {
    [&row[..hd], &row[hd..2 * hd], &row[2 * hd..3 * hd], &row[3 * hd..4 * hd]]
}

/// Layer 1 of one coordinate: `z` (pre-activations in, gates out), s_{t−1} → s_t, tanh s_t, h_t.
pub(crate) fn lstm_row<T: Float>(z: &mut [T], s: &mut [T], tanh_s: &mut [T], h: &mut [T]) {
    let hd = s.len();
    T::sigmoids(&mut z[..2 * hd]);
    T::tanhs(&mut z[2 * hd..3 * hd]);
    T::sigmoids(&mut z[3 * hd..]);
    let [a_i, a_f, a_g, a_o] = blocks(z, hd);
    for (((s, i), f), g) in s.iter_mut().zip(a_i).zip(a_f).zip(a_g) {
        *s = *f * *s + *i * *g;
    }
    tanh_s.copy_from_slice(s);
    T::tanhs(tanh_s);
    for ((h, o), t) in h.iter_mut().zip(a_o).zip(tanh_s.iter()) {
        *h = *o * *t;
    }
}

/// Layer 1 backward of one coordinate: δz from δh_t and δs_t; δs_t becomes δs_{t−1}.
pub(crate) fn lstm_row_backward<T: Float>(
    gates: &[T],
    s_prev: &[T],
    tanh_s: &[T],
    dh: &[T],
    ds: &mut [T],
    dz: &mut [T],
) {
    let (hd, one) = (dh.len(), one::<T>());
    let [a_i, a_f, a_g, a_o] = blocks(gates, hd);
    let (s_prev, tanh_s, ds) = (&s_prev[..hd], &tanh_s[..hd], &mut ds[..hd]);
    let (dz_i, rest) = dz[..4 * hd].split_at_mut(hd);
    let (dz_f, rest) = rest.split_at_mut(hd);
    let (dz_g, dz_o) = rest.split_at_mut(hd);
    for j in 0..hd {
        let (ai, af, ag, ao, ts) = (a_i[j], a_f[j], a_g[j], a_o[j], tanh_s[j]);
        let dsj = ds[j] + dh[j] * ao * (one - ts * ts);
        dz_i[j] = dsj * ag * ai * (one - ai);
        dz_f[j] = dsj * s_prev[j] * af * (one - af);
        dz_g[j] = dsj * ai * (one - ag * ag);
        dz_o[j] = dh[j] * ts * ao * (one - ao);
        ds[j] = dsj * af;
    }
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_f32_is_within_two_ulp_and_clamps() {
        for k in 0..=200_000 {
            let x = -87.0 + 175.3 * k as f32 / 200_000.0;
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            assert!(
                (got - want).abs() <= 2.0 * f32::EPSILON as f64 * want,
                "e^{x}: {got} vs {want}"
            );
        }
        assert_eq!((exp_f32(100.0), exp_f32(-100.0)), (exp_f32(88.3), exp_f32(-87.0)));
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
