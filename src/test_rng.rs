//! The unit tests' random inputs: a xorshift64 stream (deterministic, seeded, never all zeros
//! for a nonzero seed) and its values mapped to [-1, 1). Also where the tests find the shared
//! data ([`shared_data`]).

/// The shared data directory: `GRAM_SHARED_DATA` (as `tools/get_smollm2.sh` reads it), else
/// `../shared/data` beside the repository.
pub fn shared_data() -> std::path::PathBuf {
    std::env::var_os("GRAM_SHARED_DATA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
}

/// Marsaglia's xorshift64 (13, 7, 17) from `seed` (nonzero: zero stays zero).
pub fn xorshift(mut s: u64) -> impl FnMut() -> u64 {
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

/// `x`'s top 24 bits as a value in [-1, 1), exact in f32.
pub fn signed_unit(x: u64) -> f32 {
    ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}
