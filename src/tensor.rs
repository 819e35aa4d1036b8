//! Host tensors: a dtype, a shape and bytes that are either borrowed from a memory-mapped
//! checkpoint (no copy) or owned (dequantized, converted, or re-aligned at load). Kernels read
//! the stored dtype through [`View`] and widen in registers; the GGUF block types Q4_1 and Q8_0
//! are kept as stored too and dequantized a few rows at a time by the matmul (`d·q` is exact in
//! f32, so `d·q + m` rounds once whether fused or not: the values are those a load-time
//! dequantization gives).

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
    /// ggml Q4_1: blocks of 32 elements, f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles
    /// (element `j` = low nibble of byte `j`, element `j + 16` = high nibble); `x = q·d + m`.
    Q4_1,
    /// ggml Q8_0: blocks of 32 elements, f16 scale `d`, 32 signed bytes; `x = q·d`.
    Q8_0,
}

impl DType {
    /// `(elements, bytes)` of one storage block: one element for plain types, 32 for ggml's.
    pub fn block(self) -> (usize, usize) {
        match self {
            DType::F32 => (1, 4),
            DType::F16 | DType::BF16 => (1, 2),
            DType::Q4_1 => (32, 20),
            DType::Q8_0 => (32, 34),
        }
    }

    /// Bytes that `numel` elements take (`numel` a whole number of blocks).
    pub fn bytes_for(self, numel: usize) -> usize {
        let (e, b) = self.block();
        numel / e * b
    }

    /// Alignment the kernels need to read the elements in place.
    fn align(self) -> usize {
        match self {
            DType::Q4_1 | DType::Q8_0 => 1,
            d => d.block().1,
        }
    }

    /// A ggml block type (dequantized by the matmul, never by a user's `--dtype`).
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q4_1 | DType::Q8_0)
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
            DType::Q4_1 => "q4_1",
            DType::Q8_0 => "q8_0",
        }
    }
}

/// Element `j` of a Q4_1 block.
#[inline]
fn q4_1(b: &[u8], j: usize) -> f32 {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
    let q = if j < 16 {
        b[4 + j] & 0x0f
    } else {
        b[4 + j - 16] >> 4
    };
    q as f32 * d + m
}

/// Element `j` of a Q8_0 block.
#[inline]
fn q8_0(b: &[u8], j: usize) -> f32 {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    b[2 + j] as i8 as f32 * d
}

/// A typed, borrowed view of a tensor's elements.
#[derive(Clone, Copy)]
pub enum View<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// Q4_1 blocks (see [`DType::Q4_1`]).
    Q4_1(&'a [u8]),
    /// Q8_0 blocks (see [`DType::Q8_0`]).
    Q8_0(&'a [u8]),
}

impl<'a> View<'a> {
    /// Elements `range`; for ggml blocks the range must cover whole blocks of 32.
    pub fn slice(&self, range: Range<usize>) -> View<'a> {
        let blocks = |b: &'a [u8], bytes: usize| {
            assert!(
                range.start.is_multiple_of(32) && range.end.is_multiple_of(32),
                "a block view sliced inside a block; this is a bug"
            );
            &b[range.start / 32 * bytes..range.end / 32 * bytes]
        };
        match *self {
            View::F32(s) => View::F32(&s[range]),
            View::F16(s) => View::F16(&s[range]),
            View::BF16(s) => View::BF16(&s[range]),
            View::Q4_1(b) => View::Q4_1(blocks(b, 20)),
            View::Q8_0(b) => View::Q8_0(blocks(b, 34)),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            View::F32(s) => s.len(),
            View::F16(s) => s.len(),
            View::BF16(s) => s.len(),
            View::Q4_1(b) => b.len() / 20 * 32,
            View::Q8_0(b) => b.len() / 34 * 32,
        }
    }

    /// A ggml block view (the matmul dequantizes it a panel of rows at a time).
    pub fn is_quantized(&self) -> bool {
        matches!(self, View::Q4_1(_) | View::Q8_0(_))
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
            View::Q4_1(b) => q4_1(&b[i / 32 * 20..i / 32 * 20 + 20], i % 32),
            View::Q8_0(b) => q8_0(&b[i / 32 * 34..i / 32 * 34 + 34], i % 32),
        }
    }

    /// Elements `range` widened into `out` (same length).
    pub fn widen_into(&self, range: Range<usize>, out: &mut [f32]) {
        match self {
            View::F32(s) => out.copy_from_slice(&s[range]),
            View::F16(s) => s[range].convert_to_f32_slice(out),
            View::BF16(s) => s[range].convert_to_f32_slice(out),
            View::Q4_1(b) | View::Q8_0(b) => {
                let bytes = if matches!(self, View::Q4_1(_)) {
                    20
                } else {
                    34
                };
                let elem = |blk: &[u8], j| match self {
                    View::Q4_1(_) => q4_1(blk, j),
                    _ => q8_0(blk, j),
                };
                for (o, i) in out.iter_mut().zip(range) {
                    let at = i / 32 * bytes;
                    *o = elem(&b[at..at + bytes], i % 32);
                }
            }
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
    /// Owned ggml blocks.
    Blocks(Vec<u8>),
}

/// A tensor in host memory (row-major, HF shape order: `[out, in]` for linear weights).
pub struct HostTensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Data,
    /// The same matrix laid out for a backend's matmul: the CPU's panels
    /// (`backend::cpu::panels`, same element type; ggml blocks stay blocks), which its matmul
    /// reads for every row count instead of `data`.
    panels: Option<Box<HostTensor>>,
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
    /// `range.len() == dtype.bytes_for(numel)`.
    pub fn mapped(
        map: &Arc<Mmap>,
        range: Range<usize>,
        dtype: DType,
        shape: Vec<usize>,
    ) -> HostTensor {
        let bytes = &map[range.clone()];
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(dtype.align());
        if aligned {
            return HostTensor {
                dtype,
                shape,
                data: Data::Mapped {
                    map: Arc::clone(map),
                    range,
                },
                panels: None,
            };
        }
        let data = match dtype {
            DType::F32 => Data::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => Data::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => Data::BF16(bytemuck::pod_collect_to_vec(bytes)),
            DType::Q4_1 | DType::Q8_0 => Data::Blocks(bytes.to_vec()),
        };
        HostTensor {
            dtype,
            shape,
            data,
            panels: None,
        }
    }

    /// Owned ggml blocks of `dtype` (the caller has checked the length against the shape).
    pub fn from_blocks(bytes: Vec<u8>, dtype: DType, shape: Vec<usize>) -> HostTensor {
        debug_assert!(dtype.is_quantized());
        debug_assert_eq!(bytes.len(), dtype.bytes_for(shape.iter().product()));
        HostTensor {
            dtype,
            shape,
            data: Data::Blocks(bytes),
            panels: None,
        }
    }

    pub fn from_f32(values: Vec<f32>, shape: Vec<usize>) -> HostTensor {
        debug_assert_eq!(values.len(), shape.iter().product::<usize>());
        HostTensor {
            dtype: DType::F32,
            shape,
            data: Data::F32(values),
            panels: None,
        }
    }

    pub fn from_f16(values: Vec<f16>, shape: Vec<usize>) -> HostTensor {
        debug_assert_eq!(values.len(), shape.iter().product::<usize>());
        HostTensor {
            dtype: DType::F16,
            shape,
            data: Data::F16(values),
            panels: None,
        }
    }

    pub fn from_bf16(values: Vec<bf16>, shape: Vec<usize>) -> HostTensor {
        debug_assert_eq!(values.len(), shape.iter().product::<usize>());
        HostTensor {
            dtype: DType::BF16,
            shape,
            data: Data::BF16(values),
            panels: None,
        }
    }

    /// The elements' bytes (little-endian, as stored).
    fn bytes(&self) -> &[u8] {
        match self.view() {
            View::F32(s) => bytemuck::cast_slice(s),
            View::F16(s) => bytemuck::cast_slice(s),
            View::BF16(s) => bytemuck::cast_slice(s),
            View::Q4_1(b) | View::Q8_0(b) => b,
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
                    DType::Q4_1 => View::Q4_1(bytes),
                    DType::Q8_0 => View::Q8_0(bytes),
                }
            }
            Data::F32(v) => View::F32(v),
            Data::F16(v) => View::F16(v),
            Data::BF16(v) => View::BF16(v),
            Data::Blocks(b) => match self.dtype {
                DType::Q8_0 => View::Q8_0(b),
                _ => View::Q4_1(b),
            },
        }
    }

    /// All elements widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.view().widen_into(0..out.len(), &mut out);
        out
    }

    /// This tensor in `dtype` (round to nearest even when narrowing); `self` when it already is.
    /// Nothing quantizes: asked for a block type it does not have, it comes back in f32.
    pub fn into_dtype(self, dtype: DType) -> HostTensor {
        if dtype == self.dtype {
            return self;
        }
        let dtype = if dtype.is_quantized() {
            DType::F32
        } else {
            dtype
        };
        let src = self.view();
        let data = match dtype {
            DType::F32 | DType::Q4_1 | DType::Q8_0 => Data::F32(self.to_f32_vec()),
            DType::F16 => Data::F16((0..src.len()).map(|i| f16::from_f32(src.get(i))).collect()),
            DType::BF16 => Data::BF16((0..src.len()).map(|i| bf16::from_f32(src.get(i))).collect()),
        };
        HostTensor {
            dtype,
            shape: self.shape.clone(),
            data,
            panels: None,
        }
    }

    /// Gives the matrix the layout a backend's many-row kernels read (the CPU's panels, see
    /// `backend::cpu::panels`), or takes it away (`None`).
    pub fn with_panels(mut self, panels: Option<HostTensor>) -> HostTensor {
        self.panels = panels.map(Box::new);
        self
    }

    /// The panels, if any (for [`pack`]).
    pub fn panels_mut(&mut self) -> Option<&mut HostTensor> {
        self.panels.as_deref_mut()
    }

    /// The panels' elements, if the matrix has them.
    pub fn panels_view(&self) -> Option<View<'_>> {
        self.panels.as_ref().map(|p| p.view())
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
