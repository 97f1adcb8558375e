//! The device of the `cuda-emu` build: the same interface as `device.rs`, with "device" memory
//! in host allocations, the kernels of `kernels.cu` run by the CPU emulator of `emu.h` (compiled
//! by `build.rs`), and the cuBLAS products computed here from their row-major definition. It
//! exists to test the CUDA engine's host code (buffer sizes, offsets, strides, the order of
//! launches) on machines without a GPU: `cargo test --features cuda-emu --test cuda_engine_emulated`.
//! It is slow (one OS thread runs every CUDA thread) and says nothing about speed, cuBLAS's
//! parameter conventions or the driver.
//!
//! New allocations are filled with NaN bytes, so a kernel or product that reads memory nothing
//! wrote shows up as NaN in the results instead of passing by luck on zeroed memory.

use std::alloc::Layout;
use std::ffi::{c_void, CString};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

use cudarc::driver::sys as ds;

use super::{DevBuf, KERNELS};
use crate::error::{MasaError, Result};

extern "C" {
    fn masa_emu_launch(name: *const std::ffi::c_char, gx: u32, gy: u32, gz: u32, block: u32, args: *mut *mut c_void) -> i32;
}

/// Bytes of emulated device memory allocated and not yet freed (all devices).
static IN_USE: AtomicUsize = AtomicUsize::new(0);
/// Kernel launches run one at a time (the emulator's scheduler is global).
static LAUNCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The emulated device.
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    /// bf16 products: operands rounded to bf16, f32 accumulation (else full f32 products).
    pub bf16: bool,
}

fn layout(bytes: usize) -> Layout {
    Layout::from_size_align(bytes.max(1), 64).expect("allocation size")
}

/// Round to bf16 (nearest, ties to even), as cuBLAS's bf16 paths see an operand.
fn bf16(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let u = x.to_bits();
    f32::from_bits((u + 0x7fff + ((u >> 16) & 1)) & 0xffff_0000)
}

impl Gpu {
    /// Open emulated device `ordinal` (there is one: cuda:0).
    pub fn open(ordinal: usize, bf16: bool) -> Result<Gpu> {
        if ordinal != 0 {
            return Err(MasaError::Invalid(format!("--device cuda:{ordinal}: the cuda-emu build emulates one device (cuda:0)")));
        }
        Ok(Gpu { ordinal, name: "CUDA emulator on the CPU (cuda-emu build)".into(), bf16 })
    }

    /// Allocate `len` elements (filled with NaN bytes: uninitialised on a real device).
    pub fn alloc<T>(&self, len: usize) -> Result<DevBuf<T>> {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        let p = unsafe { std::alloc::alloc(layout(bytes)) };
        if p.is_null() {
            return Err(MasaError::Invalid(format!("cuda-emu: allocating {bytes} bytes failed")));
        }
        unsafe { std::ptr::write_bytes(p, 0xff, bytes) };
        IN_USE.fetch_add(bytes, Ordering::Relaxed);
        Ok(DevBuf { ptr: p as ds::CUdeviceptr, len, _t: PhantomData })
    }

    /// Copy `src` into `dst` at element `at`.
    pub fn write<T: Copy>(&self, dst: &DevBuf<T>, at: usize, src: &[T]) -> Result<()> {
        assert!(at + src.len() <= dst.len, "write past the end of a device buffer");
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.at(at) as *mut T, src.len()) };
        Ok(())
    }

    /// Copy `len` elements from `src` at `at` to the host.
    pub fn read<T: Copy + Default>(&self, src: &DevBuf<T>, at: usize, len: usize) -> Result<Vec<T>> {
        assert!(at + len <= src.len, "read past the end of a device buffer");
        let mut out = vec![T::default(); len];
        unsafe { std::ptr::copy_nonoverlapping(src.at(at) as *const T, out.as_mut_ptr(), len) };
        Ok(out)
    }

    /// Zero `len` elements at `at`.
    pub fn zero<T>(&self, b: &DevBuf<T>, at: usize, len: usize) -> Result<()> {
        assert!(at + len <= b.len);
        unsafe { std::ptr::write_bytes(b.at(at) as *mut u8, 0, len * std::mem::size_of::<T>()) };
        Ok(())
    }

    /// Set every byte of `b` to `byte`.
    pub fn fill_bytes<T>(&self, b: &DevBuf<T>, byte: u8) -> Result<()> {
        unsafe { std::ptr::write_bytes(b.ptr() as *mut u8, byte, b.len * std::mem::size_of::<T>()) };
        Ok(())
    }

    /// Device-to-device copy of `len` elements.
    pub fn copy<T>(&self, dst: ds::CUdeviceptr, src: ds::CUdeviceptr, len: usize) -> Result<()> {
        unsafe { std::ptr::copy(src as *const T, dst as *mut T, len) };
        Ok(())
    }

    /// Every launch has finished when it returns: nothing to wait for.
    pub fn sync(&self) -> Result<()> {
        Ok(())
    }

    /// Run kernel `name` on the emulator (`args` as for the real launch).
    pub fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &mut [*mut c_void]) -> Result<()> {
        assert!(KERNELS.contains(&name), "kernel {name} is not in KERNELS");
        let c = CString::new(name).unwrap();
        let _one = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
        match unsafe { masa_emu_launch(c.as_ptr(), grid.0, grid.1, grid.2, block, args.as_mut_ptr()) } {
            0 => Ok(()),
            _ => Err(MasaError::Invalid(format!("cuda-emu: kernel {name} is not in src/cuda/emu.cpp"))),
        }
    }

    /// Row-major `C (m×n) = op(A) op(B) + β C`, `batch` times with element strides
    /// `(sa, sb, sc)`: the definition `device.rs` hands to cuBLAS, computed in f64 from f32
    /// operands (bf16-rounded ones with `bf16`). `ta`: A is stored `(k×m)`; `tb`: B is stored
    /// `(n×k)`. Leading dimensions are the stored row lengths.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: ds::CUdeviceptr,
        lda: usize,
        b: ds::CUdeviceptr,
        ldb: usize,
        c: ds::CUdeviceptr,
        ldc: usize,
        beta: f32,
        batch: Option<(usize, usize, usize, usize)>,
    ) -> Result<()> {
        let (count, sa, sb, sc) = batch.unwrap_or((1, 0, 0, 0));
        let round = |x: f32| if self.bf16 { bf16(x) } else { x };
        for z in 0..count {
            let (a, b, c) = (a as *const f32, b as *const f32, c as *mut f32);
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0f64;
                    for p in 0..k {
                        let x = unsafe { *a.add(z * sa + if ta { p * lda + i } else { i * lda + p }) };
                        let y = unsafe { *b.add(z * sb + if tb { j * ldb + p } else { p * ldb + j }) };
                        acc += round(x) as f64 * round(y) as f64;
                    }
                    let out = unsafe { &mut *c.add(z * sc + i * ldc + j) };
                    // β = 0 ignores C (NaN included), as cuBLAS does.
                    *out = if beta == 0.0 { acc as f32 } else { (acc + beta as f64 * *out as f64) as f32 };
                }
            }
        }
        Ok(())
    }

    /// Emulated memory in use (all devices), reported as used and total.
    pub fn memory(&self) -> (usize, usize) {
        let used = IN_USE.load(Ordering::Relaxed);
        (used, used)
    }
}

impl<T> Drop for DevBuf<T> {
    fn drop(&mut self) {
        let bytes = self.len.max(1) * std::mem::size_of::<T>();
        IN_USE.fetch_sub(bytes, Ordering::Relaxed);
        unsafe { std::alloc::dealloc(self.ptr as *mut u8, layout(bytes)) };
    }
}
