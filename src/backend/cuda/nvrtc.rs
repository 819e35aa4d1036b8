//! The kernel sources (`kernels/*.cu`, embedded in the binary) compiled at run time by NVRTC for
//! the device's architecture, and cached on disk: the PTX of a source is keyed by a hash of the
//! text NVRTC sees, its options and the NVRTC version, so an edited kernel or another toolkit
//! compiles afresh and an unchanged one loads in microseconds.

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::error::{Error, Result};

/// The headers, by the name the sources include them with.
const HEADERS: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../../kernels/common.cuh")),
    (
        "attention.cuh",
        include_str!("../../../kernels/attention.cuh"),
    ),
];

/// Every kernel source, by file name.
pub const SOURCES: &[(&str, &str)] = &[
    (
        "attention_decode.cu",
        include_str!("../../../kernels/attention_decode.cu"),
    ),
    (
        "attention_prefill.cu",
        include_str!("../../../kernels/attention_prefill.cu"),
    ),
    (
        "beam_step.cu",
        include_str!("../../../kernels/beam_step.cu"),
    ),
    (
        "embedding.cu",
        include_str!("../../../kernels/embedding.cu"),
    ),
    (
        "linear_small.cu",
        include_str!("../../../kernels/linear_small.cu"),
    ),
    ("ops.cu", include_str!("../../../kernels/ops.cu")),
    ("rmsnorm.cu", include_str!("../../../kernels/rmsnorm.cu")),
    ("rope.cu", include_str!("../../../kernels/rope.cu")),
    ("swiglu.cu", include_str!("../../../kernels/swiglu.cu")),
];

/// `source` with each `#include "x.cuh"` replaced by the header's text, once per translation
/// unit (the headers are `#pragma once`). NVRTC then needs no named headers, and the cache key
/// covers everything it reads but the CUDA headers.
pub fn expand(source: &str) -> Result<String> {
    fn go(text: &str, seen: &mut Vec<&'static str>, out: &mut String) -> Result<()> {
        for line in text.lines() {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("#include \"") {
                let name = rest.trim_end_matches('"');
                let (hname, htext) = HEADERS.iter().find(|(h, _)| *h == name).ok_or_else(|| {
                    Error::Device(format!("kernel include `{name}` not embedded"))
                })?;
                if !seen.contains(hname) {
                    seen.push(hname);
                    go(htext, seen, out)?;
                }
                continue;
            }
            if t == "#pragma once" {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        Ok(())
    }
    let mut out = String::with_capacity(source.len() * 2);
    go(source, &mut Vec::new(), &mut out)?;
    Ok(out)
}

/// Where the CUDA headers NVRTC needs (`cuda_bf16.h`) are: `$GRAM_CUDA_INCLUDE`, then
/// `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`.
pub fn cuda_include_dir() -> Result<PathBuf> {
    let mut tried = Vec::new();
    let env_dirs = [
        std::env::var_os("GRAM_CUDA_INCLUDE").map(PathBuf::from),
        std::env::var_os("CUDA_HOME").map(|p| PathBuf::from(p).join("include")),
        std::env::var_os("CUDA_PATH").map(|p| PathBuf::from(p).join("include")),
    ];
    let fixed = [
        PathBuf::from("/usr/local/cuda/include"),
        PathBuf::from("/usr/include"),
    ];
    for dir in env_dirs.into_iter().flatten().chain(fixed) {
        if dir.join("cuda_bf16.h").is_file() {
            return Ok(dir);
        }
        tried.push(dir.display().to_string());
    }
    Err(Error::Device(format!(
        "cuda_bf16.h not found (tried {}); set GRAM_CUDA_INCLUDE to the CUDA toolkit's include directory",
        tried.join(", ")
    )))
}

/// FNV-1a, 64 bits: the cache key (not a security boundary: the cache is the user's own).
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `$GRAM_KERNEL_CACHE`, else `$XDG_CACHE_HOME/gram/kernels`, else `~/.cache/gram/kernels`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("GRAM_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("gram/kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/gram/kernels"))
}

/// Writes `bytes` to `path` atomically (temp file, rename); a failure only loses the cache.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// What one compile did.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub file: &'static str,
    pub ptx: String,
    pub cached: bool,
    pub seconds: f64,
}

/// Compiles `file` for `arch` (`compute_90`: the driver finishes it for the exact device),
/// from the on-disk cache when it holds this exact input.
pub fn compile(
    file: &'static str,
    source: &str,
    arch: &'static str,
    include: &Path,
) -> Result<Compiled> {
    let t0 = std::time::Instant::now();
    let text = expand(source)?;
    let options = vec!["-std=c++17".to_string()];
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters; the library was found by the caller.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Device(format!("NVRTC version: {e:?}")))?;
    let version = format!("{major}.{minor}");
    let key = fnv64(&[
        text.as_bytes(),
        arch.as_bytes(),
        options.join(" ").as_bytes(),
        version.as_bytes(),
        include.as_os_str().as_encoded_bytes(),
    ]);
    let cached_path = cache_dir().map(|d| d.join(format!("{file}-{arch}-{key:016x}.ptx")));
    if let Some(p) = &cached_path {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            if ptx.contains(".entry") {
                return Ok(Compiled {
                    file,
                    ptx,
                    cached: true,
                    seconds: t0.elapsed().as_secs_f64(),
                });
            }
        }
    }
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: vec![include.display().to_string()],
        options,
        name: Some(file.to_string()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(&text, opts)
        .map_err(|e| Error::Device(format!("NVRTC could not compile kernels/{file}: {e}")))?;
    let ptx = ptx.to_src();
    if let Some(p) = &cached_path {
        if let Err(e) = write_atomic(p, ptx.as_bytes()) {
            tracing::debug!("kernel cache {}: {e}", p.display());
        }
    }
    Ok(Compiled {
        file,
        ptx,
        cached: false,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The PTX as the driver loads it.
pub fn ptx(c: &Compiled) -> Ptx {
    Ptx::from_src(c.ptx.clone())
}
