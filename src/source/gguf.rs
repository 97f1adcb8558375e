//! GGUF files (llama.cpp's format): metadata, tensor directory, and dequantization to f32.
//!
//! Reading is candle's `gguf_file`; this module adds up-front validation (every tensor's bytes
//! inside the file, every type one that dequantizes) so a truncated or foreign file fails at
//! open with its path in the message, and maps GGUF tensor names to HF names.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use crate::error::{IoContext, MasaError, Result};

/// An open GGUF file: parsed header and a handle for reading tensor data on demand.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    file: Mutex<File>,
}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).at(path)?;
        let len = file.metadata().at(path)?.len();
        let mut magic = [0u8; 4];
        use std::io::Read;
        if len < 4 || file.read_exact(&mut magic).is_err() || &magic != GGUF_MAGIC {
            return Err(MasaError::bad_file(
                path,
                format!("not a GGUF file (magic {:?}, expected \"GGUF\")", String::from_utf8_lossy(&magic)),
            ));
        }
        use std::io::Seek;
        file.rewind().at(path)?;
        let content =
            crate::error::parser_guard(path, "GGUF header", || Content::read(&mut file).map_err(|e| classify_read_error(path, e)))?;
        validate_extents(path, &content, len)?;
        Ok(GgufFile { path: path.to_path_buf(), content, file: Mutex::new(file) })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn architecture(&self) -> Result<String> {
        self.get_str("general.architecture")
    }

    pub fn get(&self, key: &str) -> Result<&Value> {
        self.content.metadata.get(key).ok_or_else(|| MasaError::field(&self.path, key, "missing from GGUF metadata"))
    }

    pub fn get_str(&self, key: &str) -> Result<String> {
        match self.get(key)? {
            Value::String(s) => Ok(s.clone()),
            v => Err(MasaError::field(&self.path, key, format!("expected a string, found {:?}", v.value_type()))),
        }
    }

    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_u64()
            .map(|x| x as usize)
            .or_else(|_| v.to_u32().map(|x| x as usize))
            .or_else(|_| v.to_i32().map(|x| x as usize))
            .map_err(|_| MasaError::field(&self.path, key, format!("expected an integer, found {:?}", v.value_type())))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.to_f32()
            .map(|x| x as f64)
            .or_else(|_| v.to_f64())
            .map_err(|_| MasaError::field(&self.path, key, format!("expected a float, found {:?}", v.value_type())))
    }

    /// Optional metadata: `Ok(None)` when absent, an error when present with the wrong type.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.content.metadata.contains_key(key) {
            self.get_usize(key).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        if self.content.metadata.contains_key(key) {
            self.get_f64(key).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<String>> {
        if self.content.metadata.contains_key(key) {
            self.get_str(key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Tensor shape in PyTorch order (`(out, in)` for matrices) and GGML type.
    pub fn tensor_info(&self, gguf_name: &str) -> Option<(Vec<usize>, GgmlDType)> {
        self.content.tensor_infos.get(gguf_name).map(|ti| (ti.shape.dims().to_vec(), ti.ggml_dtype))
    }

    /// Read and dequantize one tensor to f32 on the CPU, in PyTorch dimension order.
    pub fn tensor_f32(&self, gguf_name: &str) -> Result<Tensor> {
        let info = self
            .content
            .tensor_infos
            .get(gguf_name)
            .ok_or_else(|| MasaError::bad_file(&self.path, format!("tensor `{gguf_name}` not found in the GGUF file")))?;
        let mut file = self.file.lock().map_err(|_| MasaError::bad_file(&self.path, "file handle poisoned"))?;
        crate::error::parser_guard(&self.path, &format!("GGUF tensor `{gguf_name}`"), || {
            let q = info
                .read(&mut *file, self.content.tensor_data_offset, &Device::Cpu)
                .map_err(|e| MasaError::bad_file(&self.path, format!("reading tensor `{gguf_name}`: {}", candle_message(&e))))?;
            Ok(q.dequantize(&Device::Cpu)?)
        })
    }
}

/// The GGML types masa dequantizes (everything candle implements on the CPU).
pub fn ggml_type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// A candle error's message without the backtrace candle appends when `RUST_BACKTRACE` is
/// set: the message is shown to users, the stack trace of candle's parser means nothing to them.
fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}

fn classify_read_error(path: &Path, e: candle_core::Error) -> MasaError {
    let msg = candle_message(&e);
    if msg.contains("unknown dtype") {
        MasaError::unsupported(
            path,
            "GGUF tensor type",
            format!("{msg}; masa reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q8_K (convert the model with llama.cpp to one of these)"),
        )
    } else {
        MasaError::bad_file(path, format!("corrupt or truncated GGUF header: {msg}"))
    }
}

/// Every tensor's bytes must lie inside the file: catches truncated downloads at open time.
/// Sizes are computed with overflow checks: dimensions whose product wraps around (a hostile
/// 8 × 2⁶¹ that "is" 32 elements) would otherwise pass and make the reader index out of bounds.
fn validate_extents(path: &Path, content: &Content, file_len: u64) -> Result<()> {
    for (name, ti) in &content.tensor_infos {
        let dims = ti.shape.dims();
        let Some(elems) = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n as u64 <= file_len.saturating_mul(8)) else {
            return Err(MasaError::bad_file(
                path,
                format!("tensor `{name}`: dimensions {dims:?} describe more elements than the file could hold; the file is corrupt"),
            ));
        };
        let block = ti.ggml_dtype.block_size();
        if elems % block != 0 {
            return Err(MasaError::bad_file(
                path,
                format!("tensor `{name}`: {elems} elements is not a multiple of the {} block size {block}", ggml_type_name(ti.ggml_dtype)),
            ));
        }
        // elems ≤ 8 × file_len, so this product and sum stay far below u64::MAX.
        let bytes = (elems / block * ti.ggml_dtype.type_size()) as u64;
        let end = content.tensor_data_offset.saturating_add(ti.offset).saturating_add(bytes);
        if end > file_len {
            return Err(MasaError::bad_file(
                path,
                format!(
                    "truncated: tensor `{name}` ends at byte {end} but the file has {file_len} bytes; \
                     the download is incomplete (delete the file and fetch it again)"
                ),
            ));
        }
    }
    Ok(())
}

/// Map a GGUF tensor name to its HF name, given the architecture (`gemma3` names its norms
/// differently). Returns `None` for tensors masa does not use (e.g. `rope_freqs`).
pub fn hf_name(arch: &str, gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = rest.rsplit_once('.')?;
    let gemma = arch == "gemma3";
    let hf = match base {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}
