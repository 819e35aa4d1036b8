//! The decoder forward pass for Llama, Qwen2 and Qwen3, top to bottom. Shapes: `T` rows in the
//! batch, `C` hidden, `H`/`Hkv` heads, `D` head dim, `I` MLP width, `V` vocab, `R` logits rows.

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
    let mut h = b.buf(t * hidden); // [T, C] normed input of a block
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
        // Attention block: h = norm(x); q, k, v = h W^T (+ b).
        b.rmsnorm(&x, &layer.input_layernorm, c.rms_norm_eps, hidden, &mut h);
        b.linear(
            &h,
            t,
            &mut [
                (layer.q_proj.as_ref(), &mut q),
                (layer.k_proj.as_ref(), &mut k),
                (layer.v_proj.as_ref(), &mut v),
            ],
        );
        // Qwen3: RMSNorm over each head of q and k, before RoPE.
        if let (Some(qw), Some(kw)) = (&layer.q_norm, &layer.k_norm) {
            b.rmsnorm(&q, qw, c.rms_norm_eps, c.head_dim, &mut qn);
            std::mem::swap(&mut q, &mut qn);
            b.rmsnorm(&k, kw, c.rms_norm_eps, c.head_dim, &mut kn);
            std::mem::swap(&mut k, &mut kn);
        }
        // Rotary positions on q and k.
        b.rope(&mut q, shape.heads, rows, &m.rope);
        b.rope(&mut k, shape.kv_heads, rows, &m.rope);
        // Append k, v to the cache; attend over each row's own sequence.
        b.kv_store(kv, l, &k, &v, rows);
        b.attention(&q, kv, l, kv_rows, shape, &mut att);
        // x += att W_o^T.
        b.linear(&att, t, &mut [(layer.o_proj.as_ref(), &mut h)]);
        b.add(&mut x, &h);

        // MLP block: x += down(silu(gate(h)) * up(h)), h = norm(x).
        b.rmsnorm(
            &x,
            &layer.post_attention_layernorm,
            c.rms_norm_eps,
            hidden,
            &mut h,
        );
        b.linear(
            &h,
            t,
            &mut [
                (layer.gate_proj.as_ref(), &mut gate),
                (layer.up_proj.as_ref(), &mut up),
            ],
        );
        b.silu_mul(&mut gate, &up);
        b.linear(&gate, t, &mut [(layer.down_proj.as_ref(), &mut h)]);
        b.add(&mut x, &h);
    }

    // Final norm and LM head, only for the rows whose logits are wanted.
    let logits_rows = match head {
        Head::Full(r) | Head::Picks(r, _) | Head::PicksLse(r, _) => r,
    };
    let r = logits_rows.len();
    if r == 0 {
        for buf in [x, h, q, k, v, att, gate, up, qn, kn] {
            b.recycle(buf);
        }
        return Vec::new();
    }
    let mut picked = b.buf(r * hidden); // [R, C]
    b.gather_rows(&x, hidden, logits_rows, &mut picked);
    let mut normed = b.buf(r * hidden);
    b.rmsnorm(&picked, &w.norm, c.rms_norm_eps, hidden, &mut normed);
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
    for buf in [x, h, q, k, v, att, gate, up, qn, kn, picked, normed] {
        b.recycle(buf);
    }
    out
}
