//! Rotary position tables, computed once per model the way HF computes them in f32:
//! `inv_freq[i] = 1 / theta^(2i/D)`, `angle = pos * inv_freq[i]`, rotate-half layout.

/// `cos`/`sin` of every (position, frequency) pair: `[max_pos, D/2]` each.
pub struct RopeTable {
    /// Unique in the process: a device backend keeps its upload of the table by this id.
    pub id: u64,
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f32, max_pos: usize) -> RopeTable {
        let half = head_dim / 2;
        // HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in f32.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for pos in 0..max_pos {
            for &f in &inv_freq {
                let angle = (pos as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        RopeTable { id, half, cos, sin }
    }

    pub fn max_pos(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables equal transformers' (`tools/rope_golden.py`: `LlamaRotaryEmbedding`, f32)
    /// to an f32 rounding at positions up to 32,767, where an angle computed in f64 instead of
    /// HF's f32 product is off by up to ~2e-3 rad: the logits goldens' prompts (≤ 62 tokens)
    /// cannot tell the two apart.
    #[test]
    fn tables_match_transformers_far_out() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/rope.json");
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for case in golden["cases"].as_array().unwrap() {
            let head_dim = case["head_dim"].as_u64().unwrap() as usize;
            let theta = case["theta"].as_f64().unwrap() as f32;
            let table = RopeTable::new(head_dim, theta, 32768);
            let half = head_dim / 2;
            let positions = case["positions"].as_array().unwrap();
            for (k, pos) in positions.iter().enumerate() {
                let pos = pos.as_u64().unwrap() as usize;
                for (name, ours) in [("cos", &table.cos), ("sin", &table.sin)] {
                    let want = case[name][k].as_array().unwrap();
                    for i in 0..half {
                        let (got, want) = (ours[pos * half + i], want[i].as_f64().unwrap() as f32);
                        assert!(
                            (got - want).abs() <= 2e-7,
                            "head_dim {head_dim} theta {theta} pos {pos} {name}[{i}]: {got} against {want}"
                        );
                    }
                }
            }
        }
    }
}
