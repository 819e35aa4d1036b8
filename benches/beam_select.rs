//! Criterion benchmark of one masked top-k beam step at SmolLM2's vocabulary (V = 49152): from B
//! beams' log-prob rows and each beam's allowed tokens (trie children), the query-wide top 2B
//! candidates. Both variants start from the same log-prob rows (the log-softmax is shared work).
//!
//! - `sparse`: gram's step — gather each beam's children from its row, select over those only
//!   (`gram::beam::select::{candidates, top_k}`, the code the engine runs).
//! - `dense_mask`: the approach of JD's xLLM, in three passes: a reused `[B, V]` buffer is
//!   filled with the vocabulary-wide mask (-inf, 0 at allowed tokens), the row and beam score
//!   are added, and a bounded min-heap scan over all `B × V` keeps the top 2B. Not fused: one
//!   pass doing all three would read the `B × V` buffer once instead of three times, so the
//!   ratio to `sparse` overstates what a tuned dense mask costs by up to about that much.
//!
//! Children per beam are drawn log-uniformly from 1..=256 (a real trie has thousands at the
//! root and one or two deep down).
//!
//! cargo bench --bench beam_select

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use gram::beam::select::{candidates, top_k, Candidate};

const VOCAB: usize = 49152;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

struct Step {
    scores: Vec<f32>,
    lp: Vec<f32>,
    allowed: Vec<Vec<u32>>,
}

fn step(beams: usize, seed: u64) -> Step {
    let mut r = Rng(seed | 1);
    let scores = (0..beams).map(|_| -10.0 * r.unit()).collect();
    let lp = (0..beams * VOCAB).map(|_| -20.0 * r.unit()).collect();
    let allowed = (0..beams)
        .map(|_| {
            let n = 256f32.powf(r.unit()) as usize;
            let mut l: Vec<u32> = (0..n).map(|_| (r.next() % VOCAB as u64) as u32).collect();
            l.sort_unstable();
            l.dedup();
            l
        })
        .collect();
    Step {
        scores,
        lp,
        allowed,
    }
}

fn sparse(s: &Step, k: usize) -> Vec<Candidate> {
    let lists: Vec<Vec<(u32, f32)>> = s
        .allowed
        .iter()
        .enumerate()
        .map(|(j, l)| {
            let row = &s.lp[j * VOCAB..(j + 1) * VOCAB];
            l.iter().map(|&t| (t, row[t as usize])).collect()
        })
        .collect();
    top_k(candidates(&s.scores, &lists), k)
}

/// Total order on f32 for the heap.
struct Key(f32, u32);
impl PartialEq for Key {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o).is_eq()
    }
}
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Key {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
    }
}

fn dense_mask(s: &Step, k: usize, buf: &mut [f32]) -> Vec<(f32, u32)> {
    for (j, l) in s.allowed.iter().enumerate() {
        let m = &mut buf[j * VOCAB..(j + 1) * VOCAB];
        m.fill(f32::NEG_INFINITY);
        for &t in l {
            m[t as usize] = 0.0;
        }
        let row = &s.lp[j * VOCAB..(j + 1) * VOCAB];
        for (m, &l) in m.iter_mut().zip(row) {
            *m += l + s.scores[j];
        }
    }
    let mut heap: BinaryHeap<Reverse<Key>> = BinaryHeap::with_capacity(k + 1);
    for (i, &v) in buf.iter().enumerate() {
        if heap.len() < k {
            heap.push(Reverse(Key(v, i as u32)));
        } else if v > heap.peek().expect("k > 0").0 .0 {
            heap.pop();
            heap.push(Reverse(Key(v, i as u32)));
        }
    }
    let mut out: Vec<(f32, u32)> = heap
        .into_iter()
        .map(|Reverse(Key(v, i))| (v, i))
        .filter(|p| p.0.is_finite())
        .collect();
    out.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    out
}

fn bench_select(c: &mut Criterion) {
    let mut g = c.benchmark_group("beam_select");
    g.sample_size(10)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(2));
    for beams in [16usize, 64, 256, 512] {
        let s = step(beams, beams as u64);
        let k = 2 * beams;
        // Both variants find the same candidates.
        let mut buf = vec![0f32; beams * VOCAB];
        let want: Vec<(f32, u32)> = sparse(&s, k)
            .iter()
            .map(|c| (c.score, c.beam * VOCAB as u32 + c.token))
            .collect();
        assert_eq!(dense_mask(&s, k, &mut buf), want);
        g.bench_with_input(BenchmarkId::new("sparse", beams), &s, |b, s| {
            b.iter(|| sparse(s, k))
        });
        g.bench_with_input(BenchmarkId::new("dense_mask", beams), &s, |b, s| {
            b.iter(|| dense_mask(s, k, &mut buf))
        });
    }
    g.finish();
}

/// The full-vocabulary normalizer every beam row pays under HF semantics.
fn bench_logsumexp(c: &mut Criterion) {
    let mut g = c.benchmark_group("logsumexp");
    g.sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    let s = step(1, 5);
    g.throughput(criterion::Throughput::Elements(VOCAB as u64));
    g.bench_function("row_49152", |b| {
        b.iter(|| gram::beam::select::logsumexp(&s.lp))
    });
    g.finish();
}

criterion_group!(benches, bench_select, bench_logsumexp);
criterion_main!(benches);
