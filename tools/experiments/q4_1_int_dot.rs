//! Prototype, not part of gram (twenty-fifth session; docs/PERF.md, "Q4_1 against integer dot
//! products"): the ten-row Q4_1 panel product three ways, one core, weights in L2:
//! - `f32_panel`: what gram runs (nibbles widened, `q·d + m` in f32, ten broadcast FMAs);
//! - `vnni_panel`: activations quantized to int8 per row and block of 32, `vpdpbusd`
//!   (u8 × s8, 4 products a lane), then `d·s·Σqx + m·Σx` per block;
//! - `vnni16_panel`: activations quantized to int16, `vpdpwssd` (s16 × s16, 2 a lane).
//! Checks every output against an f64 sum over the exactly dequantized weights, then times
//! each (GFLOP/s counts 2 per weight and row, as for the f32 path). Needs AVX512-VNNI. Build it
//! as gram is built, without `-C target-cpu=native` (the kernels carry their own target
//! features; with `native` this compiler's register allocation made both paths 15-35 % slower):
//!   rustc -O --edition 2021 tools/experiments/q4_1_int_dot.rs -o /tmp/q4_1_int_dot && /tmp/q4_1_int_dot
use std::arch::x86_64::*;
use std::time::Instant;

const K: usize = 576; // input columns
const TR: usize = 10;
const NB: usize = K / 32;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

// Packed VNNI layout per block: 8 groups of 4 k; per group 64 bytes: byte (4*c + j) (c = column
// 0..15, j = 0..3) holds q[k=4g+j][c] in its low nibble and q[4g+j][c+16] in its high one.
struct Panel {
    q: Vec<u8>,
    q16: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
    qraw: Vec<u8>,
}

fn make(r: &mut Rng, np: usize) -> Vec<Panel> {
    (0..np)
        .map(|_| {
            let mut qraw = vec![0u8; K * 32];
            for v in qraw.iter_mut() {
                *v = (r.next() % 16) as u8;
            }
            let d: Vec<f32> = (0..NB * 32).map(|_| 0.01 + 0.01 * r.f().abs()).collect();
            let m: Vec<f32> = (0..NB * 32).map(|_| -0.08 * r.f().abs()).collect();
            let mut q = vec![0u8; NB * 8 * 64];
            for b in 0..NB {
                for g in 0..8 {
                    for c in 0..16 {
                        for j in 0..4 {
                            let k = 32 * b + 4 * g + j;
                            q[(b * 8 + g) * 64 + 4 * c + j] =
                                qraw[k * 32 + c] | (qraw[k * 32 + c + 16] << 4);
                        }
                    }
                }
            }
            // int16 layout: per pair of k (16 per block), 32 bytes: byte (2*c + j) holds
            // q[k=2p+j][c] low, q[2p+j][c+16] high.
            let mut q16 = vec![0u8; NB * 16 * 32];
            for b in 0..NB {
                for pp in 0..16 {
                    for c in 0..16 {
                        for j in 0..2 {
                            let k = 32 * b + 2 * pp + j;
                            q16[(b * 16 + pp) * 32 + 2 * c + j] =
                                qraw[k * 32 + c] | (qraw[k * 32 + c + 16] << 4);
                        }
                    }
                }
            }
            Panel { q, q16, d, m, qraw }
        })
        .collect()
}

// Exact-dequant f32 reference (what gram computes today), f64 accumulate for checking.
fn reference(p: &Panel, x: &[f32], y: &mut [[f64; 32]; TR]) {
    for t in 0..TR {
        for c in 0..32 {
            let mut s = 0f64;
            for k in 0..K {
                let b = k / 32;
                let w = (p.qraw[k * 32 + c] as f32).mul_add(p.d[b * 32 + c], p.m[b * 32 + c]);
                s += w as f64 * x[t * K + k] as f64;
            }
            y[t][c] = s;
        }
    }
}

// Activations quantized per row per block of 32: xq = round(x / s), s = max|x| / 127.
struct QX {
    xq: Vec<i8>,
    s: Vec<f32>,
    sum: Vec<f32>,
}
struct QX16 {
    xq: Vec<i16>,
    s: Vec<f32>,
    sum: Vec<f32>,
}
fn quantize16(x: &[f32]) -> QX16 {
    let mut xq = vec![0i16; TR * K];
    let mut s = vec![0f32; TR * NB];
    let mut sum = vec![0f32; TR * NB];
    for t in 0..TR {
        for b in 0..NB {
            let blk = &x[t * K + 32 * b..t * K + 32 * b + 32];
            let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
            let sc = amax / 32767.0;
            let inv = if sc > 0.0 { 1.0 / sc } else { 0.0 };
            let mut tot = 0i64;
            for (j, v) in blk.iter().enumerate() {
                let q = (v * inv).round() as i32;
                xq[t * K + 32 * b + j] = q as i16;
                tot += q as i64;
            }
            s[t * NB + b] = sc;
            sum[t * NB + b] = tot as f32 * sc;
        }
    }
    QX16 { xq, s, sum }
}

fn quantize(x: &[f32]) -> QX {
    let mut xq = vec![0i8; TR * K];
    let mut s = vec![0f32; TR * NB];
    let mut sum = vec![0f32; TR * NB];
    for t in 0..TR {
        for b in 0..NB {
            let blk = &x[t * K + 32 * b..t * K + 32 * b + 32];
            let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
            let sc = amax / 127.0;
            let inv = if sc > 0.0 { 1.0 / sc } else { 0.0 };
            let mut tot = 0i32;
            for (j, v) in blk.iter().enumerate() {
                let q = (v * inv).round() as i32;
                xq[t * K + 32 * b + j] = q as i8;
                tot += q;
            }
            s[t * NB + b] = sc;
            sum[t * NB + b] = tot as f32 * sc;
        }
    }
    QX { xq, s, sum }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni_panel(p: &Panel, qx: &QX, out: &mut [[f32; 32]; TR]) {
    let mut y = [[_mm512_setzero_ps(); 2]; TR];
    let lo = _mm512_set1_epi8(0x0f);
    for b in 0..NB {
        let mut a = [[_mm512_setzero_si512(); 2]; TR];
        for g in 0..8 {
            let v = _mm512_loadu_si512(p.q.as_ptr().add((b * 8 + g) * 64) as *const _);
            let w0 = _mm512_and_si512(v, lo);
            let w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo);
            for t in 0..TR {
                let xb =
                    _mm512_set1_epi32(*(qx.xq.as_ptr().add(t * K + 32 * b + 4 * g) as *const i32));
                a[t][0] = _mm512_dpbusd_epi32(a[t][0], w0, xb);
                a[t][1] = _mm512_dpbusd_epi32(a[t][1], w1, xb);
            }
        }
        let d0 = _mm512_loadu_ps(p.d.as_ptr().add(b * 32));
        let d1 = _mm512_loadu_ps(p.d.as_ptr().add(b * 32 + 16));
        let m0 = _mm512_loadu_ps(p.m.as_ptr().add(b * 32));
        let m1 = _mm512_loadu_ps(p.m.as_ptr().add(b * 32 + 16));
        for t in 0..TR {
            let s = _mm512_set1_ps(qx.s[t * NB + b]);
            let su = _mm512_set1_ps(qx.sum[t * NB + b]);
            y[t][0] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(a[t][0]),
                _mm512_mul_ps(d0, s),
                _mm512_fmadd_ps(m0, su, y[t][0]),
            );
            y[t][1] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(a[t][1]),
                _mm512_mul_ps(d1, s),
                _mm512_fmadd_ps(m1, su, y[t][1]),
            );
        }
    }
    for t in 0..TR {
        _mm512_storeu_ps(out[t].as_mut_ptr(), y[t][0]);
        _mm512_storeu_ps(out[t].as_mut_ptr().add(16), y[t][1]);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni16_panel(p: &Panel, qx: &QX16, out: &mut [[f32; 32]; TR]) {
    let mut y = [[_mm512_setzero_ps(); 2]; TR];
    let lo = _mm512_set1_epi16(0x0f);
    for b in 0..NB {
        let mut a = [[_mm512_setzero_si512(); 2]; TR];
        for pp in 0..16 {
            let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                p.q16.as_ptr().add((b * 16 + pp) * 32) as *const _,
            ));
            let w0 = _mm512_and_si512(v, lo);
            let w1 = _mm512_srli_epi16(v, 4);
            for t in 0..TR {
                let xb =
                    _mm512_set1_epi32(*(qx.xq.as_ptr().add(t * K + 32 * b + 2 * pp) as *const i32));
                a[t][0] = _mm512_dpwssd_epi32(a[t][0], w0, xb);
                a[t][1] = _mm512_dpwssd_epi32(a[t][1], w1, xb);
            }
        }
        let d0 = _mm512_loadu_ps(p.d.as_ptr().add(b * 32));
        let d1 = _mm512_loadu_ps(p.d.as_ptr().add(b * 32 + 16));
        let m0 = _mm512_loadu_ps(p.m.as_ptr().add(b * 32));
        let m1 = _mm512_loadu_ps(p.m.as_ptr().add(b * 32 + 16));
        for t in 0..TR {
            let s = _mm512_set1_ps(qx.s[t * NB + b]);
            let su = _mm512_set1_ps(qx.sum[t * NB + b]);
            y[t][0] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(a[t][0]),
                _mm512_mul_ps(d0, s),
                _mm512_fmadd_ps(m0, su, y[t][0]),
            );
            y[t][1] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(a[t][1]),
                _mm512_mul_ps(d1, s),
                _mm512_fmadd_ps(m1, su, y[t][1]),
            );
        }
    }
    for t in 0..TR {
        _mm512_storeu_ps(out[t].as_mut_ptr(), y[t][0]);
        _mm512_storeu_ps(out[t].as_mut_ptr().add(16), y[t][1]);
    }
}

// The f32 path as gram runs it (nibbles unpacked per pair row, q*d+m, 10 broadcast FMAs),
// simplified layout: qraw row k = 32 bytes.
#[target_feature(enable = "avx512f,avx512bw,fma")]
unsafe fn f32_panel(p: &Panel, x: &[f32], out: &mut [[f32; 32]; TR]) {
    let mut a = [[_mm512_setzero_ps(); 2]; TR];
    for b in 0..NB {
        let d0 = _mm512_loadu_ps(p.d.as_ptr().add(b * 32));
        let d1 = _mm512_loadu_ps(p.d.as_ptr().add(b * 32 + 16));
        let m0 = _mm512_loadu_ps(p.m.as_ptr().add(b * 32));
        let m1 = _mm512_loadu_ps(p.m.as_ptr().add(b * 32 + 16));
        for j in 0..32 {
            let k = 32 * b + j;
            let r = p.qraw.as_ptr().add(k * 32);
            let w0 = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(r as *const _))),
                d0,
                m0,
            );
            let w1 = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(r.add(16) as *const _))),
                d1,
                m1,
            );
            for t in 0..TR {
                let xb = _mm512_set1_ps(*x.as_ptr().add(t * K + k));
                a[t][0] = _mm512_fmadd_ps(w0, xb, a[t][0]);
                a[t][1] = _mm512_fmadd_ps(w1, xb, a[t][1]);
            }
        }
    }
    for t in 0..TR {
        _mm512_storeu_ps(out[t].as_mut_ptr(), a[t][0]);
        _mm512_storeu_ps(out[t].as_mut_ptr().add(16), a[t][1]);
    }
}

fn main() {
    if !is_x86_feature_detected!("avx512vnni") || !is_x86_feature_detected!("avx512bw") {
        eprintln!("error: this CPU has no AVX512-VNNI");
        std::process::exit(2);
    }
    let mut r = Rng(7);
    let np = 48; // 48 panels: 1536 columns; packed Q4_1 ~ 48 * 9.8 KB = 470 KB (in L2)
    let panels = make(&mut r, np);
    let x: Vec<f32> = (0..TR * K).map(|_| r.f()).collect();
    let qx = quantize(&x);
    let qx16 = quantize16(&x);
    // Accuracy on every element of every panel.
    let (mut e_f32, mut e_q, mut e16, mut scale) = (0f64, 0f64, 0f64, 0f64);
    for p in &panels {
        let mut want = [[0f64; 32]; TR];
        reference(p, &x, &mut want);
        let mut a = [[0f32; 32]; TR];
        let mut b = [[0f32; 32]; TR];
        let mut h = [[0f32; 32]; TR];
        unsafe {
            f32_panel(p, &x, &mut a);
            vnni_panel(p, &qx, &mut b);
            vnni16_panel(p, &qx16, &mut h);
        }
        for t in 0..TR {
            for c in 0..32 {
                e_f32 = e_f32.max((a[t][c] as f64 - want[t][c]).abs());
                e_q = e_q.max((b[t][c] as f64 - want[t][c]).abs());
                e16 = e16.max((h[t][c] as f64 - want[t][c]).abs());
                scale = scale.max(want[t][c].abs());
            }
        }
    }
    println!("max |y| {scale:.3}; max err f32 path {e_f32:.3e}; int8-activation path {e_q:.3e} ({:.2e} of max |y|); int16 {e16:.3e} ({:.2e})", e_q / scale, e16 / scale);
    let flops = (2 * TR * K * 32 * np) as f64;
    for rep in 0..3 {
        let mut sink = 0f32;
        let mut o = [[0f32; 32]; TR];
        let n = 400;
        let t0 = Instant::now();
        for _ in 0..n {
            for p in &panels {
                unsafe { f32_panel(p, &x, &mut o) };
                sink += std::hint::black_box(&mut o)[3][5];
            }
        }
        let tf = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        for _ in 0..n {
            let q = quantize(&x);
            for p in &panels {
                unsafe { vnni_panel(p, &q, &mut o) };
                sink += std::hint::black_box(&mut o)[3][5];
            }
        }
        let tq = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        for _ in 0..n {
            for p in &panels {
                unsafe { vnni_panel(p, &qx, &mut o) };
                sink += std::hint::black_box(&mut o)[3][5];
            }
        }
        let tq2 = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        for _ in 0..n {
            for p in &panels {
                unsafe { vnni16_panel(p, &qx16, &mut o) };
                sink += std::hint::black_box(&mut o)[3][5];
            }
        }
        let t16 = t0.elapsed().as_secs_f64();
        println!(
            "rep {rep}: int16 kernel {:.1}",
            flops * n as f64 / t16 / 1e9
        );
        println!("rep {rep}: f32 path {:.1} GFLOP/s; vnni incl. quantizing x {:.1}; vnni kernel only {:.1} ({sink})",
            flops * n as f64 / tf / 1e9, flops * n as f64 / tq / 1e9, flops * n as f64 / tq2 / 1e9);
    }
}
