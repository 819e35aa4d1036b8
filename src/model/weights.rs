//! Checkpoint tensors → typed per-layer weights. The only file that knows HF tensor names.
//! Every expected tensor is checked for presence and shape against the config; an unexpected
//! tensor is an error too, so a checkpoint that does not fit its config never loads silently.

use std::collections::HashMap;

use crate::backend::{Backend, Linear, LinearRef};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::checkpoint::TensorMap;
use crate::tensor::{self, DType, HostTensor};

/// One decoder layer.
pub struct Layer<W> {
    pub input_layernorm: W,
    pub q_proj: Linear<W>,
    pub k_proj: Linear<W>,
    pub v_proj: Linear<W>,
    pub o_proj: Linear<W>,
    /// Qwen3: RMSNorm over each head of q and k, `[D]`.
    pub q_norm: Option<W>,
    pub k_norm: Option<W>,
    pub post_attention_layernorm: W,
    pub gate_proj: Linear<W>,
    pub up_proj: Linear<W>,
    pub down_proj: Linear<W>,
}

/// All weights of a decoder.
pub struct Weights<W> {
    pub embed_tokens: W,
    pub layers: Vec<Layer<W>>,
    pub norm: W,
    /// The output projection; `None` when tied to `embed_tokens` (see `lm_head()`).
    lm_head: Option<Linear<W>>,
}

impl<W> Weights<W> {
    /// The LM head `[V, C]`: its own matrix, or the embedding when tied.
    pub fn lm_head(&self) -> LinearRef<'_, W> {
        match &self.lm_head {
            Some(l) => l.as_ref(),
            None => LinearRef {
                weight: &self.embed_tokens,
                bias: None,
            },
        }
    }
}

/// Takes tensors out of a [`TensorMap`] with shape checks.
struct Take<'a, B: Backend> {
    map: TensorMap,
    backend: &'a B,
}

impl<B: Backend> Take<'_, B> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self
            .map
            .remove(name)
            .ok_or_else(|| Error::tensor(name, "missing from the checkpoint"))?;
        if t.shape() != shape {
            return Err(Error::tensor(
                name,
                format!(
                    "shape {:?} does not fit the config (expected {shape:?})",
                    t.shape()
                ),
            ));
        }
        Ok(t)
    }

    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<B::Weight> {
        let t = self.tensor(name, shape)?;
        self.backend.upload(t)
    }

    /// Norm weights (f32, like every vector: see `load`).
    fn norm(&mut self, name: &str, dim: usize) -> Result<B::Weight> {
        self.weight(name, &[dim])
    }

    fn linear(
        &mut self,
        prefix: &str,
        n: usize,
        k: usize,
        bias: bool,
    ) -> Result<Linear<B::Weight>> {
        let weight = self.weight(&format!("{prefix}.weight"), &[n, k])?;
        let bias = if bias {
            Some(self.weight(&format!("{prefix}.bias"), &[n])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
}

/// How many tensors `c` takes (a checkpoint with many more is refused before its table is read
/// into memory: `model::gguf`).
pub(crate) fn expected_count(c: &ModelConfig) -> usize {
    expected(c).len()
}

/// Every tensor `c` takes, with its shape, in the order [`load`] takes them.
fn expected(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, q, kv, i) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, h],
    )];
    let linear = |out: &mut Vec<_>, prefix: String, n: usize, k: usize, bias: bool| {
        out.push((format!("{prefix}.weight"), vec![n, k]));
        if bias {
            out.push((format!("{prefix}.bias"), vec![n]));
        }
    };
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        linear(&mut out, format!("{p}.self_attn.q_proj"), q, h, c.qkv_bias);
        linear(&mut out, format!("{p}.self_attn.k_proj"), kv, h, c.qkv_bias);
        linear(&mut out, format!("{p}.self_attn.v_proj"), kv, h, c.qkv_bias);
        linear(&mut out, format!("{p}.self_attn.o_proj"), h, q, c.o_bias);
        if c.qk_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![c.head_dim]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![c.head_dim]));
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        linear(&mut out, format!("{p}.mlp.gate_proj"), i, h, c.mlp_bias);
        linear(&mut out, format!("{p}.mlp.up_proj"), i, h, c.mlp_bias);
        linear(&mut out, format!("{p}.mlp.down_proj"), h, i, c.mlp_bias);
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    out
}

/// The file's tensors checked against the config before any is converted: each expected one
/// present with its shape, no other one. Returns them without the ones the engine ignores: rotary
/// tables (old Llama checkpoints store them; they are recomputed) and a stored `lm_head` that
/// tied embeddings replace (HF ignores it too).
fn check_names_and_shapes(c: &ModelConfig, mut map: TensorMap) -> Result<TensorMap> {
    check_shapes(c, map.iter().map(|(n, t)| (n.as_str(), t.shape())))?;
    map.retain(|n, _| !ignored(c, n));
    Ok(map)
}

/// Tensors a checkpoint may hold that the engine does not read (the GGUF reader skips them
/// before converting anything).
pub(crate) fn ignored(c: &ModelConfig, name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq") || name == "lm_head.weight" && c.tie_word_embeddings
}

/// The checks of [`check_names_and_shapes`] on names and shapes alone, for a reader that would
/// otherwise spend memory before them (the GGUF reader widens some block types to f32).
pub(crate) fn check_shapes<'a>(
    c: &ModelConfig,
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
) -> Result<()> {
    let have: HashMap<&str, &[usize]> = tensors.into_iter().collect();
    let want = expected(c);
    for (name, shape) in &want {
        let got = have
            .get(name.as_str())
            .ok_or_else(|| Error::tensor(name, "missing from the checkpoint"))?;
        if *got != shape.as_slice() {
            return Err(Error::tensor(
                name,
                format!("shape {got:?} does not fit the config (expected {shape:?})"),
            ));
        }
    }
    let known: std::collections::HashSet<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(name) = have
        .keys()
        .filter(|n| !known.contains(*n) && !ignored(c, n))
        .min()
    {
        return Err(Error::tensor(
            *name,
            format!(
                "not expected for {:?} with {} layers",
                c.arch, c.num_hidden_layers
            ),
        ));
    }
    Ok(())
}

/// Builds the weights of `config` from `map`. `dtype` converts every matrix at load (None keeps
/// the stored dtype, borrowed from the mapped file).
pub fn load<B: Backend>(
    backend: &B,
    config: &ModelConfig,
    map: TensorMap,
    dtype: Option<DType>,
) -> Result<Weights<B::Weight>> {
    let c = config;
    // Names and shapes first: converting or laying out panels for a tensor the config has no
    // place for, or of another shape (a `[1, k]` matrix is padded to 32 rows of panels), would
    // spend memory on a file about to be refused.
    let map = check_names_and_shapes(c, map)?;
    // The vectors (norms, biases) are small enough to check whole: a NaN or inf there (a
    // corrupt file) would turn every logit into NaN, which beam search and the index would
    // take as "no candidate" rather than fail. (Matrices are too big to scan at load; the index
    // build refuses the non-finite probabilities they give.)
    for (name, t) in &map {
        if t.shape().len() == 1 {
            let v = t.view();
            if let Some(i) = (0..t.numel()).find(|&i| !v.get(i).is_finite()) {
                return Err(Error::tensor(
                    name,
                    format!("element {i} is {} (not finite)", v.get(i)),
                ));
            }
        }
    }
    // Matrices in the dtype asked for, vectors (norms, biases) in f32; then everything that is
    // not read from the file goes into one huge-page arena.
    let mut map: TensorMap = map
        .into_iter()
        .map(|(name, t)| {
            let want = if t.shape().len() == 1 {
                Some(DType::F32)
            } else {
                dtype
            };
            let t = match want {
                Some(d) => t.into_dtype(d),
                // Block-typed matrices stay as stored (the CPU's panels keep them blocks).
                None => t,
            };
            // The backend's matmul layout (the CPU's panels), only for matrices a matmul reads:
            // the layers' linears and the LM head (the embedding when tied). A separate
            // embedding is only gathered by rows.
            let matmul = name.starts_with("model.layers.")
                || name == "lm_head.weight" && !c.tie_word_embeddings
                || name == "model.embed_tokens.weight" && c.tie_word_embeddings;
            let panels = if matmul {
                backend.host_panels(&t)
            } else {
                None
            };
            (name, t.with_panels(panels))
        })
        .collect();
    tensor::pack(map.values_mut());
    tensor::pack(map.values_mut().filter_map(HostTensor::panels_mut));
    let mut take = Take { map, backend };
    let (h, q, kv, i) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let embed = take.tensor("model.embed_tokens.weight", &[c.vocab_size, h])?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let qk_norm = |take: &mut Take<B>, which: &str| -> Result<Option<B::Weight>> {
            if c.qk_norm {
                Ok(Some(take.norm(
                    &format!("{p}.self_attn.{which}.weight"),
                    c.head_dim,
                )?))
            } else {
                Ok(None)
            }
        };
        layers.push(Layer {
            input_layernorm: take.norm(&format!("{p}.input_layernorm.weight"), h)?,
            q_proj: take.linear(&format!("{p}.self_attn.q_proj"), q, h, c.qkv_bias)?,
            k_proj: take.linear(&format!("{p}.self_attn.k_proj"), kv, h, c.qkv_bias)?,
            v_proj: take.linear(&format!("{p}.self_attn.v_proj"), kv, h, c.qkv_bias)?,
            o_proj: take.linear(&format!("{p}.self_attn.o_proj"), h, q, c.o_bias)?,
            q_norm: qk_norm(&mut take, "q_norm")?,
            k_norm: qk_norm(&mut take, "k_norm")?,
            post_attention_layernorm: take
                .norm(&format!("{p}.post_attention_layernorm.weight"), h)?,
            gate_proj: take.linear(&format!("{p}.mlp.gate_proj"), i, h, c.mlp_bias)?,
            up_proj: take.linear(&format!("{p}.mlp.up_proj"), i, h, c.mlp_bias)?,
            down_proj: take.linear(&format!("{p}.mlp.down_proj"), h, i, c.mlp_bias)?,
        });
    }
    let norm = take.norm("model.norm.weight", h)?;
    let lm_head = if c.tie_word_embeddings {
        None // the embedding's (a stored copy was dropped by the check)
    } else {
        Some(take.linear("lm_head", c.vocab_size, h, false)?)
    };
    let embed_tokens = backend.upload(embed)?;
    // `expected` and the takes above list the same tensors; a leftover means they drifted.
    if let Some(name) = take.map.keys().min() {
        return Err(Error::tensor(
            name.clone(),
            "checked but not loaded; this is a bug",
        ));
    }
    Ok(Weights {
        embed_tokens,
        layers,
        norm,
        lm_head,
    })
}
