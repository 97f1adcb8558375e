//! A streaming safetensors writer: the header is computed from names, dtypes and shapes, then
//! each tensor's bytes are written in order by a callback, so a file far larger than memory
//! (a synthetic checkpoint shard, a statistics file) is never held whole. Written to a temp file
//! beside the target and renamed, like [`crate::home::write_atomic`].

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use safetensors::Dtype;

use crate::error::{IoContext, MasaError, Result};

/// One tensor of a file to write.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl Entry {
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Write `entries` to `path` in the safetensors format with `metadata` (`__metadata__`).
/// `fill(i, out)` writes exactly `entries[i].bytes()` bytes of tensor `i` (little-endian);
/// a different count is an error naming the tensor.
pub fn write(
    path: &Path,
    entries: &[Entry],
    metadata: &BTreeMap<String, String>,
    mut fill: impl FnMut(usize, &mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).map_err(|e| MasaError::Invalid(e.to_string()))?);
    }
    let mut offset = 0usize;
    for e in entries {
        let dtype = serde_json::to_value(e.dtype).map_err(|err| MasaError::Invalid(err.to_string()))?;
        let end = offset + e.bytes();
        header.insert(e.name.clone(), serde_json::json!({ "dtype": dtype, "shape": e.shape, "data_offsets": [offset, end] }));
        offset = end;
    }
    let mut head = serde_json::to_vec(&header).map_err(|e| MasaError::Invalid(e.to_string()))?;
    // The data starts 8-byte aligned (the format pads the header with spaces).
    head.resize(head.len().div_ceil(8) * 8, b' ');
    crate::home::write_atomic_with(path, |out| {
        out.write_all(&(head.len() as u64).to_le_bytes()).at(path)?;
        out.write_all(&head).at(path)?;
        for (i, e) in entries.iter().enumerate() {
            let mut counted = Counted { inner: &mut *out, n: 0 };
            fill(i, &mut counted).at(path)?;
            if counted.n != e.bytes() {
                return Err(MasaError::bad_file(
                    path,
                    format!("tensor `{}`: {} bytes written, its shape needs {}", e.name, counted.n, e.bytes()),
                ));
            }
        }
        Ok(())
    })
}

/// A writer that counts the bytes passed through.
struct Counted<'a> {
    inner: &'a mut dyn Write,
    n: usize,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Little-endian bytes of f64 values, without copying on little-endian targets.
pub fn f64_le_bytes(v: &[f64]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: f64 has no padding or invalid bit patterns; u8 has alignment 1; the length
        // covers exactly the same memory.
        std::borrow::Cow::Borrowed(unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) })
    } else {
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_read_back_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let entries = vec![
            Entry { name: "b".into(), dtype: Dtype::F64, shape: vec![2, 3] },
            Entry { name: "a".into(), dtype: Dtype::BF16, shape: vec![3] },
        ];
        let md: BTreeMap<String, String> = [("masa".to_string(), "{}".to_string())].into();
        write(&p, &entries, &md, |i, out| match i {
            0 => out.write_all(&f64_le_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
            _ => out.write_all(
                &[half::bf16::from_f32(0.5).to_le_bytes(), half::bf16::ONE.to_le_bytes(), half::bf16::ZERO.to_le_bytes()].concat(),
            ),
        })
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let b = st.tensor("b").unwrap();
        assert_eq!((b.dtype(), b.shape()), (Dtype::F64, &[2, 3][..]));
        assert_eq!(f64::from_le_bytes(b.data()[40..48].try_into().unwrap()), 6.0);
        assert_eq!(half::bf16::from_le_bytes(st.tensor("a").unwrap().data()[0..2].try_into().unwrap()).to_f32(), 0.5);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["masa"], "{}");
        // A fill that writes the wrong number of bytes is an error naming the tensor; no file is left.
        let q = dir.path().join("short.safetensors");
        let e = write(&q, &entries, &md, |_, out| out.write_all(&[0u8; 3])).unwrap_err().to_string();
        assert!(e.contains("tensor `b`") && e.contains("3 bytes"), "{e}");
        assert!(!q.exists());
    }
}
