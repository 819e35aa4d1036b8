//! What a hostile checkpoint can make the loader allocate before it is refused: GGUF tensors
//! that all claim the whole data section, a safetensors matrix of a shape the config has no
//! place for. And what the index's lookups on the scoring path allocate: nothing. Its own test
//! binary, for its counting allocator.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use gram::model::checkpoint::Source;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// The system allocator, counting the bytes live and their peak, and the allocations.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

std::thread_local! {
    /// Allocations made by this thread (the harness's own threads allocate meanwhile).
    static THREAD_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts one allocation, in all and on the calling thread.
fn count_call() {
    CALLS.fetch_add(1, Ordering::Relaxed);
    // `try_with`: a thread's last allocations may come after its locals are gone.
    let _ = THREAD_CALLS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is forwarded to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_call();
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_call();
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        count_call();
        let q = unsafe { System.realloc(p, layout, new) };
        if !q.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let live = LIVE.fetch_add(new, Ordering::Relaxed) + new;
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The counters are the process's: the tests take turns, or one test's allocations (and its
/// reset of the peak) land in another's measurement, which then wraps below its start.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The turn of one test (a failed test's poison does not stop the others).
fn turn() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The one-layer Llama config of the synthetic GGUFs.
fn tiny_config() -> gram::config::ModelConfig {
    gram::config::ModelConfig::from_json(
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":256}"#,
    )
    .unwrap()
}

/// A GGUF (version 3) of Q4_0 tensors `(name, data offset)`, each `[32, rows]` (`rows` blocks
/// of 18 bytes), followed by `data`; its metadata [`tiny_config`]'s architecture and head counts.
fn q4_0_gguf(tensors: &[(String, u64)], rows: u64, data: &[u8]) -> Vec<u8> {
    let dims = [32u64, rows];
    let tensors: Vec<(&str, &[u64], u32, u64)> = tensors
        .iter()
        .map(|(name, offset)| (name.as_str(), &dims[..], 2, *offset)) // 2: Q4_0
        .collect();
    common::gguf::gguf_of(&tensors, data)
}

/// 12 Q4_0 tensors (each dequantized to f32 at load: 7.1 times its bytes; the config takes 13
/// tensors), every one at data offset 0 over the same 1 MiB: were they converted before the
/// layout check, the load would hold ~85 MB before refusing; it must refuse holding a few MB at
/// most. 64 such tensors, more than the config takes, are refused by their count.
#[test]
fn overlapping_tensors_are_refused_before_they_are_converted() {
    let _turn = turn();
    let config = tiny_config();
    let dir = std::env::temp_dir().join(format!("gram-gguf-alloc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // [32, 58254] Q4_0 is 58,254 blocks, 1,048,572 bytes; every tensor at offset 0.
    let rows = 58_254u64;
    for (count, says) in [(12, "overlaps"), (64, "lists 64 tensors")] {
        let tensors: Vec<(String, u64)> = (0..count)
            .map(|i| (format!("blk.{i}.ffn_up.weight"), 0))
            .collect();
        let b = q4_0_gguf(&tensors, rows, &vec![0x11u8; (rows * 18) as usize]);
        std::fs::write(dir.join("model.gguf"), b).unwrap();
        let source = Source::find(&dir).unwrap();
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let err = match source.load(&config) {
            Ok(_) => panic!("{count} tensors on one another loaded"),
            Err(e) => e.to_string(),
        };
        let peak = PEAK.load(Ordering::Relaxed) - before;
        assert!(err.contains(says), "{count}: {err}");
        assert!(
            peak < 16 << 20,
            "{count}: {peak} bytes held before the refusal"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// tiny-llama with its first `q_proj` (64 × 64 f32) replaced by a 1 × 2^20 one (4 MiB): laid out
/// as panels it would take 32 rows (128 MiB); it is refused by name and shape first.
#[test]
fn a_matrix_of_the_wrong_shape_is_refused_before_it_is_laid_out() {
    let _turn = turn();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llama");
    let dir = std::env::temp_dir().join(format!("gram-shape-alloc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let wide = vec![0u8; 4 << 20];
    let views: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let view = if n == name {
                TensorView::new(Dtype::F32, vec![1, 1 << 20], &wide).unwrap()
            } else {
                v
            };
            (n, view)
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    drop(st);
    drop(bytes);
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let err = match gram::Model::load(&dir, &gram::LoadOptions::default()) {
        Ok(_) => panic!("a 1 × 2^20 q_proj loaded"),
        Err(e) => e.to_string(),
    };
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert!(
        err.contains(name) && err.contains("does not fit the config"),
        "{err}"
    );
    assert!(peak < 32 << 20, "{peak} bytes held before the refusal");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One well-laid Q4_0 tensor (8 MiB, 59 MiB once widened to f32) that the config has no place
/// for (`blk.999`): refused by name before it is dequantized.
#[test]
fn a_gguf_tensor_the_config_does_not_take_is_refused_before_it_is_dequantized() {
    let _turn = turn();
    let config = tiny_config();
    let dir = std::env::temp_dir().join(format!("gram-gguf-unplanned-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // [32, 466,033] Q4_0 is 466,033 blocks of 18 bytes.
    let rows = 466_033u64;
    let tensors = [("blk.999.ffn_up.weight".to_string(), 0)];
    let b = q4_0_gguf(&tensors, rows, &vec![0x5au8; (rows * 18) as usize]);
    std::fs::write(dir.join("model.gguf"), b).unwrap();
    let source = Source::find(&dir).unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let err = match source.load(&config) {
        Ok(_) => panic!("a tensor the config has no place for loaded"),
        Err(e) => e.to_string(),
    };
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert!(err.contains("missing from the checkpoint"), "{err}");
    assert!(peak < 8 << 20, "{peak} bytes held before the refusal");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The lookups scoring makes for every code and every product of an answer (code records and
/// texts, postings, product records and texts, their prefetches) allocate nothing: a section
/// name formatted on each of them (for an error that never came) once took a third of the
/// scoring stage.
#[test]
fn index_lookups_allocate_nothing() {
    let dir = common::fresh_dir("lookup-alloc");
    let lines: Vec<String> = [("p0", "oak sofa", "sofa"), ("p1", "wool rug", "rug")]
        .into_iter()
        .map(|(id, title, code)| {
            serde_json::json!({"id": id, "title": title, "codes": [code, format!("{code} | x")]})
                .to_string()
        })
        .collect();
    let ix = common::build_index(&dir, "tiny-llama", &lines);
    let index = gram::index::Index::open(&gram::search::index_file(&ix)).unwrap();
    let pq = [0.5f32; 8];
    let _turn = turn();
    // This thread's allocations only: the test harness's threads allocate while it runs.
    let before = THREAD_CALLS.with(|c| c.get());
    let mut seen = 0usize;
    for id in 0..index.num_codes() as u32 {
        let n = index.code(id).unwrap().n_tokens as usize;
        let text = index.code_text(id).unwrap();
        let list = index.postings(id, &pq[..n], &pq[..n]).unwrap();
        seen += text.len() + list.products.len();
    }
    for i in 0..index.num_products() as u32 {
        index.prefetch_product_record(i);
        index.prefetch_product_text(i);
        let (id, title) = index.product(i).unwrap();
        seen += id.len() + title.len();
    }
    let calls = THREAD_CALLS.with(|c| c.get()) - before;
    drop(_turn);
    assert!(seen > 0);
    assert_eq!(
        calls,
        0,
        "allocations in {} code and {} product lookups",
        index.num_codes(),
        index.num_products()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
