//! The decoder forward pass for Llama, Qwen2 and Qwen3, top to bottom. Shapes: `T` rows in the
//! batch, `C` hidden, `H`/`Hkv` heads, `D` head dim, `I` MLP width, `V` vocab, `R` logits rows.
//!
//! Two parts: the body (embedding → layers → final norm of the rows whose logits are wanted),
//! which the backend runs as one pass ([`Backend::run_pass`]: a CUDA graph on the GPU), and the
//! LM head, whose shape changes every step (the trie's allowed tokens).

use super::Head;
use super::Model;
use crate::backend::{AttnShape, Backend, KvRows};

pub(super) fn forward<B: Backend>(
    m: &Model<B>,
    kv: &mut B::Kv,
    tokens: &[u32],
    kv_rows: KvRows,
    head: Head,
) -> Vec<f32> {
    let b = &m.backend;
    let logits_rows = match head {
        Head::Full(r) | Head::Picks(r, _) | Head::PicksLse(r, _) => r,
    };
    let normed = b.run_pass(pass_shape(tokens.len(), kv_rows, logits_rows), &mut || {
        body(m, kv, tokens, kv_rows, logits_rows)
    });
    let Some(normed) = normed else {
        return Vec::new();
    };
    let (c, w) = (&m.config, &m.weights);
    let r = logits_rows.len();
    let out = match head {
        Head::Full(_) => {
            let mut logits = b.buf(r * c.vocab_size); // [R, V]
            b.linear(&normed, r, &mut [(w.lm_head(), &mut logits)]);
            b.to_host(logits)
        }
        Head::Picks(_, picks) => b.linear_picks(&normed, w.lm_head().weight, picks),
        Head::PicksLse(_, picks) => {
            let (mut out, lse) = b.head_picks_lse(&normed, r, w.lm_head(), c.vocab_size, picks);
            out.extend(lse);
            out
        }
    };
    b.recycle(normed);
    out
}

/// What decides a pass's launches apart from its data (see [`Backend::run_pass`]): the row
/// count, the logits rows, and per row whether it continues the previous row's sequence,
/// shares its span, and has links (not lengths: a decoding sequence's span and a beam's links
/// grow every step while the pass keeps its shape).
fn pass_shape(t: usize, kv_rows: KvRows, logits_rows: &[usize]) -> u64 {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    let mut mix = |v: u64| h.write_u64(v);
    mix(t as u64);
    mix(logits_rows.len() as u64);
    let mut prev: Option<&crate::backend::RowKv> = None;
    for r in kv_rows.rows {
        let (follows, same_span) =
            prev.map_or((false, false), |p| (r.follows(p), r.span == p.span));
        mix((follows as u64) | (same_span as u64) << 1 | ((r.link.1 > r.link.0) as u64) << 2);
        prev = Some(r);
    }
    h.finish()
}

/// Embedding → layers → the final norm of `logits_rows`: `[R, C]`, or `None` when no logits
/// are wanted (a prefill that only fills the cache).
fn body<B: Backend>(
    m: &Model<B>,
    kv: &mut B::Kv,
    tokens: &[u32],
    kv_rows: KvRows,
    logits_rows: &[usize],
) -> Option<B::Buf> {
    let rows = kv_rows.rows;
    let (b, c, w) = (&m.backend, &m.config, &m.weights);
    let t = tokens.len();
    let (hidden, q_dim, kv_dim, inter) =
        (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let shape = AttnShape {
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
    };

    let mut x = b.buf(t * hidden); // [T, C] residual stream
    let mut h = b.buf(t * hidden); // [T, C] a block's output, added to x
    let mut hn = b.buf(t * hidden); // [T, C] normed input of a block
    let mut q = b.buf(t * q_dim); // [T, H*D]
    let mut k = b.buf(t * kv_dim); // [T, Hkv*D]
    let mut v = b.buf(t * kv_dim); // [T, Hkv*D]
    let mut att = b.buf(t * q_dim); // [T, H*D]
    let mut gate = b.buf(t * inter); // [T, I]
    let mut up = b.buf(t * inter); // [T, I]
    let mut qn = b.buf(t * q_dim); // [T, H*D] Qwen3 normed q
    let mut kn = b.buf(t * kv_dim); // [T, Hkv*D] Qwen3 normed k

    // Token embeddings.
    b.embed(&w.embed_tokens, tokens, &mut x);
    for (l, layer) in w.layers.iter().enumerate() {
        // Attention block: hn = norm(x) (x += the previous block's output first); q, k, v =
        // hn W^T (+ b).
        if l == 0 {
            b.rmsnorm(&x, &layer.input_layernorm, c.rms_norm_eps, hidden, &mut hn);
        } else {
            b.add_rmsnorm(
                &mut x,
                &h,
                &layer.input_layernorm,
                c.rms_norm_eps,
                hidden,
                &mut hn,
            );
        }
        let qkv = [
            layer.q_proj.as_ref(),
            layer.k_proj.as_ref(),
            layer.v_proj.as_ref(),
        ];
        if let (Some(qw), Some(kw)) = (&layer.q_norm, &layer.k_norm) {
            b.linear(
                &hn,
                t,
                &mut [(qkv[0], &mut q), (qkv[1], &mut k), (qkv[2], &mut v)],
            );
            // Qwen3: RMSNorm over each head of q and k, before RoPE.
            b.rmsnorm(&q, qw, c.rms_norm_eps, c.head_dim, &mut qn);
            std::mem::swap(&mut q, &mut qn);
            b.rmsnorm(&k, kw, c.rms_norm_eps, c.head_dim, &mut kn);
            std::mem::swap(&mut k, &mut kn);
            b.rope_store(&mut q, &mut k, &v, kv, l, shape, rows, &m.rope);
        } else {
            // q, k, v projections; rotary positions on q and k; k, v into the cache.
            b.qkv_rope_store(
                &hn, qkv, &mut q, &mut k, &mut v, kv, l, shape, rows, &m.rope,
            );
        }
        // Attend over each row's context.
        b.attention(&q, kv, l, kv_rows, shape, &mut att);
        // h = att W_o^T; x += h, hn = norm(x).
        b.linear(&att, t, &mut [(layer.o_proj.as_ref(), &mut h)]);
        b.add_rmsnorm(
            &mut x,
            &h,
            &layer.post_attention_layernorm,
            c.rms_norm_eps,
            hidden,
            &mut hn,
        );
        // MLP block: h = down(silu(gate(hn)) * up(hn)), added to x by the next norm.
        b.gate_up_silu(
            &hn,
            t,
            layer.gate_proj.as_ref(),
            layer.up_proj.as_ref(),
            &mut gate,
            &mut up,
        );
        b.linear(&gate, t, &mut [(layer.down_proj.as_ref(), &mut h)]);
    }
    b.add(&mut x, &h);

    // Final norm, only for the rows whose logits are wanted.
    let r = logits_rows.len();
    let normed = (r > 0).then(|| {
        let mut picked = b.buf(r * hidden); // [R, C]
        b.gather_rows(&x, hidden, logits_rows, &mut picked);
        let mut normed = b.buf(r * hidden);
        b.rmsnorm(&picked, &w.norm, c.rms_norm_eps, hidden, &mut normed);
        b.recycle(picked);
        normed
    });
    for buf in [x, h, hn, q, k, v, att, gate, up, qn, kn] {
        b.recycle(buf);
    }
    normed
}

#[cfg(test)]
mod tests {
    use super::pass_shape;
    use crate::backend::{KvRows, RowKv};

    fn shape(rows: &[RowKv], links: &[u32], logits: &[usize]) -> u64 {
        pass_shape(rows.len(), KvRows { rows, links }, logits)
    }

    /// 10 beams of one query at generation step `g`: span = the 7-token prompt, g links each.
    fn beams(g: u32) -> Vec<RowKv> {
        (0..10u32)
            .map(|j| RowKv {
                pos: 7 + g,
                entry: 100 + g * 10 + j,
                span: (0, 7),
                link: (j * g, j * g + g),
            })
            .collect()
    }

    #[test]
    fn a_stable_batch_keeps_its_shape_and_a_new_one_does_not() {
        let links = vec![0u32; 400];
        let all: Vec<usize> = (0..10).collect();
        // Beam steps: links grow, the shape stays.
        assert_eq!(
            shape(&beams(2), &links, &all),
            shape(&beams(3), &links, &all)
        );
        assert_eq!(
            shape(&beams(3), &links, &all),
            shape(&beams(15), &links, &all)
        );
        // Contiguous decoding of two sequences: spans grow, the shape stays.
        let step = |p: u32| [RowKv::contiguous(0, p), RowKv::contiguous(64, p)];
        assert_eq!(shape(&step(5), &[], &[0, 1]), shape(&step(6), &[], &[0, 1]));
        // Fewer rows (a beam finished), other logits rows, or a prompt: another shape.
        assert_ne!(
            shape(&beams(3), &links, &all),
            shape(&beams(3)[..9], &links, &all[..9])
        );
        assert_ne!(
            shape(&beams(3), &links, &all),
            shape(&beams(3), &links, &all[..5])
        );
        let prompt: Vec<RowKv> = (0..10).map(|p| RowKv::contiguous(0, p)).collect();
        assert_ne!(shape(&beams(3), &links, &all), shape(&prompt, &[], &all));
        // A beam with no links yet (the first step) differs from one with links.
        assert_ne!(
            shape(&beams(0), &links, &all),
            shape(&beams(1), &links, &all)
        );
    }
}
