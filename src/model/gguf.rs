//! GGUF (llama.cpp's format, versions 2 and 3) read directly: header, metadata, tensor table,
//! and tensor data read in place where the kernels read the type (F32, F16, BF16, and the block
//! types Q4_1 and Q8_0, which the matmul dequantizes a panel at a time) or dequantized at load
//! (Q4_0). Supported tensor types: F32, F16, BF16, Q4_0, Q4_1, Q8_0.
//!
//! Layout (little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count, the
//! metadata (key string, u32 value type, value), the tensor infos (name string, u32 n_dims, u64
//! dims innermost first, u32 ggml type, u64 offset into the data section), padding to
//! `general.alignment` (default 32), then the data section. A string is a u64 length + bytes.
//!
//! Tensors come back under HF names in HF shape order (`[rows, cols]`). llama.cpp's converter
//! permutes the rows of `attn_q`/`attn_k` for its interleaved rotary layout; they are permuted
//! back here, so the result equals the HF checkpoint the GGUF was made from. F32/F16/BF16
//! tensors that need no permutation are borrowed from the map without a copy.

use std::path::Path;
use std::sync::Arc;

use half::f16;
use memmap2::Mmap;

use super::checkpoint::{map_file, TensorMap};
use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml tensor types gram can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "truncated: needs {n} bytes at offset {} but the file has {}",
                    self.pos,
                    self.bytes.len()
                )
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// A length that must fit in what is left of the file (so a corrupt count cannot make us
    /// allocate without bound).
    fn len(&mut self, what: &str, min_item_bytes: usize) -> std::result::Result<usize, String> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes as u64) > left {
            return Err(format!(
                "{what} count {n} at offset {} exceeds the file",
                self.pos - 8
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.len("string byte", 1)?;
        let at = self.pos;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| format!("string at offset {at} is not UTF-8"))
    }
}

/// The metadata values gram reads; the rest are skipped.
#[derive(Debug, Clone)]
enum Value {
    Int(i128),
    Float(f64),
    Str(String),
    Other,
}

fn read_value(c: &mut Cursor, ty: u32, depth: usize) -> std::result::Result<Value, String> {
    Ok(match ty {
        0 | 1 | 7 => Value::Int(c.take(1)?[0] as i128),
        2 | 3 => Value::Int(u16::from_le_bytes(c.take(2)?.try_into().expect("2")) as i128),
        4 => Value::Int(c.u32()? as i128),
        5 => Value::Int(c.u32()? as i32 as i128),
        6 => Value::Float(f32::from_le_bytes(c.take(4)?.try_into().expect("4")) as f64),
        // An array's strings (a tokenizer's vocabulary) are skipped unread: llama.cpp takes
        // ones that are not UTF-8, and gram reads none of them.
        8 if depth > 0 => {
            let n = c.len("string byte", 1)?;
            c.take(n)?;
            Value::Other
        }
        8 => Value::Str(c.string()?),
        9 => {
            if depth > 2 {
                return Err("metadata arrays nested too deep".into());
            }
            let item_ty = c.u32()?;
            let n = c.len("array item", 1)?;
            for _ in 0..n {
                read_value(c, item_ty, depth + 1)?;
            }
            Value::Other
        }
        10 => Value::Int(c.u64()? as i128),
        11 => Value::Int(c.u64()? as i64 as i128),
        12 => Value::Float(f64::from_bits(c.u64()?)),
        t => return Err(format!("unknown metadata value type {t}")),
    })
}

/// What the header says: the tensors, where their data starts, and `general.architecture`.
#[derive(Debug)]
struct Header {
    tensors: Vec<TensorInfo>,
    data_start: usize,
    arch: Option<String>,
    alignment: u64,
    meta: Metadata,
}

/// The scalar metadata values, for [`check_hparams`].
#[derive(Debug, Default)]
struct Metadata {
    /// `llama.block_count`, ...
    numbers: Vec<(String, f64)>,
    /// `llama.rope.scaling.type`, ...
    strings: Vec<(String, String)>,
}

#[derive(Debug)]
struct TensorInfo {
    name: String,
    dims: Vec<usize>,
    ty: GgmlType,
    offset: usize,
}

/// Parses the header.
/// `max_tensors`: the most tensor entries the header may list (a table of millions of entries
/// that fit the file would cost several times the file in memory before the names are
/// checked).
fn parse_header(bytes: &[u8], max_tensors: usize) -> std::result::Result<Header, String> {
    let mut c = Cursor { bytes, pos: 0 };
    if c.take(4)? != MAGIC {
        return Err("not a GGUF file (bad magic)".into());
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2 or 3)"));
    }
    // An entry is at least 32 bytes (name length, dims count, one dim, type, offset).
    let n_tensors = c.len("tensor", 32)?;
    if n_tensors > max_tensors {
        return Err(format!(
            "the header lists {n_tensors} tensors; the model's config takes at most {max_tensors}"
        ));
    }
    let n_kv = c.len("metadata", 12)?;
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut arch = None;
    let mut meta = Metadata::default();
    // A key given twice would be read one way here and another by llama.cpp (which refuses
    // such a file).
    let mut keys = std::collections::HashSet::new();
    for _ in 0..n_kv {
        let key = c.string()?;
        if !keys.insert(key.clone()) {
            return Err(format!("metadata key `{key}` is given twice"));
        }
        let ty = c.u32()?;
        let v = read_value(&mut c, ty, 0)?;
        match key.as_str() {
            "general.alignment" => match v {
                Value::Int(a) if a > 0 && (a as u64).is_power_of_two() => alignment = a as u64,
                _ => return Err("general.alignment must be a power of two".into()),
            },
            "general.architecture" => match v {
                Value::Str(a) => arch = Some(a),
                _ => return Err("general.architecture must be a string".into()),
            },
            _ => match v {
                Value::Int(i) => meta.numbers.push((key, i as f64)),
                Value::Float(f) => meta.numbers.push((key, f)),
                Value::Str(s) => meta.strings.push((key, s)),
                Value::Other => {}
            },
        }
    }
    // Grown as entries are read: a count that fits the file can still ask for more memory
    // than the file holds (an entry in memory is larger than on disk).
    let mut infos = Vec::with_capacity(n_tensors.min(1024));
    for _ in 0..n_tensors {
        let name = c.string()?;
        let n_dims = c.u32()? as usize;
        if !(1..=4).contains(&n_dims) {
            return Err(format!("tensor `{name}` has {n_dims} dimensions"));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(
                usize::try_from(c.u64()?)
                    .ok()
                    .filter(|&d| d > 0)
                    .ok_or_else(|| format!("tensor `{name}`: a dimension is 0 or too large"))?,
            );
        }
        let ty_id = c.u32()?;
        let ty = GgmlType::from_id(ty_id)
            .ok_or_else(|| format!("tensor `{name}`: ggml type {ty_id} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0)"))?;
        let offset =
            usize::try_from(c.u64()?).map_err(|_| format!("tensor `{name}`: offset too large"))?;
        infos.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
        });
    }
    let start = (c.pos as u64).div_ceil(alignment) * alignment;
    Ok(Header {
        tensors: infos,
        data_start: start as usize,
        arch,
        alignment,
        meta,
    })
}

/// The file's own hyperparameters (`{arch}.block_count`, `.attention.head_count`, ...) against
/// config.json's. A config with other head counts of the same total width passes every shape
/// check, and the Q/K rows would be put back in the wrong order: wrong numbers, no error. So
/// the head count must be in a file whose rows are to be put back (`permuted`; the KV head
/// count, when absent, is the head count, as llama.cpp reads it); other keys the
/// file does not have are not checked (per-layer arrays are not numbers here). Rope metadata
/// that changes the rotation (a scaling, a partial rotary dimension) is refused: gram rotates
/// every dimension of a head at `rope_theta`, as config.json says.
fn check_hparams(
    path: &Path,
    arch: &str,
    permuted: bool,
    meta: &Metadata,
    config: &ModelConfig,
) -> Result<()> {
    let (numbers, strings) = (&meta.numbers, &meta.strings);
    let c = config;
    let want: [(&str, &str, f64, bool); 9] = [
        (
            "block_count",
            "num_hidden_layers",
            c.num_hidden_layers as f64,
            false,
        ),
        (
            "embedding_length",
            "hidden_size",
            c.hidden_size as f64,
            false,
        ),
        (
            "feed_forward_length",
            "intermediate_size",
            c.intermediate_size as f64,
            false,
        ),
        (
            "attention.head_count",
            "num_attention_heads",
            c.num_attention_heads as f64,
            permuted,
        ),
        (
            "attention.head_count_kv",
            "num_key_value_heads",
            c.num_key_value_heads as f64,
            false,
        ),
        ("attention.key_length", "head_dim", c.head_dim as f64, false),
        ("rope.dimension_count", "head_dim", c.head_dim as f64, false),
        ("rope.freq_base", "rope_theta", c.rope_theta as f64, false),
        (
            "attention.layer_norm_rms_epsilon",
            "rms_norm_eps",
            c.rms_norm_eps as f64,
            false,
        ),
    ];
    let bad = |msg: String| Err(Error::checkpoint(path, msg));
    // llama.cpp's converter writes `head_count_kv` only when the HF config has
    // `num_key_value_heads`, and llama.cpp reads its absence as `head_count`: so must the
    // config's KV heads be then.
    let kv_key = format!("{arch}.attention.head_count_kv");
    let heads_key = format!("{arch}.attention.head_count");
    if !numbers.iter().any(|(k, _)| *k == kv_key) {
        if let Some(&(_, heads)) = numbers.iter().find(|(k, _)| *k == heads_key) {
            if heads != c.num_key_value_heads as f64 {
                return bad(format!(
                    "{heads_key} is {heads} and {kv_key} is absent (so {heads} too, as \
                     llama.cpp reads it) but config.json's num_key_value_heads is {}",
                    c.num_key_value_heads
                ));
            }
        }
    }
    for (suffix, field, expected, required) in want {
        let key = format!("{arch}.{suffix}");
        let Some(&(_, got)) = numbers.iter().find(|(k, _)| *k == key) else {
            if required {
                return bad(format!(
                    "{key} is missing: the Q/K rows of a `{arch}` GGUF are put back in HF's \
                     order by head, so the file must say how many heads it has"
                ));
            }
            continue;
        };
        // The floats are f32 in the file and in the config: equal up to their rounding (and a
        // NaN is equal to nothing).
        let equal = (got - expected).abs() <= 1e-6 * expected.abs();
        if !equal {
            return bad(format!(
                "{key} is {got} but config.json's {field} is {expected}"
            ));
        }
    }
    let scaling = format!("{arch}.rope.scaling.type");
    if let Some((_, t)) = strings.iter().find(|(k, _)| *k == scaling) {
        if t != "none" {
            return bad(format!("{scaling} is `{t}`: rope scaling is not supported"));
        }
    }
    let factor = format!("{arch}.rope.scaling.factor");
    if let Some(&(_, f)) = numbers.iter().find(|(k, _)| *k == factor) {
        if f != 1.0 && f != 0.0 {
            return bad(format!("{factor} is {f}: rope scaling is not supported"));
        }
    }
    Ok(())
}

/// Whether llama.cpp stored this file's Q/K rows permuted for its rotary layout: its converter
/// permutes the `llama` architecture's (NORM rope; weights and biases), not `qwen2`'s or
/// `qwen3`'s (NEOX rope, HF row order). The file's `general.architecture` must be the config's;
/// a file without one is refused (the GGUF format requires it, and without it neither the
/// layout nor the hyperparameters' keys are known).
fn rotary_permuted(path: &Path, gguf_arch: Option<&str>, config: &ModelConfig) -> Result<bool> {
    let expected = match config.arch {
        Arch::Llama => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
    };
    match gguf_arch {
        None => Err(Error::checkpoint(
            path,
            format!("general.architecture is missing (config.json says `{expected}`)"),
        )),
        Some(a) if a != expected => Err(Error::checkpoint(
            path,
            format!(
                "general.architecture is `{a}` but config.json is {:?} (`{expected}` in GGUF)",
                config.arch
            ),
        )),
        _ => Ok(config.arch == Arch::Llama),
    }
}

/// llama.cpp name → HF name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = tail.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Dequantizes `n` elements of type `ty` from `src` into f32.
fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    match ty {
        GgmlType::F32 => out.iter_mut().zip(src.chunks_exact(4)).for_each(|(o, b)| {
            *o = f32::from_le_bytes(b.try_into().expect("4"));
        }),
        GgmlType::F16 => out
            .iter_mut()
            .zip(src.chunks_exact(2))
            .for_each(|(o, b)| *o = h(b)),
        GgmlType::BF16 => out.iter_mut().zip(src.chunks_exact(2)).for_each(|(o, b)| {
            *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
        }),
        // Block of 32: f16 scale d, 16 bytes of nibbles; element j = low nibble of byte j,
        // element j + 16 = high nibble; x = (q - 8) * d.
        GgmlType::Q4_0 => out
            .chunks_exact_mut(32)
            .zip(src.chunks_exact(18))
            .for_each(|(o, b)| {
                let d = h(&b[0..2]);
                for j in 0..16 {
                    o[j] = ((b[2 + j] & 0x0f) as i32 - 8) as f32 * d;
                    o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }),
        // Block of 32: f16 scale d, f16 minimum m, 16 bytes of nibbles; x = q * d + m.
        GgmlType::Q4_1 => out
            .chunks_exact_mut(32)
            .zip(src.chunks_exact(20))
            .for_each(|(o, b)| {
                let (d, m) = (h(&b[0..2]), h(&b[2..4]));
                for j in 0..16 {
                    o[j] = (b[4 + j] & 0x0f) as f32 * d + m;
                    o[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }),
        // Block of 32: f16 scale d, 32 signed bytes; x = q * d.
        GgmlType::Q8_0 => out
            .chunks_exact_mut(32)
            .zip(src.chunks_exact(34))
            .for_each(|(o, b)| {
                let d = h(&b[0..2]);
                for j in 0..32 {
                    o[j] = b[2 + j] as i8 as f32 * d;
                }
            }),
    }
}

/// Undoes llama.cpp's rotary permutation of a Q or K weight `[n_head * D, cols]`:
/// GGUF row `h*D + 2i + j` holds HF row `h*D + j*D/2 + i`.
/// `cols` counts the items of a row: f32 values, or bytes of a row of ggml blocks.
fn unpermute_rows<T: Copy + Default>(w: &[T], n_head: usize, cols: usize) -> Vec<T> {
    let rows = w.len() / cols;
    let d = rows / n_head;
    let mut out = vec![T::default(); w.len()];
    for h in 0..n_head {
        for i in 0..d / 2 {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * (d / 2) + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Loads every tensor of the GGUF at `path` under HF names: those `config` expects, each of its
/// shape, and no other.
pub fn load(path: &Path, config: &ModelConfig) -> Result<TensorMap> {
    load_checked(path, config, true)
}

/// [`load`]; `check_shapes: false` reads whatever tensors a (test's partial) file holds.
fn load_checked(path: &Path, config: &ModelConfig, check_shapes: bool) -> Result<TensorMap> {
    let map: Arc<Mmap> = map_file(path)?;
    // Every tensor the config takes, and a separate `output.weight` beside tied embeddings.
    let max_tensors = if check_shapes {
        super::weights::expected_count(config) + 1
    } else {
        usize::MAX
    };
    let Header {
        tensors: infos,
        data_start,
        arch,
        alignment,
        meta,
    } = parse_header(&map, max_tensors).map_err(|m| Error::checkpoint(path, m))?;
    let permuted = rotary_permuted(path, arch.as_deref(), config)?;
    // `rotary_permuted` refused a file without an architecture.
    let arch = arch.as_deref().unwrap_or_default();
    check_hparams(path, arch, permuted, &meta, config)?;
    // First every tensor's name, shape and place, and the places against each other; only then
    // is anything copied or dequantized, so a header whose tensors overlap (each of them the
    // whole data section, say) is refused before it can ask for many times the file in memory.
    let mut places: Vec<(usize, usize, String)> = Vec::with_capacity(infos.len());
    let mut planned = Vec::with_capacity(infos.len());
    let mut names = std::collections::HashSet::new();
    for info in infos {
        let name = hf_name(&info.name).ok_or_else(|| {
            Error::tensor(
                &info.name,
                format!("unknown GGUF tensor name in {}", path.display()),
            )
        })?;
        let numel = info
            .dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                Error::tensor(
                    &name,
                    format!("shape {:?}: its element count overflows", info.dims),
                )
            })?;
        let (block_elems, block_bytes) = info.ty.block();
        let numel = Some(numel)
            .filter(|n| n % block_elems == 0 && info.dims[0] % block_elems == 0)
            .ok_or_else(|| {
                Error::tensor(
                    &name,
                    format!("shape {:?} does not fit {:?} blocks", info.dims, info.ty),
                )
            })?;
        // Checked: a corrupt header's dims can make the byte count wrap (to a range that
        // would then pass the bounds check, empty, for a tensor of 2^62 elements).
        let n_bytes = (numel / block_elems).checked_mul(block_bytes);
        let start = data_start.checked_add(info.offset);
        let range = start
            .zip(n_bytes)
            .and_then(|(s, n)| s.checked_add(n).map(|e| s..e))
            .filter(|r| r.end <= map.len())
            .ok_or_else(|| {
                Error::checkpoint(
                    path,
                    format!(
                        "truncated: tensor `{}` lies past the end of the file",
                        info.name
                    ),
                )
            })?;
        places.push((info.offset, range.len(), info.name.clone()));
        // GGUF dims are innermost first; HF shapes are outermost first.
        let shape: Vec<usize> = info.dims.iter().rev().copied().collect();
        // `blk.N.attn_q.weight` / `.bias` (the name without its last part).
        let stem = info
            .name
            .rsplit_once('.')
            .map_or(info.name.as_str(), |(s, _)| s);
        let permute_heads = if !permuted {
            None
        } else if stem.ends_with(".attn_q") {
            Some(config.num_attention_heads)
        } else if stem.ends_with(".attn_k") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        // Read in place: the plain types, and the block types the matmul dequantizes itself
        // (2-D only; a block-typed vector is dequantized here).
        let direct = match info.ty {
            GgmlType::F32 => Some(DType::F32),
            GgmlType::F16 => Some(DType::F16),
            GgmlType::BF16 => Some(DType::BF16),
            GgmlType::Q4_1 if shape.len() == 2 => Some(DType::Q4_1),
            GgmlType::Q8_0 if shape.len() == 2 => Some(DType::Q8_0),
            _ => None,
        };
        if let Some(n_head) = permute_heads {
            if shape.len() > 2
                || !(shape[0] / n_head).is_multiple_of(2)
                || !shape[0].is_multiple_of(n_head)
            {
                return Err(Error::tensor(
                    &name,
                    format!("shape {shape:?} cannot hold {n_head} rotary heads"),
                ));
            }
        }
        if !names.insert(name.clone()) {
            return Err(Error::tensor(name, "appears twice"));
        }
        planned.push((name, info, shape, numel, range, direct, permute_heads));
    }
    check_layout(&mut places, alignment).map_err(|m| Error::checkpoint(path, m))?;
    // Names and shapes against the config before anything is widened to f32 (a Q4_0 tensor
    // takes 7× its bytes): a file about to be refused must not first ask for that memory.
    if check_shapes {
        crate::model::weights::check_shapes(
            config,
            planned.iter().map(|p| (p.0.as_str(), p.2.as_slice())),
        )?;
    }
    let mut out = TensorMap::new();
    for (name, info, shape, numel, range, direct, permute_heads) in planned {
        // What the engine drops anyway (an `output.weight` beside tied embeddings) is not
        // widened first: a Q4_0 one would take 7× its bytes for nothing.
        if check_shapes && crate::model::weights::ignored(config, &name) {
            continue;
        }
        let tensor = match (direct, permute_heads) {
            (Some(dtype), None) => HostTensor::mapped(&map, range, dtype, shape),
            (Some(dtype), Some(n_head)) if dtype.is_quantized() => {
                let row_bytes = dtype.bytes_for(info.dims[0]);
                let bytes = unpermute_rows(&map[range], n_head, row_bytes);
                HostTensor::from_blocks(bytes, dtype, shape)
            }
            _ => {
                let mut values = vec![0f32; numel];
                dequantize(info.ty, &map[range], &mut values);
                if let Some(n_head) = permute_heads {
                    // A weight's rows are `dims[0]` values long; a bias's, one value.
                    let cols = if shape.len() == 2 { info.dims[0] } else { 1 };
                    values = unpermute_rows(&values, n_head, cols);
                }
                HostTensor::from_f32(values, shape)
            }
        };
        out.insert(name, tensor);
    }
    Ok(out)
}

/// The tensors' places in the data section, `(offset, bytes, name)`, must tile it as GGUF
/// writers lay it out (llama.cpp checks the same): in offset order, each starts at the previous
/// one's end rounded up to `alignment`, the first at 0. A corrupt offset or type otherwise reads
/// another tensor's bytes, or padding, as weights and runs on with wrong numbers.
fn check_layout(
    places: &mut [(usize, usize, String)],
    alignment: u64,
) -> std::result::Result<(), String> {
    places.sort();
    let mut expected = 0usize;
    let mut prev: Option<&str> = None;
    for (offset, bytes, name) in places.iter() {
        if *offset != expected {
            let after = prev.map_or("the data section's start".to_string(), |p| {
                format!("the end of `{p}` (padded to {alignment} bytes)")
            });
            let what = if *offset < expected {
                "overlaps the tensor before it"
            } else {
                "leaves a gap"
            };
            return Err(format!(
                "tensor `{name}` at data offset {offset} {what}: expected {expected}, {after}"
            ));
        }
        expected = (offset + bytes).next_multiple_of(alignment as usize);
        prev = Some(name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("blk.7.attn_q.weight").unwrap(),
            "model.layers.7.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: reshape(n_head, 2, D/2, cols).swapaxes(1, 2) — i.e. HF row h*D + j*D/2 + i
        // goes to row h*D + 2i + j. Build that permutation and check we invert it.
        let (n_head, d, cols) = (3, 8, 5);
        let hf: Vec<f32> = (0..n_head * d * cols)
            .map(|x| x as f32 * 0.37 - 3.0)
            .collect();
        let mut permuted = vec![0f32; hf.len()];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let (src, dst) = (h * d + j * d / 2 + i, h * d + 2 * i + j);
                    permuted[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&permuted, n_head, cols), hf);
    }

    #[test]
    fn q4_1_and_q8_0_blocks() {
        let d = f16::from_f32(0.5).to_le_bytes();
        let m = f16::from_f32(-1.25).to_le_bytes();
        let mut q41 = vec![d[0], d[1], m[0], m[1]];
        q41.extend((0..16u8).map(|j| (j & 0x0f) | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_1, &q41, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.5 - 1.25);
            assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.25);
        }
        let mut q80 = vec![d[0], d[1]];
        // -100..=117: every value fits an i8 (computed wider: 31 * 7 alone does not).
        let q = |j: i32| (j * 7 - 100) as i8;
        q80.extend((0..32).map(|j| q(j) as u8));
        dequantize(GgmlType::Q8_0, &q80, &mut out);
        for (j, o) in out.iter().enumerate() {
            assert_eq!(*o, q(j as i32) as f32 * 0.5);
        }
    }

    /// A GGUF of one tensor, `dims` (innermost first) of `ty`, with `data` after the header.
    fn one_tensor_gguf(name: &str, dims: &[u64], ty: u32, data: &[u8]) -> Vec<u8> {
        gguf_of(&[(name, dims, ty, 0)], data)
    }

    /// A GGUF (version 3) of tensors `(name, dims innermost first, ggml type, offset)` with
    /// `data` after the header; its metadata the architecture and head counts of
    /// [`tiny_config_and_dir`]'s config.
    fn gguf_of(tensors: &[(&str, &[u64], u32, u64)], data: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend(3u64.to_le_bytes()); // metadata
        let key = |b: &mut Vec<u8>, k: &str, ty: u32| {
            b.extend((k.len() as u64).to_le_bytes());
            b.extend(k.as_bytes());
            b.extend(ty.to_le_bytes());
        };
        key(&mut b, "general.architecture", 8);
        b.extend(5u64.to_le_bytes());
        b.extend(b"llama");
        for k in [
            "llama.attention.head_count",
            "llama.attention.head_count_kv",
        ] {
            key(&mut b, k, 4);
            b.extend(2u32.to_le_bytes());
        }
        for (name, dims, ty, offset) in tensors {
            b.extend((name.len() as u64).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
        }
        b.resize(b.len().div_ceil(32) * 32, 0);
        b.extend(data);
        b
    }

    /// A one-layer Llama config for the synthetic files, and a scratch directory `name`.
    fn tiny_config_and_dir(name: &str) -> (crate::config::ModelConfig, std::path::PathBuf) {
        let config = crate::config::ModelConfig::from_json(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":256}"#,
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("gram-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        (config, dir)
    }

    /// A stored `output.weight` beside tied embeddings is dropped before it is converted (the
    /// engine reads the embeddings; a Q4_0 one was widened to f32 first, 7× its bytes, and
    /// dropped after): the load returns every other tensor and not it.
    #[test]
    fn an_output_weight_beside_tied_embeddings_is_not_converted() {
        let config = crate::config::ModelConfig::from_json(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":256,
            "tie_word_embeddings":true}"#,
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("gram-gguf-tied-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Every tensor of the config in f32 (dims innermost first), then a Q4_0 output.weight.
        let f32s: [(&str, &[u64]); 11] = [
            ("token_embd.weight", &[64, 256]),
            ("blk.0.attn_q.weight", &[64, 64]),
            ("blk.0.attn_k.weight", &[64, 64]),
            ("blk.0.attn_v.weight", &[64, 64]),
            ("blk.0.attn_output.weight", &[64, 64]),
            ("blk.0.ffn_gate.weight", &[64, 128]),
            ("blk.0.ffn_up.weight", &[64, 128]),
            ("blk.0.ffn_down.weight", &[128, 64]),
            ("blk.0.attn_norm.weight", &[64]),
            ("blk.0.ffn_norm.weight", &[64]),
            ("output_norm.weight", &[64]),
        ];
        let mut tensors: Vec<(&str, &[u64], u32, u64)> = Vec::new();
        let mut data = Vec::new();
        for (name, dims) in f32s {
            let n: u64 = dims.iter().product();
            tensors.push((name, dims, 0, data.len() as u64));
            for i in 0..n {
                data.extend((0.01 * (i % 7) as f32 + 0.5).to_le_bytes());
            }
        }
        // [64, 256] Q4_0: 2 blocks of 18 bytes a row.
        tensors.push(("output.weight", &[64, 256], 2, data.len() as u64));
        data.extend(vec![0x11u8; 256 * 2 * 18]);
        data.resize(data.len().div_ceil(32) * 32, 0);
        let path = dir.join("model.gguf");
        std::fs::write(&path, gguf_of(&tensors, &data)).unwrap();
        let map = load_checked(&path, &config, true).unwrap();
        assert!(!map.contains_key("lm_head.weight"));
        assert!(map.contains_key("model.embed_tokens.weight"));
        assert_eq!(map.len(), 11);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Tensors must tile the data section in GGUF's layout: a corrupt offset that makes a
    /// tensor overlap another, leave a gap (bytes read as weights that are not the tensor's)
    /// or break the alignment is an error naming the tensor, never a load.
    #[test]
    fn tensor_offsets_must_tile_the_data_section() {
        let (config, dir) = tiny_config_and_dir("gguf-tile");
        let path = dir.join("model.gguf");
        // 4 × 4 and 3 × 1 f32: 64 bytes, then 12 bytes (padded to 32 after).
        let (up, norm) = ("blk.0.ffn_up.weight", "blk.0.attn_norm.weight");
        let load_with = |second: u64, first: u64| {
            let file = gguf_of(
                &[(up, &[4, 4], 0, first), (norm, &[3], 0, second)],
                &[7; 128],
            );
            std::fs::write(&path, file).unwrap();
            load_checked(&path, &config, false)
                .map(|m| m.len())
                .map_err(|e| e.to_string())
        };
        assert_eq!(load_with(64, 0), Ok(2));
        // Listed in another order than their offsets: still the same layout.
        assert_eq!(load_with(0, 32), Ok(2));
        for (second, first, want) in [
            (32, 0, "`blk.0.attn_norm.weight` at data offset 32 overlaps"),
            (
                96,
                0,
                "`blk.0.attn_norm.weight` at data offset 96 leaves a gap: expected 64",
            ),
            (68, 0, "at data offset 68 leaves a gap"),
            (
                64,
                32,
                "`blk.0.ffn_up.weight` at data offset 32 leaves a gap: expected 0",
            ),
            (0, 0, "overlaps"),
        ] {
            let err = load_with(second, first).expect_err(want);
            assert!(err.contains(want), "{second} {first}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Dims whose byte count overflows (2^31 × 2^31 f32 values: 2^64 bytes; a Q8_0 tensor
    /// of 2^64 − 32 values) are refused as past the end of the file, never a wrapped size.
    #[test]
    fn tensor_sizes_that_overflow_are_errors() {
        let (config, dir) = tiny_config_and_dir("gguf");
        let path = dir.join("model.gguf");
        let cases: [(&[u64], u32); 3] = [
            (&[1 << 31, 1 << 31], 0),      // F32
            (&[1 << 32, 1 << 31], 1),      // F16
            (&[u64::MAX / 32 * 32, 1], 8), // Q8_0: 2^59 blocks of 34 bytes
        ];
        for (dims, ty) in cases {
            std::fs::write(
                &path,
                one_tensor_gguf("blk.0.ffn_up.weight", dims, ty, &[0; 64]),
            )
            .unwrap();
            let Err(err) = load_checked(&path, &config, false) else {
                panic!("{dims:?}: loaded");
            };
            let err = err.to_string();
            assert!(err.contains("past the end of the file"), "{dims:?}: {err}");
        }
        // An element count that overflows itself, named as such.
        std::fs::write(
            &path,
            one_tensor_gguf("blk.0.ffn_up.weight", &[1 << 32, 1 << 32, 2], 0, &[0; 64]),
        )
        .unwrap();
        let err = load_checked(&path, &config, false).unwrap_err().to_string();
        assert!(err.contains("element count overflows"), "{err}");
        // The same file with a shape that fits is read.
        std::fs::write(
            &path,
            one_tensor_gguf("blk.0.ffn_up.weight", &[4, 4], 0, &[0; 64]),
        )
        .unwrap();
        assert_eq!(load_checked(&path, &config, false).unwrap().len(), 1);
        // Random corruption of the header (dims, type, offset, counts, name length): an error
        // or a load, never a panic.
        let good = one_tensor_gguf("blk.0.ffn_up.weight", &[32, 2], 8, &[1; 68]);
        let header = good.len() - 68;
        let mut r = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            r
        };
        let (mut refused, mut loaded) = (0, 0);
        for _ in 0..3000 {
            let mut b = good.clone();
            for _ in 0..1 + next() % 3 {
                let i = (next() as usize) % header;
                b[i] = match next() % 3 {
                    0 => b[i] ^ (1 << (next() % 8)),
                    1 => 0xff,
                    _ => next() as u8,
                };
            }
            std::fs::write(&path, &b).unwrap();
            match load_checked(&path, &config, false) {
                Ok(_) => loaded += 1,
                Err(_) => refused += 1,
            }
        }
        // Both happen: the mutations reach the parser's checks and pass some of them.
        assert!(
            refused > 100 && loaded > 10,
            "refused {refused}, loaded {loaded}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A GGUF header with metadata `(key, value type, value bytes)` and no tensors.
    fn gguf_with_metadata(meta: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes()); // tensors
        b.extend((meta.len() as u64).to_le_bytes());
        for (key, ty, value) in meta {
            b.extend((key.len() as u64).to_le_bytes());
            b.extend(key.as_bytes());
            b.extend(ty.to_le_bytes());
            b.extend(value);
        }
        b
    }

    /// The file's hyperparameters must be config.json's: 3 heads where the config says 2 (the
    /// same width, so every shape fits) or another rope base is refused, naming both; equal
    /// values (an f32 in the file) and keys the file lacks pass.
    #[test]
    fn hyperparameters_must_match_the_config() {
        let (config, dir) = tiny_config_and_dir("gguf-hparams");
        let arch = |a: &str| {
            let mut v = (a.len() as u64).to_le_bytes().to_vec();
            v.extend(a.as_bytes());
            ("general.architecture", 8u32, v)
        };
        let heads = |n: u32| ("llama.attention.head_count", 4u32, n.to_le_bytes().to_vec());
        let base = |f: f32| ("llama.rope.freq_base", 6u32, f.to_le_bytes().to_vec());
        let layers = |n: u64| ("llama.block_count", 10u32, n.to_le_bytes().to_vec());
        let eps = |e: f32| {
            let key = "llama.attention.layer_norm_rms_epsilon";
            (key, 6u32, e.to_le_bytes().to_vec())
        };
        let kv_heads = |n: u32| {
            (
                "llama.attention.head_count_kv",
                4u32,
                n.to_le_bytes().to_vec(),
            )
        };
        let rope_dims = |n: u32| ("llama.rope.dimension_count", 4u32, n.to_le_bytes().to_vec());
        let scaling = |t: &str| {
            let mut v = (t.len() as u64).to_le_bytes().to_vec();
            v.extend(t.as_bytes());
            ("llama.rope.scaling.type", 8u32, v)
        };
        let factor = |f: f32| ("llama.rope.scaling.factor", 6u32, f.to_le_bytes().to_vec());
        // As the load runs them.
        let check = |meta: &[(&str, u32, Vec<u8>)]| {
            let h = parse_header(&gguf_with_metadata(meta), usize::MAX)?;
            let permuted =
                rotary_permuted(&dir, h.arch.as_deref(), &config).map_err(|e| e.to_string())?;
            let a = h.arch.as_deref().unwrap_or_default();
            check_hparams(&dir, a, permuted, &h.meta, &config).map_err(|e| e.to_string())
        };
        let same = [
            arch("llama"),
            heads(2),
            kv_heads(2),
            base(10000.0),
            layers(1),
            eps(1e-6),
            rope_dims(32),
            scaling("none"),
            factor(1.0),
        ];
        assert_eq!(check(&same), Ok(()));
        assert_eq!(check(&same[..2]), Ok(()), "only the head count is required");
        for (meta, want) in [
            (
                vec![heads(2), kv_heads(2)],
                "general.architecture is missing",
            ),
            (
                vec![arch("llama"), kv_heads(2)],
                "llama.attention.head_count is missing",
            ),
            (
                vec![arch("llama"), heads(3)],
                "llama.attention.head_count is 3 and llama.attention.head_count_kv is absent \
                 (so 3 too, as llama.cpp reads it) but config.json's num_key_value_heads is 2",
            ),
            (
                vec![arch("llama"), heads(3), kv_heads(2)],
                "llama.attention.head_count is 3 but config.json's num_attention_heads is 2",
            ),
            (
                vec![arch("llama"), heads(2), kv_heads(2), base(f32::NAN)],
                "llama.rope.freq_base is NaN",
            ),
            (
                vec![arch("llama"), heads(2), kv_heads(2), rope_dims(16)],
                "llama.rope.dimension_count is 16 but config.json's head_dim is 32",
            ),
            (
                vec![arch("llama"), heads(2), kv_heads(2), scaling("linear")],
                "llama.rope.scaling.type is `linear`",
            ),
            (
                vec![arch("llama"), heads(2), kv_heads(2), factor(4.0)],
                "llama.rope.scaling.factor is 4",
            ),
            (
                vec![arch("llama"), heads(2), heads(2)],
                "metadata key `llama.attention.head_count` is given twice",
            ),
            (
                vec![arch("llama"), heads(2), kv_heads(2), base(100000.0)],
                "llama.rope.freq_base is 100000 but config.json's rope_theta is 10000",
            ),
            (
                vec![arch("llama"), heads(2), kv_heads(2), layers(2)],
                "llama.block_count is 2",
            ),
            (
                vec![arch("llama"), heads(2), kv_heads(2), eps(1e-5)],
                "layer_norm_rms_epsilon",
            ),
        ] {
            let err = check(&meta).expect_err(want);
            assert!(err.contains(want), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An array of strings that are not UTF-8 (a tokenizer's vocabulary, which llama.cpp
    /// takes) is skipped; a top-level string that is not UTF-8 is refused.
    #[test]
    fn array_strings_are_skipped_unread() {
        let mut tokens = 8u32.to_le_bytes().to_vec(); // item type: string
        tokens.extend(2u64.to_le_bytes());
        for t in [&b"ok"[..], b"\xff\xfe"] {
            tokens.extend((t.len() as u64).to_le_bytes());
            tokens.extend(t);
        }
        let h = parse_header(
            &gguf_with_metadata(&[("tokenizer.ggml.tokens", 9, tokens)]),
            usize::MAX,
        )
        .unwrap();
        assert!(h.meta.strings.is_empty() && h.meta.numbers.is_empty());
        let mut bad = 2u64.to_le_bytes().to_vec();
        bad.extend(b"\xff\xfe");
        let e = parse_header(&gguf_with_metadata(&[("general.name", 8, bad)]), usize::MAX);
        assert!(e.unwrap_err().contains("not UTF-8"));
    }

    #[test]
    fn corrupt_headers_are_errors() {
        assert!(parse_header(b"GGU", usize::MAX)
            .unwrap_err()
            .contains("truncated"));
        assert!(parse_header(b"NOPE\x03\0\0\0", usize::MAX)
            .unwrap_err()
            .contains("bad magic"));
        let mut v9 = b"GGUF".to_vec();
        v9.extend(9u32.to_le_bytes());
        assert!(parse_header(&v9, usize::MAX)
            .unwrap_err()
            .contains("version 9"));
        let mut huge = b"GGUF".to_vec();
        huge.extend(3u32.to_le_bytes());
        huge.extend(u64::MAX.to_le_bytes());
        huge.extend(0u64.to_le_bytes());
        assert!(parse_header(&huge, usize::MAX)
            .unwrap_err()
            .contains("exceeds the file"));
        // A count the file could hold, past what the model takes: refused by the count.
        let mut many = b"GGUF".to_vec();
        many.extend(3u32.to_le_bytes());
        many.extend(1000u64.to_le_bytes());
        many.extend(0u64.to_le_bytes());
        many.resize(1000 * 32 + 24, 0);
        let e = parse_header(&many, 999).unwrap_err();
        assert!(
            e.contains("lists 1000 tensors") && e.contains("at most 999"),
            "{e}"
        );
    }
}
