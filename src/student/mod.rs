//! The student wing: configs and presets ([`config`]), HF checkpoint directories
//! ([`checkpoint`]), the trainable Llama model ([`llama`]) with its fused CPU kernels
//! ([`kernels`]), and AdamW with the learning-rate schedule ([`optim`]).

pub mod checkpoint;
pub mod config;
pub mod kernels;
pub mod llama;
pub mod optim;

pub use checkpoint::{load_params, plain_llama, save_checkpoint, save_student, student_config_of, student_tensors};
pub use config::{StudentConfig, PRESETS};
