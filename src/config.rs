//! HF `config.json` → [`ModelConfig`]. The raw file is read permissively (HF keys verbatim, both
//! the transformers 4 `rope_theta` and the transformers 5 `rope_parameters` spellings), then
//! converted once into a validated config with derived dimensions. No other file knows HF
//! config keys.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The decoder families gram runs. Their differences are flags on [`ModelConfig`], not code paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` (SmolLM2, Llama 2/3, Llama 3.1/3.2 with `llama3` rope scaling).
    Llama,
    /// `Qwen2ForCausalLM`: q/k/v projections carry a bias.
    Qwen2,
    /// `Qwen3ForCausalLM`: RMSNorm on q and k per head, explicit `head_dim`.
    Qwen3,
}

impl Arch {
    fn from_hf(name: &str) -> Option<Arch> {
        match name {
            "LlamaForCausalLM" | "llama" => Some(Arch::Llama),
            "Qwen2ForCausalLM" | "qwen2" => Some(Arch::Qwen2),
            "Qwen3ForCausalLM" | "qwen3" => Some(Arch::Qwen3),
            _ => None,
        }
    }
}

/// Validated model hyper-parameters (HF names kept where HF defines them).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f32,
    /// How the rotary frequencies are scaled (`rope_scaling` / `rope_parameters`).
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    /// q/k/v projections have a bias (Qwen2 always; Llama/Qwen3 when `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj has a bias (Llama/Qwen3 when `attention_bias`).
    pub o_bias: bool,
    /// gate/up/down projections have a bias (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// RMSNorm on q and k per head before RoPE (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The rotary scalings transformers computes once, at load, from the config alone (its
/// `ROPE_INIT_FUNCTIONS` for Llama, Qwen2 and Qwen3), with their values as the config gives
/// them (f64, as Python holds them); `model::rope` applies them in transformers' f32 steps.
/// The others (`dynamic`, whose frequencies change with each call's length, `yarn`,
/// `longrope`, ...) are refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `default`: `inv_freq[i] = 1 / theta^(2i/D)`.
    None,
    /// `linear`: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// `llama3` (Llama 3.1 and later): frequencies whose wavelength is longer than
    /// `original_max_position_embeddings / low_freq_factor` divided by `factor`, those shorter
    /// than `.. / high_freq_factor` kept, the ones between interpolated.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl ModelConfig {
    /// Width of one token's K (or V) row: `Hkv * D`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Width of one token's Q row: `H * D`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = crate::container::read_capped(path, crate::container::JSON_CAP)
            .map_err(|e| Error::io(path, e))?;
        ModelConfig::from_json(&text).map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// Adds the `eos_token_id`s of the `generation_config.json` at `path`, if there is one, after
    /// config.json's own (which stay first: the first is the EOS that ends codes). HF's
    /// `generate` stops on that file's list, which for instruct models often names more end
    /// tokens than config.json (Qwen2.5: `<|im_end|>` and `<|endoftext|>`).
    pub fn with_generation_config(mut self, path: &Path) -> Result<ModelConfig> {
        let text = match crate::container::read_capped(path, crate::container::JSON_CAP) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(self),
            Err(e) => return Err(Error::io(path, e)),
        };
        let bad = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let v: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if !v.is_object() {
            return Err(bad(format!("must be a JSON object, not {}", json_kind(&v))));
        }
        let ids = token_ids(&v.get("eos_token_id").cloned(), "eos_token_id").map_err(bad)?;
        // transformers' `generate` stops on this file's list alone; gram stops on config.json's
        // ids too (the first ends codes). Where they part, say so.
        let only_config: Vec<u32> = (self.eos_token_ids.iter())
            .filter(|id| !ids.contains(id))
            .copied()
            .collect();
        if !only_config.is_empty() {
            tracing::warn!(
                "{}: its eos_token_id leaves out config.json's {only_config:?}; transformers' \
                 generate would not stop there, gram does (its codes end with config.json's first)",
                path.display()
            );
        }
        for id in ids {
            // An extra stop token past the vocabulary can never be generated (transformers'
            // `generate` just never meets it): dropped with a warning, not a refused model.
            if id as usize >= self.vocab_size {
                tracing::warn!(
                    "{}: eos_token_id {id} is past the vocabulary ({}); ignored",
                    path.display(),
                    self.vocab_size
                );
                continue;
            }
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        let ignored = beam_search_settings(&v);
        if !ignored.is_empty() {
            tracing::warn!(
                "{}: {} would change transformers' greedy and beam search (its `generate` \
                 applies them with do_sample=False too); gram's do not, so its codes, scores \
                 and greedy text follow `generate` called with them unset",
                path.display(),
                ignored.join(", ")
            );
        }
        Ok(self)
    }

    /// Parses and validates the text of a `config.json`; the error is a message for the user.
    pub fn from_json(text: &str) -> std::result::Result<ModelConfig, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        if !v.is_object() {
            return Err(format!("must be a JSON object, not {}", json_kind(&v)));
        }
        let raw: RawConfig =
            serde_json::from_value(v.clone()).map_err(|e| match failing_key::<RawConfig>(&v) {
                Some(k) => format!("`{k}`: {e}"),
                None => e.to_string(),
            })?;
        raw.validate()
    }
}

/// What kind of JSON value `v` is, for a message.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The key of the object `v` that `T` refuses on its own: serde says what it expected, not of
/// which key. For structs whose every field has a default, so that one key alone fails only
/// by its own value.
pub(crate) fn failing_key<T: serde::de::DeserializeOwned>(v: &Value) -> Option<String> {
    v.as_object()?
        .iter()
        .find(|(k, x)| {
            let one = [((*k).clone(), (*x).clone())].into_iter().collect();
            serde_json::from_value::<T>(Value::Object(one)).is_err()
        })
        .map(|(k, _)| k.clone())
}

/// A key that is there, `null` or not (`Some(None)` for `null`); with `#[serde(default)]`, an
/// absent key is `None`.
fn present<'de, D, T>(d: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `config.json` as HF writes it: every key optional so that a missing one gets a clear message.
#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    /// `Some(None)`: given as `null` (transformers then takes the head count), not absent.
    #[serde(default, deserialize_with = "present")]
    num_key_value_heads: Option<Option<usize>>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    rope_theta: Option<f64>,
    /// transformers 5 puts a top-level one into the rope parameters over theirs.
    original_max_position_embeddings: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<Value>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    /// Qwen2 / Qwen3: the attention kind of each layer (transformers 5).
    layer_types: Option<Value>,
    /// transformers 5.24's per-layer overrides of any attribute.
    per_layer_config: Option<Value>,
    bos_token_id: Option<Value>,
    /// Absent means none, for Llama too: transformers' LlamaConfig defaults the attribute to
    /// 2, but transformers 5's `generate` builds its settings from the file's own keys (or
    /// `generation_config.json`), so without the key it never stops.
    eos_token_id: Option<Value>,
}

fn required(v: Option<usize>, key: &str) -> std::result::Result<usize, String> {
    match v {
        None => Err(format!("missing field `{key}`")),
        Some(0) => Err(format!("`{key}` must be positive")),
        Some(n) => Ok(n),
    }
}

/// A token id field: a number, a list of numbers, or null.
fn token_ids(v: &Option<Value>, key: &str) -> std::result::Result<Vec<u32>, String> {
    let bad = || format!("`{key}` must be a token id or a list of token ids");
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(bad)
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        // Real models name a handful; a list of millions would be merged id by id.
        Some(Value::Array(items)) if items.len() > MAX_TOKEN_IDS => Err(format!(
            "`{key}` lists {} token ids; at most {MAX_TOKEN_IDS} are accepted",
            items.len()
        )),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// Most ids a `*_token_id` list may hold.
const MAX_TOKEN_IDS: usize = 1024;

impl RawConfig {
    fn validate(self) -> std::result::Result<ModelConfig, String> {
        let arch_name = self
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| self.model_type.clone())
            .ok_or("missing field `architectures` (and no `model_type`)")?;
        let arch = Arch::from_hf(&arch_name).ok_or_else(|| {
            format!(
                "unsupported architecture `{arch_name}` (supported: LlamaForCausalLM, \
                 Qwen2ForCausalLM, Qwen3ForCausalLM)"
            )
        })?;
        // transformers' Auto classes choose the model by `model_type`: a Mistral config that
        // names LlamaForCausalLM runs as Mistral there (sliding-window attention and all).
        if let Some(mt) = &self.model_type {
            if Arch::from_hf(mt) != Some(arch) {
                return Err(format!(
                    "`architectures` names `{arch_name}` but `model_type` is `{mt}`, which \
                     transformers loads by (supported: llama, qwen2, qwen3)"
                ));
            }
        }
        let hidden_size = required(self.hidden_size, "hidden_size")?;
        let intermediate_size = required(self.intermediate_size, "intermediate_size")?;
        let num_hidden_layers = required(self.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = required(self.num_attention_heads, "num_attention_heads")?;
        let vocab_size = required(self.vocab_size, "vocab_size")?;
        // transformers' defaults: `null` is the head count; an absent key is the class
        // default, the head count for Llama and 32 for Qwen2 and Qwen3 (whatever the head
        // count).
        let kv_default = match arch {
            Arch::Llama => num_attention_heads,
            Arch::Qwen2 | Arch::Qwen3 => 32,
        };
        let num_key_value_heads = required(
            Some(match self.num_key_value_heads {
                Some(Some(n)) => n,
                Some(None) => num_attention_heads,
                None => kv_default,
            }),
            "num_key_value_heads",
        )?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of \
                 num_key_value_heads ({num_key_value_heads})"
            ));
        }
        // HF defaults: Llama/Qwen2 derive head_dim from the width, Qwen3 defaults to 128.
        let head_dim = match (self.head_dim, arch) {
            (Some(d), _) => d,
            (None, Arch::Qwen3) => 128,
            (None, _) => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(format!(
                        "hidden_size ({hidden_size}) is not a multiple of num_attention_heads \
                         ({num_attention_heads}) and no `head_dim` is given"
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!(
                "head_dim ({head_dim}) must be positive and even for RoPE"
            ));
        }
        // Far past any real checkpoint (the largest use a few thousand of each), and small
        // enough that every derived size (`H * D`, RoPE and KV rows) fits in memory arithmetic:
        // a corrupt config is refused here instead of overflowing an allocation later.
        for (key, value, limit) in [
            ("hidden_size", hidden_size, 1 << 17),
            ("intermediate_size", intermediate_size, 1 << 20),
            ("num_hidden_layers", num_hidden_layers, 1 << 12),
            ("num_attention_heads", num_attention_heads, 1 << 12),
            // Real checkpoints use 64–256; the RoPE table is max_pos × head_dim (a head dim
            // of 4,096 at 32k positions built 524 MB for a 160 KB model).
            ("head_dim", head_dim, 1 << 10),
            ("vocab_size", vocab_size, 1 << 24),
        ] {
            if value > limit {
                return Err(format!("`{key}` ({value}) is above {limit}"));
            }
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!("unsupported hidden_act `{act}` (only `silu`)"));
            }
        }
        if self.use_sliding_window == Some(true) {
            return Err("use_sliding_window = true is not supported".into());
        }
        // Each layer's kind, where transformers reads it: any but full attention is refused
        // (with `use_sliding_window` false transformers' own attention refuses it too).
        if let (Arch::Qwen2 | Arch::Qwen3, Some(types)) = (arch, &self.layer_types) {
            let kinds = match types {
                Value::Null => &Vec::new(),
                Value::Array(kinds) => kinds,
                other => return Err(format!("layer_types must be a list, not {other}")),
            };
            // `attention` is transformers' older name for `full_attention` (it renames it).
            let full = |k: &Value| matches!(k.as_str(), Some("full_attention" | "attention"));
            if let Some(kind) = kinds.iter().find(|k| !full(k)) {
                return Err(format!(
                    "layer_types has {kind}: only `full_attention` layers are supported"
                ));
            }
        }
        // Per-layer overrides of any attribute (a layer with other sizes, another rope...):
        // not read, so refused rather than ignored.
        let empty = |v: &Value| v.is_null() || v.as_object().is_some_and(|o| o.is_empty());
        if self.per_layer_config.as_ref().is_some_and(|v| !empty(v)) {
            return Err("per_layer_config is not supported".into());
        }
        let (rope_theta, rope_scaling) = self.rope()?;
        let rms_norm_eps = self.rms_norm_eps.unwrap_or(1e-6);
        // Checked as the f32 the model computes with: 1e300 would be inf, 1e-300 zero.
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0 && f32_positive(rms_norm_eps)) {
            return Err(format!(
                "rms_norm_eps ({rms_norm_eps:?}) must be positive and finite in f32"
            ));
        }
        let attention_bias = self.attention_bias.unwrap_or(false);
        let default_ctx = if arch == Arch::Llama { 2048 } else { 32768 };
        let max_position_embeddings = required(
            self.max_position_embeddings.or(Some(default_ctx)),
            "max_position_embeddings",
        )?;
        // The rotary frequencies as the model computes them (`model::rope`): a base below 1
        // makes them grow along the head, and a tiny one overflows them (1e-40: inf, then
        // every angle and every logit NaN, which beam search would read as no candidates).
        let top = (0..head_dim / 2)
            .map(|i| 1.0f32 / rope_theta.powf((2 * i) as f32 / head_dim as f32))
            .fold(0f32, f32::max);
        if !(top.is_finite() && (top * max_position_embeddings as f32).is_finite()) {
            return Err(format!(
                "rope_theta ({rope_theta:?}) gives rotary angles that overflow f32 at head_dim \
                 {head_dim} and {max_position_embeddings} positions"
            ));
        }
        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rope_theta,
            rope_scaling,
            rms_norm_eps: rms_norm_eps as f32,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            // Qwen2's and Qwen3's MLPs have no bias in transformers, whatever the config says.
            mlp_bias: arch == Arch::Llama && self.mlp_bias.unwrap_or(false),
            qk_norm: arch == Arch::Qwen3,
            bos_token_id: in_vocab(
                token_ids(&self.bos_token_id, "bos_token_id")?,
                vocab_size,
                "bos_token_id",
            )?
            .first()
            .copied(),
            eos_token_ids: in_vocab(
                token_ids(&self.eos_token_id, "eos_token_id")?,
                vocab_size,
                "eos_token_id",
            )?,
        })
    }

    /// `rope_theta` from either spelling, and the scaling: `linear` and `llama3` are read, any
    /// other is refused rather than silently computed wrong, and so are two spellings of the
    /// base that disagree (which one transformers reads depends on its version).
    fn rope(&self) -> std::result::Result<(f32, RopeScaling), String> {
        full_rotary(self.partial_rotary_factor.as_ref(), "partial_rotary_factor")?;
        let mut theta = self.rope_theta;
        let mut theta_key = String::from("rope_theta");
        let mut scaling = RopeScaling::None;
        // transformers 5 takes `rope_scaling` over `rope_parameters` whole when it is a
        // non-empty object (`rope_scaling or rope_parameters`), and transformers 4 never reads
        // `rope_parameters`: then only the first counts.
        let scaling_wins = matches!(&self.rope_scaling, Some(Value::Object(o)) if !o.is_empty());
        for (key, v) in [
            ("rope_scaling", &self.rope_scaling),
            ("rope_parameters", &self.rope_parameters),
        ] {
            if scaling_wins && key == "rope_parameters" {
                continue;
            }
            let obj = match v {
                None | Some(Value::Null) => continue,
                Some(Value::Object(obj)) => obj,
                Some(other) => return Err(format!("{key} must be an object, not {other}")),
            };
            let kind = match obj
                .get("rope_type")
                .or_else(|| obj.get("type"))
                .filter(|k| !k.is_null())
            {
                Some(k) => k
                    .as_str()
                    .ok_or_else(|| format!("{key}.rope_type must be a string, not {k}"))?,
                // No type and nothing but the base: plain rope. Scaling keys without a type
                // (`{"factor": 8}`) are refused, as transformers refuses them, rather than
                // run unscaled.
                None => match obj.iter().find(|(k, v)| {
                    !v.is_null() && !["rope_theta", "rope_type", "type"].contains(&k.as_str())
                }) {
                    Some((other, v)) if v.is_object() => {
                        return Err(format!(
                            "{key} is nested by layer type (`{other}`): per-layer rope \
                             parameters are not supported"
                        ))
                    }
                    Some((other, _)) => {
                        return Err(format!(
                            "{key} has `{other}` but no rope_type: which scaling is meant?"
                        ))
                    }
                    None => "default",
                },
            };
            let number = |name: &str| -> std::result::Result<f64, String> {
                let v = obj
                    .get(name)
                    .filter(|v| !v.is_null())
                    .ok_or_else(|| format!("{key}.rope_type `{kind}` needs `{name}`"))?;
                v.as_f64()
                    .filter(|x| x.is_finite() && f32_positive(*x))
                    .ok_or_else(|| format!("{key}.{name} must be a positive number, not {v}"))
            };
            let at_least_one = |name: &str| {
                let factor = number(name)?;
                if factor < 1.0 {
                    return Err(format!("{key}.{name} ({factor}) must be at least 1"));
                }
                Ok(factor)
            };
            scaling = match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: at_least_one("factor")?,
                },
                "llama3" => {
                    let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
                    // transformers 5 sets a top-level key over the nested one: two that
                    // disagree are refused, as two bases are.
                    let original = match (
                        self.original_max_position_embeddings,
                        obj.get("original_max_position_embeddings")
                            .filter(|v| !v.is_null()),
                    ) {
                        (Some(top), Some(_)) => {
                            let nested = number("original_max_position_embeddings")?;
                            if nested != top {
                                return Err(format!(
                                    "original_max_position_embeddings is {top} but \
                                     {key}.original_max_position_embeddings is {nested}: which \
                                     one?"
                                ));
                            }
                            nested
                        }
                        (Some(top), None) if top.is_finite() && f32_positive(top) => top,
                        (Some(top), None) => {
                            return Err(format!(
                                "original_max_position_embeddings must be a positive number, \
                                 not {top}"
                            ))
                        }
                        (None, _) => number("original_max_position_embeddings")?,
                    };
                    if low >= high {
                        return Err(format!(
                            "{key}.low_freq_factor ({low}) must be below high_freq_factor ({high})"
                        ));
                    }
                    RopeScaling::Llama3 {
                        factor: at_least_one("factor")?,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_position_embeddings: original,
                    }
                }
                _ => {
                    return Err(format!(
                        "unsupported {key}.rope_type `{kind}` (`default`, `linear` and `llama3` \
                         are)"
                    ))
                }
            };
            full_rotary(
                obj.get("partial_rotary_factor"),
                &format!("{key}.partial_rotary_factor"),
            )?;
            match obj.get("rope_theta") {
                None | Some(Value::Null) => {}
                Some(t) => {
                    let t = t
                        .as_f64()
                        .ok_or_else(|| format!("{key}.rope_theta must be a number, not {t}"))?;
                    if let Some(before) = theta.filter(|&b| b != t) {
                        return Err(format!(
                            "{theta_key} is {before} but {key}.rope_theta is {t}: which one?"
                        ));
                    }
                    theta = Some(t);
                    theta_key = format!("{key}.rope_theta");
                }
            }
        }
        let theta = theta.unwrap_or(10000.0);
        if !(theta.is_finite() && theta > 0.0 && f32_positive(theta)) {
            return Err(format!(
                "rope_theta ({theta:?}) must be positive and finite in f32"
            ));
        }
        Ok((theta as f32, scaling))
    }
}

/// The settings of a `generation_config.json` that transformers' `generate` applies in a
/// greedy or beam search (do_sample=False) and gram's do not, each as `key = value`:
/// logits processors (a repetition penalty, banned or suppressed tokens, a minimum length,
/// forced tokens, sequence biases), another stopping rule, another length penalty, grouped
/// beams. Keys at their no-op values are left out.
fn beam_search_settings(v: &Value) -> Vec<String> {
    let num = |k: &str| v.get(k).and_then(Value::as_f64);
    let set = |k: &str| {
        v.get(k)
            .is_some_and(|x| !(x.is_null() || x.as_array().is_some_and(Vec::is_empty)))
    };
    let mut out = Vec::new();
    for (key, noop) in [
        ("repetition_penalty", 1.0),
        ("length_penalty", 1.0),
        ("no_repeat_ngram_size", 0.0),
        ("min_new_tokens", 0.0),
        ("min_length", 0.0),
        ("num_beam_groups", 1.0),
        ("diversity_penalty", 0.0),
        ("guidance_scale", 1.0),
    ] {
        if num(key).is_some_and(|x| x != noop) {
            out.push(format!("{key} = {}", v[key]));
        }
    }
    for key in [
        "bad_words_ids",
        "suppress_tokens",
        "begin_suppress_tokens",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "sequence_bias",
        "exponential_decay_length_penalty",
    ] {
        if set(key) {
            out.push(format!("{key} = {}", v[key]));
        }
    }
    if v.get("early_stopping")
        .is_some_and(|e| *e != Value::Bool(false) && !e.is_null())
    {
        out.push(format!("early_stopping = {}", v["early_stopping"]));
    }
    out
}

/// A `partial_rotary_factor` (transformers rotates that share of each head) other than 1 is
/// refused: the engine rotates whole heads, and would compute other logits without a word.
fn full_rotary(v: Option<&Value>, key: &str) -> std::result::Result<(), String> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(f) if f.as_f64() == Some(1.0) => Ok(()),
        Some(f) => Err(format!(
            "unsupported {key} {f} (the engine rotates whole heads: only 1)"
        )),
    }
}

/// `ids`, each a token of a vocabulary of `vocab` (an EOS past it would never be generated).
fn in_vocab(ids: Vec<u32>, vocab: usize, what: &str) -> std::result::Result<Vec<u32>, String> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(format!(
            "{what} {id} is not a token id (vocab_size {vocab})"
        )),
        None => Ok(ids),
    }
}

/// `x` is still a positive, finite number once rounded to the f32 the model computes with.
fn f32_positive(x: f64) -> bool {
    let y = x as f32;
    y.is_finite() && y > 0.0
}

#[cfg(test)]
mod tests;
