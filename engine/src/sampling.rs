//! Sampling options and a plain CPU implementation of the GPU sampler
//! (`shaders/sample.wgsl`), used to test it and available to callers that
//! sample on the CPU. Order as in Hugging Face `generate`: repetition penalty,
//! temperature, top-k, top-p.

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 1 = off.
    pub top_p: f32,
    /// 1 = off; > 1 discourages tokens already in the prompt or the output.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
    pub fn validate(&self) -> crate::Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(crate::Error::Invalid(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(crate::Error::Invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(crate::Error::Invalid(format!(
                "repetition penalty must be > 0, got {}",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
    /// The 32-bit seed the GPU sampler uses.
    pub fn seed32(&self) -> u32 {
        (self.seed ^ (self.seed >> 32)) as u32
    }
}

fn okey(f: f32) -> u32 {
    let b = f.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

pub(crate) fn pcg(v: u32) -> u32 {
    let s = v.wrapping_mul(747796405).wrapping_add(2891336453);
    let w = ((s >> ((s >> 28) + 4)) ^ s).wrapping_mul(277803737);
    (w >> 22) ^ w
}

/// The uniform number in [0, 1) the sampler draws at `step` (number of tokens sampled before).
pub fn draw(seed: u32, step: u32) -> f32 {
    let r = pcg(seed ^ pcg(step.wrapping_add(0x9e37_79b9)));
    (r >> 8) as f32 / 16_777_216.0
}

/// CPU mirror of `sample.wgsl`. `seen[i]` marks tokens under the repetition penalty.
pub fn sample_cpu(logits: &[f32], seen: &[bool], p: &SamplingParams, step: u32) -> u32 {
    let v = logits.len();
    let adj: Vec<f32> = (0..v)
        .map(|i| {
            let l = logits[i];
            if p.repetition_penalty != 1.0 && seen[i] {
                if l > 0.0 {
                    l / p.repetition_penalty
                } else {
                    l * p.repetition_penalty
                }
            } else {
                l
            }
        })
        .collect();
    let mut best = 0usize;
    for i in 1..v {
        if adj[i] > adj[best] {
            best = i;
        }
    }
    if p.is_greedy() {
        return best as u32;
    }
    let lmax = adj[best];
    let inv_t = 1.0 / p.temperature;
    let mut tk = 0u32;
    if p.top_k > 0 && (p.top_k as usize) < v {
        for b in 0..32 {
            let cand = tk | (1u32 << (31 - b));
            let c = adj.iter().filter(|&&l| okey(l) >= cand).count() as u32;
            if c >= p.top_k {
                tk = cand;
            }
        }
    }
    let q = |l: f32| ((l - lmax) * inv_t).exp();
    let mut thr = tk;
    if p.top_p < 1.0 {
        let total: f32 = adj.iter().filter(|&&l| okey(l) >= tk).map(|&l| q(l)).sum();
        let mut tp = 0u32;
        for b in 0..32 {
            let cand = tp | (1u32 << (31 - b));
            let th = cand.max(tk);
            let m: f32 = adj.iter().filter(|&&l| okey(l) >= th).map(|&l| q(l)).sum();
            if m >= p.top_p * total {
                tp = cand;
            }
        }
        thr = tk.max(tp);
    }
    let total: f32 = adj.iter().filter(|&&l| okey(l) >= thr).map(|&l| q(l)).sum();
    let target = draw(p.seed32(), step) * total;
    let mut cum = 0.0f32;
    let mut pick = best;
    for (i, &l) in adj.iter().enumerate() {
        if okey(l) >= thr {
            pick = i;
            cum += q(l);
            if cum > target {
                break;
            }
        }
    }
    pick as u32
}
