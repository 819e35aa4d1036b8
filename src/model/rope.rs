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
