//! The kernel sources (`kernels/*.cu`, embedded in the binary) compiled at run time by NVRTC for
//! the device's architecture, and cached on disk: the PTX of a source is keyed by a hash of the
//! text NVRTC sees, its options and the NVRTC version, so an edited kernel or another toolkit
//! compiles afresh and an unchanged one loads in microseconds.

use std::path::{Path, PathBuf};

use cudarc::nvrtc::CompileOptions;

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
        "linear_rows.cu",
        include_str!("../../../kernels/linear_rows.cu"),
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

/// The NVRTC library's `(major, minor)` version (the library must have been found).
pub fn version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters; the library was found by the caller.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Device(format!("NVRTC version: {e:?}")))?;
    Ok((major, minor))
}

/// Why a driver may refuse the PTX, when that is the likely reason: each NVRTC writes its own
/// toolkit's PTX version, and a driver loads PTX only up to its own CUDA version's (NVRTC 12.9's
/// `.version 8.8` fails on a 12.8 driver; cudarc takes an NVRTC 13 before a 12 when both are on
/// the library path). Empty when NVRTC is no newer than the driver.
pub fn ptx_hint(nvrtc: (i32, i32), driver: i32) -> String {
    let (major, minor) = nvrtc;
    if major * 1000 + minor * 10 <= driver {
        return String::new();
    }
    format!(
        " (NVRTC {major}.{minor} writes PTX for CUDA {major}.{minor}, newer than this driver's \
         CUDA {}.{}: put an NVRTC no newer than the driver first on the library path, or \
         update the driver)",
        driver / 1000,
        driver % 1000 / 10
    )
}

/// Compiles `file` for `arch` (`compute_90`: the driver finishes it for the exact device) to
/// PTX, from the on-disk cache when it holds this exact input.
pub fn compile(
    file: &'static str,
    source: &str,
    arch: &'static str,
    include: &Path,
) -> Result<String> {
    let t0 = std::time::Instant::now();
    let text = expand(source)?;
    let options = vec!["-std=c++17".to_string()];
    let (major, minor) = version()?;
    // The cache key: everything NVRTC sees but the CUDA headers (their directory stands in).
    let key_input = [
        text.as_str(),
        arch,
        &options.join(" "),
        &format!("nvrtc {major}.{minor}"),
        &include.display().to_string(),
    ]
    .join("\0");
    let key = crate::container::checksum(key_input.as_bytes());
    let cached_path = cache_dir().map(|d| d.join(format!("{file}-{arch}-{key:016x}.ptx")));
    if let Some(p) = &cached_path {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            if ptx.contains(".entry") {
                tracing::debug!(
                    "kernels/{file}: cached PTX ({:.3} s)",
                    t0.elapsed().as_secs_f64()
                );
                return Ok(ptx);
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
        .map_err(|e| Error::Device(format!("NVRTC could not compile kernels/{file}: {e}")))?
        .to_src();
    if let Some(p) = &cached_path {
        // A failed cache write only costs the next start a compile.
        let written = p
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                crate::container::write_atomic(p, ptx.as_bytes()).map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::debug!("kernel cache {}: {e}", p.display());
        }
    }
    tracing::debug!(
        "kernels/{file}: compiled ({:.3} s)",
        t0.elapsed().as_secs_f64()
    );
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_newer_nvrtc_than_the_driver_is_named() {
        assert_eq!(super::ptx_hint((12, 8), 12080), "");
        assert_eq!(super::ptx_hint((12, 4), 13000), "");
        let h = super::ptx_hint((12, 9), 12080);
        assert!(h.contains("NVRTC 12.9") && h.contains("CUDA 12.8"), "{h}");
        assert!(super::ptx_hint((13, 2), 12090).contains("CUDA 12.9"));
    }

    /// Every `kernels/*.cu` and `*.cuh` is embedded: a kernel file left out of [`super::SOURCES`]
    /// would pass CI's compile checks and fail only on a GPU ("kernel … not loaded").
    #[test]
    fn the_embedded_sources_are_the_kernel_files() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu") || n.ends_with(".cuh"))
            .collect();
        files.sort();
        let mut embedded: Vec<String> = super::SOURCES
            .iter()
            .chain(super::HEADERS)
            .map(|(name, text)| {
                let on_disk = std::fs::read_to_string(dir.join(name)).unwrap();
                assert_eq!(*text, on_disk, "{name}");
                name.to_string()
            })
            .collect();
        embedded.sort();
        assert_eq!(embedded, files);
    }
}
