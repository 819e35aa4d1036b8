//! A minimal GGUF writer for tests, shared by the unit tests of `src/model/gguf` (through
//! `#[path]`) and the integration tests (`tests/common`).

/// A GGUF (version 3) of tensors `(name, dims innermost first, ggml type, offset)` with
/// `data` after the header (aligned to 32); its metadata a `llama` architecture with 2
/// attention heads and 2 KV heads (the tests' one-layer configs).
pub fn gguf_of(tensors: &[(&str, &[u64], u32, u64)], data: &[u8]) -> Vec<u8> {
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
