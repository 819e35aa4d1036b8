//! Rotary position tables, computed once per model the way HF computes them in f32:
//! `inv_freq[i] = 1 / theta^(2i/D)` (then scaled, [`inv_freq`]), `angle = pos * inv_freq[i]`,
//! rotate-half layout.

use crate::config::RopeScaling;

/// The rotary frequencies of a head of `head_dim`, step by step as transformers computes them
/// in f32 (`modeling_rope_utils`: `_compute_default_rope_parameters`, `.._linear_scaling_..`,
/// `.._llama3_..`): each tensor operation rounded to f32, a Python scalar taken as the f32
/// nearest it, and `scalar / tensor` as PyTorch runs it, `reciprocal(tensor) · scalar`.
pub fn inv_freq(head_dim: usize, theta: f32, scaling: RopeScaling) -> Vec<f32> {
    let half = head_dim / 2;
    // HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in f32.
    let plain = (0..half).map(|i| 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32));
    match scaling {
        RopeScaling::None => plain.collect(),
        RopeScaling::Linear { factor } => plain.map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: old,
        } => {
            let two_pi = (2.0 * std::f64::consts::PI) as f32;
            // Python floats, computed in f64 before they meet a tensor.
            let low_wavelen = (old / low) as f32;
            let high_wavelen = (old / high) as f32;
            let spread = (high - low) as f32;
            let (factor, low, old) = (factor as f32, low as f32, old as f32);
            plain
                .map(|f| {
                    let wavelen = (1.0 / f) * two_pi;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let smooth = ((1.0 / wavelen) * old - low) / spread;
                    let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                    // `~(wavelen < high) * ~(wavelen > low)`: the same for the finite
                    // wavelengths of a validated base.
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        smoothed
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// `cos`/`sin` of every (position, frequency) pair: `[max_pos, D/2]` each.
pub struct RopeTable {
    /// Unique in the process: a device backend keeps its upload of the table by this id.
    pub id: u64,
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f32, scaling: RopeScaling, max_pos: usize) -> RopeTable {
        let half = head_dim / 2;
        let inv_freq = inv_freq(head_dim, theta, scaling);
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

    /// The tables equal transformers' (`tools/rope_golden.py`: `LlamaRotaryEmbedding`, f32,
    /// plain, `linear` and `llama3` frequencies; those bit for bit) to an f32 rounding at
    /// positions up to 32,767, where an angle computed in f64 instead of
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
            let scaling = match case.get("rope_scaling") {
                None => RopeScaling::None,
                Some(s) => {
                    let f = |k: &str| s[k].as_f64().unwrap();
                    match s["rope_type"].as_str().unwrap() {
                        "linear" => RopeScaling::Linear {
                            factor: f("factor"),
                        },
                        "llama3" => RopeScaling::Llama3 {
                            factor: f("factor"),
                            low_freq_factor: f("low_freq_factor"),
                            high_freq_factor: f("high_freq_factor"),
                            original_max_position_embeddings: f("original_max_position_embeddings"),
                        },
                        other => panic!("no such scaling in the golden: {other}"),
                    }
                }
            };
            // The frequencies bit for bit (transformers' `inv_freq` buffer, f32).
            let want: Vec<f32> = case["inv_freq"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(inv_freq(head_dim, theta, scaling), want, "{scaling:?}");
            let table = RopeTable::new(head_dim, theta, scaling, 32768);
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
