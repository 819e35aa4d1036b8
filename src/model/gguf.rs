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
        // UINT8, BOOL; INT8 (signed: -1 is not 255).
        0 | 7 => Value::Int(c.take(1)?[0] as i128),
        1 => Value::Int(c.take(1)?[0] as i8 as i128),
        2 => Value::Int(u16::from_le_bytes(c.take(2)?.try_into().expect("2")) as i128),
        3 => Value::Int(i16::from_le_bytes(c.take(2)?.try_into().expect("2")) as i128),
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
    let (end, padded_end) =
        check_layout(&mut places, alignment).map_err(|m| Error::checkpoint(path, m))?;
    // The last tensor ends the file (writers pad it to the alignment, or not): a type or
    // dims that shrink it, which the tiling above cannot see, leave bytes after it.
    let data_len = map.len().saturating_sub(data_start);
    if data_len != end && data_len != padded_end {
        return Err(Error::checkpoint(
            path,
            format!(
                "the tensors end at data offset {end} but the data section holds {data_len} \
                 bytes: a tensor's type or shape is not the one written"
            ),
        ));
    }
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
) -> std::result::Result<(usize, usize), String> {
    places.sort();
    let mut expected = 0usize;
    let mut end = 0usize;
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
        end = offset + bytes;
        expected = end.next_multiple_of(alignment as usize);
        prev = Some(name);
    }
    Ok((end, expected))
}

#[cfg(test)]
mod tests;
