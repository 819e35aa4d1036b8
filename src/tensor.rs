//! Host tensors: a dtype, a shape and bytes that are either borrowed from a memory-mapped
//! checkpoint (no copy) or owned (dequantized, converted, or re-aligned at load). Kernels read
//! the stored dtype through [`View`] and widen in registers.

use std::ops::Range;
use std::sync::Arc;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::Mmap;

/// Element types a weight can be stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Parses `f32`, `f16` or `bf16` (CLI spelling).
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "f32" | "float32" => Some(DType::F32),
            "f16" | "float16" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

/// A typed, borrowed view of a tensor's elements.
#[derive(Clone, Copy)]
pub enum View<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl View<'_> {
    pub fn len(&self) -> usize {
        match self {
            View::F32(s) => s.len(),
            View::F16(s) => s.len(),
            View::BF16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` widened to f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            View::F32(s) => s[i],
            View::F16(s) => s[i].to_f32(),
            View::BF16(s) => s[i].to_f32(),
        }
    }

    /// Elements `range` widened into `out` (same length).
    pub fn widen_into(&self, range: Range<usize>, out: &mut [f32]) {
        match self {
            View::F32(s) => out.copy_from_slice(&s[range]),
            View::F16(s) => s[range].convert_to_f32_slice(out),
            View::BF16(s) => s[range].convert_to_f32_slice(out),
        }
    }
}

enum Data {
    /// Bytes `range` of a mapped file; alignment for the dtype was checked when it was made.
    Mapped {
        map: Arc<Mmap>,
        range: Range<usize>,
    },
    /// Bytes `range` of an anonymous read-only arena made by [`pack`] (64-byte aligned, huge
    /// pages where the OS gives them).
    Anon {
        map: Arc<Mmap>,
        range: Range<usize>,
    },
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// A tensor in host memory (row-major, HF shape order: `[out, in]` for linear weights).
pub struct HostTensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Data,
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_mapped() { "mapped" } else { "owned" };
        write!(
            f,
            "HostTensor({} {:?} {kind})",
            self.dtype.name(),
            self.shape
        )
    }
}

impl HostTensor {
    /// Borrows `range` of `map` as a tensor. Falls back to an owned copy when the bytes are not
    /// aligned for `dtype` (safetensors does not promise alignment). The caller has checked that
    /// `range.len() == numel * dtype.size_bytes()`.
    pub fn mapped(
        map: &Arc<Mmap>,
        range: Range<usize>,
        dtype: DType,
        shape: Vec<usize>,
    ) -> HostTensor {
        let bytes = &map[range.clone()];
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(dtype.size_bytes());
        if aligned {
            return HostTensor {
                dtype,
                shape,
                data: Data::Mapped {
                    map: Arc::clone(map),
                    range,
                },
            };
        }
        let data = match dtype {
            DType::F32 => Data::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => Data::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => Data::BF16(bytemuck::pod_collect_to_vec(bytes)),
        };
        HostTensor { dtype, shape, data }
    }

    pub fn from_f32(values: Vec<f32>, shape: Vec<usize>) -> HostTensor {
        debug_assert_eq!(values.len(), shape.iter().product::<usize>());
        HostTensor {
            dtype: DType::F32,
            shape,
            data: Data::F32(values),
        }
    }

    /// The elements' bytes (little-endian, as stored).
    fn bytes(&self) -> &[u8] {
        match self.view() {
            View::F32(s) => bytemuck::cast_slice(s),
            View::F16(s) => bytemuck::cast_slice(s),
            View::BF16(s) => bytemuck::cast_slice(s),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the elements are read straight from the mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, Data::Mapped { .. })
    }

    pub fn view(&self) -> View<'_> {
        match &self.data {
            Data::Mapped { map, range } | Data::Anon { map, range } => {
                let bytes = &map[range.clone()];
                // File maps: alignment was checked in `mapped`; arena ranges are 64-byte aligned.
                // So these casts cannot fail.
                match self.dtype {
                    DType::F32 => View::F32(bytemuck::cast_slice(bytes)),
                    DType::F16 => View::F16(bytemuck::cast_slice(bytes)),
                    DType::BF16 => View::BF16(bytemuck::cast_slice(bytes)),
                }
            }
            Data::F32(v) => View::F32(v),
            Data::F16(v) => View::F16(v),
            Data::BF16(v) => View::BF16(v),
        }
    }

    /// All elements widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.view().widen_into(0..out.len(), &mut out);
        out
    }

    /// This tensor in `dtype` (round to nearest even when narrowing); `self` when it already is.
    pub fn into_dtype(self, dtype: DType) -> HostTensor {
        if dtype == self.dtype {
            return self;
        }
        let src = self.view();
        let data = match dtype {
            DType::F32 => Data::F32(self.to_f32_vec()),
            DType::F16 => Data::F16((0..src.len()).map(|i| f16::from_f32(src.get(i))).collect()),
            DType::BF16 => Data::BF16((0..src.len()).map(|i| bf16::from_f32(src.get(i))).collect()),
        };
        HostTensor {
            dtype,
            shape: self.shape.clone(),
            data,
        }
    }
}

/// Moves every tensor that is not read from a file (dequantized, converted, re-aligned) into one
/// read-only anonymous arena advised to use transparent huge pages, 64-byte aligned per tensor.
/// Decode streams every weight byte each step; 2 MiB pages spare the hardware prefetchers a
/// restart (and the TLB a miss) every 4 KiB — measured +7 to +12 % on a DRAM-bound GEMV
/// (docs/PERF.md). One arena rather than one map per tensor, because a tensor smaller than
/// 2 MiB cannot get a huge page of its own. Tensors are left as they are if the map cannot be
/// made.
pub fn pack<'a>(tensors: impl IntoIterator<Item = &'a mut HostTensor>) {
    const ALIGN: usize = 64;
    let mut owned: Vec<&mut HostTensor> = tensors
        .into_iter()
        .filter(|t| !t.is_mapped() && t.numel() > 0)
        .collect();
    let mut total = 0usize;
    let mut ranges = Vec::with_capacity(owned.len());
    for t in &owned {
        let start = total.next_multiple_of(ALIGN);
        total = start + t.bytes().len();
        ranges.push(start..total);
    }
    if total == 0 {
        return;
    }
    let Ok(mut map) = memmap2::MmapOptions::new().len(total).map_anon() else {
        return;
    };
    #[cfg(target_os = "linux")]
    {
        // Advisory only: without THP the arena simply keeps 4 KiB pages.
        let _ = map.advise(memmap2::Advice::HugePage);
    }
    for (t, r) in owned.iter().zip(&ranges) {
        map[r.clone()].copy_from_slice(t.bytes());
    }
    let Ok(map) = map.make_read_only() else {
        return;
    };
    let map = Arc::new(map);
    for (t, range) in owned.iter_mut().zip(ranges) {
        t.data = Data::Anon {
            map: Arc::clone(&map),
            range,
        };
    }
}
