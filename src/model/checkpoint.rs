//! Finds and opens a model directory's weight files and yields every tensor under its HF name,
//! memory-mapped where the stored dtype allows. Formats: one `model.safetensors`, a sharded set
//! named by `model.safetensors.index.json`, or one `*.gguf` (see `gguf.rs`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::gguf;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};

/// Every tensor of a checkpoint, by HF name.
pub type TensorMap = HashMap<String, HostTensor>;

/// Which weight files a directory holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Safetensors(Vec<PathBuf>),
    /// A set of shards and the index that says which holds each tensor.
    Sharded {
        index: PathBuf,
        files: Vec<PathBuf>,
        weight_map: HashMap<String, String>,
    },
    Gguf(PathBuf),
}

impl Source {
    /// Looks in `dir` for, in order: `model.safetensors`, `model.safetensors.index.json`, a
    /// single `*.safetensors`, a single `*.gguf`. (transformers' `from_pretrained` takes the
    /// unsharded file first too: a directory an unsharded save wrote into over an older sharded
    /// one loads the new weights, not the stale shards.)
    pub fn find(dir: &Path) -> Result<Source> {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Ok(Source::Safetensors(vec![single]));
        }
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let (files, weight_map) = shards_from_index(&index)?;
            return Ok(Source::Sharded {
                index,
                files,
                weight_map,
            });
        }
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut st = Vec::new();
        let mut gg = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("safetensors") => st.push(path),
                Some("gguf") => gg.push(path),
                _ => {}
            }
        }
        st.sort();
        gg.sort();
        match (st.len(), gg.len()) {
            (1, _) => Ok(Source::Safetensors(st)),
            (0, 1) => Ok(Source::Gguf(gg.remove(0))),
            (0, 0) => Err(Error::checkpoint(dir, "no model.safetensors, model.safetensors.index.json or *.gguf")),
            _ => Err(Error::checkpoint(
                dir,
                "several weight files and no model.safetensors.index.json to say how they fit together",
            )),
        }
    }

    /// Opens the files and returns every tensor under its HF name.
    pub fn load(&self, config: &ModelConfig) -> Result<TensorMap> {
        match self {
            Source::Safetensors(paths) => {
                let mut found = Found::default();
                for path in paths {
                    load_safetensors(path, &mut found)?;
                }
                found.into_map(config)
            }
            Source::Sharded {
                index,
                files,
                weight_map,
            } => {
                let mut found = Found::default();
                for path in files {
                    let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
                    // Unlisted tensors meet the name check every tensor meets.
                    for name in load_safetensors(path, &mut found)? {
                        if let Some(f) = weight_map.get(&name).filter(|f| *f != file) {
                            return Err(Error::checkpoint(
                                index,
                                format!("`{name}` is in {file}, the index says {f}"),
                            ));
                        }
                    }
                }
                let mut names: Vec<&String> = weight_map.keys().collect();
                names.sort();
                if let Some(name) = names.into_iter().find(|n| !found.names.contains(*n)) {
                    return Err(Error::checkpoint(
                        index,
                        format!(
                            "`{name}` is in no shard (the index says {})",
                            weight_map[name]
                        ),
                    ));
                }
                found.into_map(config)
            }
            Source::Gguf(path) => gguf::load(path, config),
        }
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: WeightMap,
}

/// `weight_map`, read entry by entry: JSON lets a key repeat and a plain map would keep the
/// last one silently.
struct WeightMap(HashMap<String, String>);

impl<'de> Deserialize<'de> for WeightMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = WeightMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of tensor name → shard file")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<WeightMap, A::Error> {
                let mut m = HashMap::new();
                while let Some((name, file)) = a.next_entry::<String, String>()? {
                    if m.contains_key(&name) {
                        return Err(serde::de::Error::custom(format!(
                            "tensor `{name}` is named twice"
                        )));
                    }
                    m.insert(name, file);
                }
                Ok(WeightMap(m))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// The shard files an index names, and its map of tensor → shard.
fn shards_from_index(index: &Path) -> Result<(Vec<PathBuf>, HashMap<String, String>)> {
    let text = crate::container::read_capped(index, crate::container::JSON_CAP)
        .map_err(|e| Error::io(index, e))?;
    let parsed: ShardIndex = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(index, format!("not a safetensors index: {e}")))?;
    let weight_map = parsed.weight_map.0;
    let dir = index.parent().unwrap_or(Path::new("."));
    let files: BTreeSet<&String> = weight_map.values().collect();
    if files.is_empty() {
        return Err(Error::checkpoint(index, "weight_map is empty"));
    }
    let mut out = Vec::new();
    for f in files {
        if f.is_empty() || f.contains('/') || f.contains('\\') || f.starts_with('.') {
            return Err(Error::checkpoint(
                index,
                format!("shard name `{f}` is not a plain file name"),
            ));
        }
        out.push(dir.join(f));
    }
    Ok((out, weight_map))
}

/// Maps `path` read-only.
pub(crate) fn map_file(path: &Path) -> Result<Arc<Mmap>> {
    let file = crate::container::open_regular(path)?;
    // SAFETY: the map is read-only but shared (memmap2 maps with MAP_SHARED): another process
    // that truncates the file while it is mapped makes reads fault (SIGBUS), and one that
    // rewrites it in place changes bytes under a `&[u8]` (undefined behaviour, and it undoes
    // the checks made at load). Like every mmap user we require that model files are not
    // modified while a model is loaded (replace them by rename instead).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Arc::new(map))
}

/// The tensors of a set of safetensors files, found but not yet taken: where each lies, its
/// dtype and shape.
#[derive(Default)]
struct Found {
    names: std::collections::HashSet<String>,
    tensors: Vec<FoundTensor>,
}

/// One tensor of [`Found`].
struct FoundTensor {
    name: String,
    map: Arc<Mmap>,
    range: std::ops::Range<usize>,
    dtype: DType,
    shape: Vec<usize>,
}

impl Found {
    /// The tensors, once their names and shapes fit `config` (`weights::check_shapes`), less
    /// those the engine ignores. Only then is a tensor that lies misaligned in its file copied
    /// (`HostTensor::mapped`): a wrong model's file costs no memory before it is refused.
    fn into_map(self, config: &ModelConfig) -> Result<TensorMap> {
        super::weights::check_shapes(
            config,
            self.tensors
                .iter()
                .map(|t| (t.name.as_str(), t.shape.as_slice())),
        )?;
        Ok(self
            .tensors
            .into_iter()
            .filter(|t| !super::weights::ignored(config, &t.name))
            .map(|t| {
                (
                    t.name,
                    HostTensor::mapped(&t.map, t.range, t.dtype, t.shape),
                )
            })
            .collect())
    }
}

/// Adds the tensors of one safetensors file to `out`; returns their names.
fn load_safetensors(path: &Path, out: &mut Found) -> Result<Vec<String>> {
    let map = map_file(path)?;
    let st = SafeTensors::deserialize(&map)
        .map_err(|e| Error::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
    let base = map.as_ptr() as usize;
    let mut names = Vec::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(Error::tensor(
                    name,
                    format!(
                        "dtype {other:?} in {} is not supported (f32, f16, bf16)",
                        path.display()
                    ),
                ))
            }
        };
        let start = view.data().as_ptr() as usize - base;
        let range = start..start + view.data().len();
        if !out.names.insert(name.clone()) {
            return Err(Error::tensor(
                name,
                format!("appears twice (again in {})", path.display()),
            ));
        }
        names.push(name.clone());
        out.tensors.push(FoundTensor {
            name,
            map: Arc::clone(&map),
            range,
            dtype,
            shape: view.shape().to_vec(),
        });
    }
    Ok(names)
}
