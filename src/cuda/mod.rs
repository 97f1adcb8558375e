//! The GPU side of masa (`--features cuda`): a CUDA context, one stream, a cuBLAS handle and the
//! kernels of `kernels.cu`, compiled at run time by NVRTC for the card found. The CUDA driver,
//! cuBLAS and NVRTC libraries are loaded when a command first asks for `--device cuda`, so
//! building needs no CUDA toolkit and a machine without one gets a clear error, not a crash.
//!
//! Memory is plain device allocations ([`DevBuf`], freed on drop); kernels take raw device
//! pointers, as in llm.c. [`llama::GpuLlama`] is the student engine built on this.

pub mod llama;

// The device: the real one, or (`cuda-emu`, for tests without a GPU) host memory, the kernels on
// the CPU emulator of `emu.h` and the products on the CPU.
#[cfg(not(feature = "cuda-emu"))]
mod device;
#[cfg(feature = "cuda-emu")]
#[path = "emu.rs"]
mod device;
pub use device::Gpu;

/// The kernels' CUDA C++ source.
#[cfg(not(feature = "cuda-emu"))]
const SOURCE: &str = include_str!("kernels.cu");

/// Names of the kernels in [`SOURCE`], loaded once.
const KERNELS: &[&str] = &[
    "embed_fwd",
    "embed_bwd",
    "rmsnorm_fwd",
    "rmsnorm_bwd_dx",
    "rmsnorm_dw_partial",
    "colsum_acc",
    "qkv_split_rope",
    "qkv_merge_rope_bwd",
    "heads_rows",
    "softmax_causal",
    "softmax_causal_bwd",
    "swiglu_fwd",
    "swiglu_bwd",
    "ce_rows",
    "sumsq_partial",
    "sum_partials",
    "adamw",
    "qkv_split_rope16",
    "flash_fwd",
    "flash_bwd_prep",
    "flash_bwd_dq",
    "flash_bwd_dkdv",
    "f32_to_bf16",
    "add_f64",
    "topk_rows",
    "attn_decode",
];

#[cfg(not(feature = "cuda-emu"))]
fn cuda_err(what: &str, e: impl std::fmt::Debug) -> crate::error::MasaError {
    crate::error::MasaError::Invalid(format!("CUDA: {what}: {e:?}"))
}

impl Gpu {
    /// Allocate and copy `src` in.
    pub fn upload<T: Copy>(&self, src: &[T]) -> crate::error::Result<DevBuf<T>> {
        let b = self.alloc::<T>(src.len())?;
        self.write(&b, 0, src)?;
        Ok(b)
    }
}

/// A device allocation of `len` elements of `T`, freed on drop (by the device module).
pub struct DevBuf<T> {
    ptr: cudarc::driver::sys::CUdeviceptr,
    pub len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T> DevBuf<T> {
    /// Device address of element `i`.
    pub fn at(&self, i: usize) -> cudarc::driver::sys::CUdeviceptr {
        debug_assert!(i <= self.len);
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }
    pub fn ptr(&self) -> cudarc::driver::sys::CUdeviceptr {
        self.ptr
    }
}

/// Build the argument array of a kernel launch: `args!(a, b, c)` with each a local value.
#[macro_export]
macro_rules! cuda_args {
    ($($x:expr),* $(,)?) => {
        &mut [$(&$x as *const _ as *mut ::std::ffi::c_void),*]
    };
}
