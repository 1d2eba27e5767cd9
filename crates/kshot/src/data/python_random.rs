//! Python's `random` module, as far as the official few-shot code uses it to split Omniglot:
//! `random.seed(n)` followed by `random.shuffle(list)`. Reproducing it bit for bit lets kshot build
//! exactly the class split that openai/supervised-reptile's `run_omniglot.py` trains and tests on
//! (and MAML's, up to the file-system order its listing starts from).
//!
//! CPython seeds its MT19937 with `init_by_array` over the 32-bit words of |n| (the word `0` for
//! n = 0), and shuffles with Fisher–Yates from the end, drawing j ∈ [0, i] by rejection:
//! `getrandbits(k)` with k = bit_length(i + 1) until the draw is ≤ i.

const N: usize = 624;
const M: usize = 397;

/// The Mersenne Twister MT19937 state, seeded the way CPython's `random.seed(int)` seeds it.
pub struct PythonRandom {
    mt: [u32; N],
    index: usize,
}

impl PythonRandom {
    /// `random.seed(seed)` for a non-negative integer below 2⁶⁴.
    pub fn seed(seed: u64) -> Self {
        let mut key = vec![seed as u32];
        if seed >> 32 != 0 {
            key.push((seed >> 32) as u32);
        }
        let mut r = Self { mt: [0; N], index: N };
        r.init_by_array(&key);
        r
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..N {
            let prev = self.mt[i - 1];
            self.mt[i] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19_650_218);
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
        }
        self.mt[0] = 0x8000_0000;
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % N] & 0x7fff_ffff);
            let mut next = self.mt[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.mt[i] = next;
        }
        self.index = 0;
    }

    /// The next tempered 32-bit output (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random.getrandbits(k)` for 1 ≤ k ≤ 32.
    pub fn getrandbits(&mut self, k: u32) -> u32 {
        assert!((1..=32).contains(&k), "getrandbits: k = {k} is outside 1..=32");
        self.next_u32() >> (32 - k)
    }

    /// `random._randbelow(n)` for 1 ≤ n ≤ 2³².
    fn randbelow(&mut self, n: u64) -> usize {
        let k = 64 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k) as u64;
            if r < n {
                return r as usize;
            }
        }
    }

    /// `random.shuffle(items)`.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.randbelow(i as u64 + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_cpython() {
        // python3 -c "import random; random.seed(0); print([random.getrandbits(32) for _ in range(3)])"
        let mut r = PythonRandom::seed(0);
        assert_eq!(
            [r.next_u32(), r.next_u32(), r.next_u32()],
            [3626764237, 1654615998, 3255389356]
        );
        let mut r = PythonRandom::seed(1);
        assert_eq!([r.next_u32(), r.next_u32(), r.next_u32()], [577090037, 2444712010, 3639700191]);
        // l = list(range(10)); random.seed(0); random.shuffle(l)
        let mut l: Vec<u32> = (0..10).collect();
        PythonRandom::seed(0).shuffle(&mut l);
        assert_eq!(l, [7, 8, 1, 5, 3, 4, 2, 0, 9, 6]);
    }
}
