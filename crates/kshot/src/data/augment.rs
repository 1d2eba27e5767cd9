//! Koch et al.'s affine distortions for Siamese training (Koch, Zemel & Salakhutdinov 2015, §4.3):
//! rotation θ ∈ [−10°, 10°], shear ρx, ρy ∈ [−0.3, 0.3], scale sx, sy ∈ [0.8, 1.2] and translation
//! tx, ty ∈ [−2, 2] pixels at 105×105 (scaled to the image size), each component included with
//! probability ½. Sampled bilinearly about the image centre, zero (no ink) outside.

use rand::Rng;

/// The distortion of one image: output pixel p is read from input A⁻¹(p − c − t) + c.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    /// Row-major 2×2 matrix A = R(θ) · Shear(ρx, ρy) · Scale(sx, sy).
    pub a: [f64; 4],
    /// Translation in pixels (x, y).
    pub t: [f64; 2],
}

impl Affine {
    pub const IDENTITY: Affine = Affine { a: [1.0, 0.0, 0.0, 1.0], t: [0.0, 0.0] };

    /// Koch's random distortion for `size`×`size` images.
    pub fn koch(rng: &mut impl Rng, size: usize) -> Self {
        let mut pick = |lo: f64, hi: f64, neutral: f64| {
            if rng.random_bool(0.5) {
                rng.random_range(lo..hi)
            } else {
                neutral
            }
        };
        let theta = pick(-10.0, 10.0, 0.0).to_radians();
        let (rx, ry) = (pick(-0.3, 0.3, 0.0), pick(-0.3, 0.3, 0.0));
        let (sx, sy) = (pick(0.8, 1.2, 1.0), pick(0.8, 1.2, 1.0));
        let max_t = 2.0 * size as f64 / 105.0;
        let (tx, ty) = (pick(-max_t, max_t, 0.0), pick(-max_t, max_t, 0.0));
        let (c, s) = (theta.cos(), theta.sin());
        // Shear [[1, ρx], [ρy, 1]] · Scale diag(sx, sy), then rotation.
        let m = [sx, rx * sy, ry * sx, sy];
        let a =
            [c * m[0] - s * m[2], c * m[1] - s * m[3], s * m[0] + c * m[2], s * m[1] + c * m[3]];
        Affine { a, t: [tx, ty] }
    }

    /// Applies the distortion to one `size`×`size` u8 image.
    pub fn apply(&self, img: &[u8], size: usize) -> Vec<u8> {
        let [a, b, c, d] = self.a;
        let det = a * d - b * c;
        let inv = [d / det, -b / det, -c / det, a / det];
        let centre = (size as f64 - 1.0) / 2.0;
        let at = |x: isize, y: isize| -> f64 {
            if x < 0 || y < 0 || x >= size as isize || y >= size as isize {
                0.0
            } else {
                img[y as usize * size + x as usize] as f64
            }
        };
        let mut out = vec![0u8; size * size];
        for oy in 0..size {
            for ox in 0..size {
                let (px, py) = (ox as f64 - centre - self.t[0], oy as f64 - centre - self.t[1]);
                let sx = inv[0] * px + inv[1] * py + centre;
                let sy = inv[2] * px + inv[3] * py + centre;
                let (x0, y0) = (sx.floor(), sy.floor());
                let (fx, fy) = (sx - x0, sy - y0);
                let (x0, y0) = (x0 as isize, y0 as isize);
                let v = at(x0, y0) * (1.0 - fx) * (1.0 - fy)
                    + at(x0 + 1, y0) * fx * (1.0 - fy)
                    + at(x0, y0 + 1) * (1.0 - fx) * fy
                    + at(x0 + 1, y0 + 1) * fx * fy;
                out[oy * size + ox] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_keeps_the_image_and_translation_moves_it() {
        let img: Vec<u8> = (0..25).map(|i| (i * 10) as u8).collect();
        assert_eq!(Affine::IDENTITY.apply(&img, 5), img);
        let shifted = Affine { a: [1.0, 0.0, 0.0, 1.0], t: [1.0, 0.0] }.apply(&img, 5);
        for y in 0..5 {
            assert_eq!(shifted[y * 5], 0, "column 0 comes from outside");
            for x in 1..5 {
                assert_eq!(shifted[y * 5 + x], img[y * 5 + x - 1]);
            }
        }
    }
}
