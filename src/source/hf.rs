//! HF model directories: `config.json` plus `model.safetensors` or a sharded
//! `model.safetensors.index.json`, memory-mapped; f32, f16 and bf16 tensors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;

use crate::error::{IoContext, MasaError, Result};

/// The safetensors files of one HF directory, memory-mapped; tensors are read on demand.
pub struct HfTensors {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name -> (file index, dtype, shape)
    index: BTreeMap<String, (usize, safetensors::Dtype, Vec<usize>)>,
}

impl HfTensors {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let sharded = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if sharded.exists() {
            shard_paths(&sharded)?
        } else {
            return Err(MasaError::bad_file(
                dir,
                "no `model.safetensors` or `model.safetensors.index.json` in this directory (masa reads HF safetensors checkpoints; convert .bin checkpoints with `transformers` first)",
            ));
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for (i, p) in paths.into_iter().enumerate() {
            let file = std::fs::File::open(&p).at(&p)?;
            // SAFETY: the file is opened read-only; masa never writes into a source checkpoint.
            let mmap = unsafe { Mmap::map(&file) }.at(&p)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| MasaError::bad_file(&p, format!("not a valid safetensors file: {e}")))?;
            for (name, view) in st.tensors() {
                check_dtype(&p, &name, view.dtype())?;
                index.insert(name, (i, view.dtype(), view.shape().to_vec()));
            }
            files.push((p, mmap));
        }
        Ok(HfTensors { files, index })
    }

    /// The weight files read, in order (`model.safetensors`, or the shards of the index).
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn info(&self, name: &str) -> Option<(Vec<usize>, String)> {
        self.index.get(name).map(|(_, dt, shape)| (shape.clone(), format!("{dt:?}")))
    }

    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let (fi, _, _) = self
            .index
            .get(name)
            .ok_or_else(|| MasaError::bad_file(&self.files[0].0, format!("tensor `{name}` not found in the checkpoint")))?;
        let (path, mmap) = &self.files[*fi];
        let st = SafeTensors::deserialize(mmap).map_err(|e| MasaError::bad_file(path, e.to_string()))?;
        let view = st.tensor(name).map_err(|e| MasaError::bad_file(path, e.to_string()))?;
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => return Err(MasaError::unsupported(path, "tensor dtype", format!("{other:?} for `{name}`"))),
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?.to_dtype(DType::F32)?;
        // The tensor owns a copy now: drop the mapped pages from this process (they stay in the
        // page cache), so a pass over a model larger than memory keeps a bounded resident set.
        #[cfg(unix)]
        {
            let offset = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
            // SAFETY: the mapping is read-only and masa never writes the file; MADV_DONTNEED on a
            // file mapping only unmaps the pages, a later read faults in the same bytes.
            let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, view.data().len()) };
        }
        Ok(t)
    }
}

fn check_dtype(path: &Path, name: &str, dt: safetensors::Dtype) -> Result<()> {
    match dt {
        safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16 => Ok(()),
        other => Err(MasaError::unsupported(path, "tensor dtype", format!("{other:?} for `{name}` (masa reads F32, F16, BF16)"))),
    }
}

/// The shard files an index names, in a stable order; each must exist.
fn shard_paths(index_path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index_path).at(index_path)?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| MasaError::bad_file(index_path, format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| MasaError::field(index_path, "weight_map", "missing or not an object"))?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut seen: HashMap<&str, ()> = HashMap::new();
    let mut out = Vec::new();
    let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    names.sort();
    for n in names {
        if seen.insert(n, ()).is_none() {
            let p = dir.join(n);
            if !p.exists() {
                return Err(MasaError::bad_file(
                    index_path,
                    format!("the index names shard `{n}`, which does not exist in {}", dir.display()),
                ));
            }
            out.push(p);
        }
    }
    Ok(out)
}
