//! The CUDA device: context, stream, cuBLAS handle and the kernels compiled by NVRTC.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::cublas::sys as cbs;
use cudarc::driver::{result as dr, sys as ds, CudaContext};

use super::{cuda_err, DevBuf, KERNELS, SOURCE};
use crate::error::{MasaError, Result};

/// A device, its context, a stream, cuBLAS and the compiled kernels.
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    /// bf16 tensor-core products (else full f32 products).
    pub bf16: bool,
    _ctx: Arc<CudaContext>,
    stream: ds::CUstream,
    blas: cbs::cublasHandle_t,
    module: ds::CUmodule,
    funcs: HashMap<&'static str, ds::CUfunction>,
    /// `MASA_CUDA_PROFILE=1`: seconds and calls per kernel / product shape, each launch timed
    /// between two synchronisations (slower; for finding where a step's time goes). Printed
    /// when the device is closed.
    profile: Option<std::cell::RefCell<std::collections::BTreeMap<String, (f64, u64)>>>,
    /// bf16 products of at least this many multiply-adds take bf16 copies of their operands to
    /// cuBLAS's bf16 kernels; smaller ones pass f32 operands with `COMPUTE_32F_FAST_16BF`. On an
    /// H200 the copies made the paper-size step 10% faster (cuBLAS chose ~5x slower kernels for
    /// some f32-operand shapes) and the 6-layer-256 step 15% slower (the copies cost more than
    /// its small products); docs/gpu.md. `MASA_BF16_GEMM=fast|convert` forces one way.
    convert_min: usize,
    scratch16: [std::cell::RefCell<Option<DevBuf<u16>>>; 2],
}

impl Gpu {
    /// Open device `ordinal`: load the libraries, create the context, compile the kernels.
    pub fn open(ordinal: usize, bf16: bool) -> Result<Gpu> {
        // Loading a missing library would panic inside cudarc: check first.
        let missing: Vec<&str> = [
            ("libcuda (the NVIDIA driver)", unsafe { ds::is_culib_present() }),
            ("libcublas", unsafe { cbs::is_culib_present() }),
            ("libnvrtc", unsafe { cudarc::nvrtc::sys::is_culib_present() }),
        ]
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| n)
        .collect();
        if !missing.is_empty() {
            return Err(MasaError::Invalid(format!(
                "--device cuda: cannot load {}; install the NVIDIA driver and the CUDA 12/13 runtime libraries \
                 (cuBLAS, NVRTC) and put their directory on LD_LIBRARY_PATH, or use --device cpu",
                missing.join(", ")
            )));
        }
        dr::init().map_err(|e| cuda_err("cuInit", e))?;
        let count = dr::device::get_count().map_err(|e| cuda_err("device count", e))? as usize;
        if ordinal >= count {
            return Err(MasaError::Invalid(format!(
                "--device cuda:{ordinal}: this machine has {count} CUDA device(s) (cuda:0 … cuda:{})",
                count.saturating_sub(1)
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("context", e))?;
        ctx.bind_to_thread().map_err(|e| cuda_err("bind context", e))?;
        let name = ctx.name().unwrap_or_else(|_| "?".into());
        let (major, minor) = ctx.compute_capability().map_err(|e| cuda_err("compute capability", e))?;
        let stream = dr::stream::create(dr::stream::StreamKind::NonBlocking).map_err(|e| cuda_err("stream", e))?;
        let blas = cudarc::cublas::result::create_handle().map_err(|e| cuda_err("cuBLAS handle", e))?;
        unsafe { cudarc::cublas::result::set_stream(blas, stream as _) }.map_err(|e| cuda_err("cuBLAS stream", e))?;
        // Full f32 products unless bf16 is asked for (no TF32 behind the user's back).
        let math = cbs::cublasMath_t::CUBLAS_PEDANTIC_MATH;
        let math = if bf16 { cbs::cublasMath_t::CUBLAS_DEFAULT_MATH } else { math };
        unsafe { cbs::cublasSetMathMode(blas, math) }.result().map_err(|e| cuda_err("cuBLAS math mode", e))?;
        let image = ptx_for(major, minor)?;
        let module = unsafe { dr::module::load_data(image.as_ptr() as *const c_void) }.map_err(|e| cuda_err("loading the kernels", e))?;
        let mut funcs = HashMap::new();
        for &k in KERNELS {
            let f = unsafe { dr::module::get_function(module, CString::new(k).unwrap()) }.map_err(|e| cuda_err(k, e))?;
            funcs.insert(k, f);
        }
        let profile = std::env::var("MASA_CUDA_PROFILE").is_ok_and(|v| v == "1").then(Default::default);
        let convert_min = match std::env::var("MASA_BF16_GEMM").as_deref() {
            Ok("fast") => usize::MAX,
            Ok("convert") => 0,
            _ => 1 << 32,
        };
        Ok(Gpu { ordinal, name, bf16, _ctx: ctx, stream, blas, module, funcs, profile, convert_min, scratch16: Default::default() })
    }

    /// Allocate `len` elements (uninitialised).
    pub fn alloc<T>(&self, len: usize) -> Result<DevBuf<T>> {
        let bytes = (len.max(1)) * std::mem::size_of::<T>();
        let ptr = unsafe { dr::malloc_sync(bytes) }.map_err(|e| {
            let (free, total) = dr::mem_get_info().unwrap_or((0, 0));
            cuda_err(
                &format!(
                    "allocating {:.2} GiB ({:.1} of {:.1} GiB free)",
                    bytes as f64 / 1073741824.0,
                    free as f64 / 1073741824.0,
                    total as f64 / 1073741824.0
                ),
                e,
            )
        })?;
        Ok(DevBuf { ptr, len, _t: PhantomData })
    }

    /// Copy `src` into `dst` at element `at` (ordered on the stream; returns when copied).
    pub fn write<T: Copy>(&self, dst: &DevBuf<T>, at: usize, src: &[T]) -> Result<()> {
        assert!(at + src.len() <= dst.len, "write past the end of a device buffer");
        if src.is_empty() {
            return Ok(());
        }
        unsafe {
            dr::memcpy_htod_async(dst.at(at), src, self.stream).map_err(|e| cuda_err("copy to device", e))?;
            dr::stream::synchronize(self.stream).map_err(|e| cuda_err("copy to device", e))
        }
    }

    /// Copy `len` elements from `src` at `at` to the host (waits for the stream).
    pub fn read<T: Copy + Default>(&self, src: &DevBuf<T>, at: usize, len: usize) -> Result<Vec<T>> {
        assert!(at + len <= src.len, "read past the end of a device buffer");
        let mut out = vec![T::default(); len];
        if len > 0 {
            unsafe {
                dr::memcpy_dtoh_async(&mut out, src.at(at), self.stream).map_err(|e| cuda_err("copy to host", e))?;
            }
        }
        self.sync()?;
        Ok(out)
    }

    /// Zero `len` elements at `at`.
    pub fn zero<T>(&self, b: &DevBuf<T>, at: usize, len: usize) -> Result<()> {
        assert!(at + len <= b.len);
        unsafe { dr::memset_d8_async(b.at(at), 0, len * std::mem::size_of::<T>(), self.stream) }.map_err(|e| cuda_err("memset", e))
    }

    /// Set every byte of `b` to `byte`.
    pub fn fill_bytes<T>(&self, b: &DevBuf<T>, byte: u8) -> Result<()> {
        unsafe { dr::memset_d8_async(b.ptr(), byte, b.len * std::mem::size_of::<T>(), self.stream) }.map_err(|e| cuda_err("memset", e))
    }

    /// Device-to-device copy of `len` elements.
    pub fn copy<T>(&self, dst: ds::CUdeviceptr, src: ds::CUdeviceptr, len: usize) -> Result<()> {
        unsafe { dr::memcpy_dtod_async(dst, src, len * std::mem::size_of::<T>(), self.stream) }.map_err(|e| cuda_err("device copy", e))
    }

    /// Wait for all queued work; reports any asynchronous kernel error.
    pub fn sync(&self) -> Result<()> {
        unsafe { dr::stream::synchronize(self.stream) }.map_err(|e| cuda_err("kernel", e))
    }

    /// Launch kernel `name` on `grid` blocks of `block` threads with `args` (pointers to each
    /// argument's value, in the kernel's parameter order).
    pub fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &mut [*mut c_void]) -> Result<()> {
        let f = *self.funcs.get(name).unwrap_or_else(|| panic!("kernel {name} is not in KERNELS"));
        self.timed(
            || name.to_string(),
            || unsafe { dr::launch_kernel(f, grid, (block, 1, 1), 0, self.stream, args) }.map_err(|e| cuda_err(name, e)),
        )
    }

    /// Run `f`; when profiling, synchronised before and after and its time added to `key()`.
    fn timed(&self, key: impl FnOnce() -> String, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let Some(p) = &self.profile else { return f() };
        self.sync()?;
        let t0 = std::time::Instant::now();
        f()?;
        self.sync()?;
        let mut p = p.borrow_mut();
        let e = p.entry(key()).or_insert((0.0, 0));
        e.0 += t0.elapsed().as_secs_f64();
        e.1 += 1;
        Ok(())
    }

    /// Row-major `C (m×n) = α op(A) op(B) + β C`, `batch` times with element strides
    /// `(sa, sb, sc)` between the matrices. `ta`: A is stored `(k×m)` (use Aᵀ); `tb`: B is
    /// stored `(n×k)` (use Bᵀ). Leading dimensions are the stored row lengths.
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
        use cbs::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ' op(A)ᵀ': swap the operands.
        let opb = if tb { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let opa = if ta { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let alpha = 1f32;
        let (ap, bp) = (&alpha as *const f32 as *const c_void, &beta as *const f32 as *const c_void);
        let key = || match batch {
            None => format!("gemm {m}x{n}x{k}{}{}", if ta { " ta" } else { "" }, if tb { " tb" } else { "" }),
            Some((count, ..)) => format!("gemm {count}x({m}x{n}x{k}){}{}", if ta { " ta" } else { "" }, if tb { " tb" } else { "" }),
        };
        if batch.is_none() && self.bf16 && m * n * k >= self.convert_min {
            // Stored shapes: A is (k×m) when transposed, else (m×k); B (n×k) or (k×n).
            let a16 = self.to_bf16(0, a, if ta { k } else { m }, lda, if ta { m } else { k })?;
            let b16 = self.to_bf16(1, b, if tb { n } else { k }, ldb, if tb { k } else { n })?;
            let (bf, f32t) = (cbs::cudaDataType_t::CUDA_R_16BF, cbs::cudaDataType_t::CUDA_R_32F);
            let (ct, algo) = (cbs::cublasComputeType_t::CUBLAS_COMPUTE_32F, cbs::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT);
            return self.timed(key, || {
                unsafe {
                    cudarc::cublas::result::gemm_ex(
                        self.blas,
                        opb,
                        opa,
                        n as i32,
                        m as i32,
                        k as i32,
                        ap,
                        b16 as *const c_void,
                        bf,
                        ldb as i32,
                        a16 as *const c_void,
                        bf,
                        lda as i32,
                        bp,
                        c as *mut c_void,
                        f32t,
                        ldc as i32,
                        ct,
                        algo,
                    )
                }
                .map_err(|e| cuda_err(&format!("cuBLAS bf16 gemm {m}x{n}x{k}"), e))
            });
        }
        self.timed(key, || self.gemm_raw(opa, opb, m, n, k, a, lda, b, ldb, c, ldc, ap, bp, batch))
    }

    /// A bf16 copy of a row-major f32 matrix (`rows` rows of stride `ld`, `cols` used) in
    /// scratch buffer `slot`; returns its address (same strides).
    fn to_bf16(&self, slot: usize, src: ds::CUdeviceptr, rows: usize, ld: usize, cols: usize) -> Result<ds::CUdeviceptr> {
        let len = (rows.max(1) - 1) * ld + cols;
        let mut s = self.scratch16[slot].borrow_mut();
        if s.as_ref().is_none_or(|b| b.len < len) {
            *s = None;
            self.sync()?;
            *s = Some(self.alloc::<u16>(len)?);
        }
        let dst = s.as_ref().unwrap().ptr();
        let n = len as u64;
        self.launch("f32_to_bf16", ((len.div_ceil(256)) as u32, 1, 1), 256, crate::cuda_args!(src, dst, n))?;
        Ok(dst)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_raw(
        &self,
        opa: cbs::cublasOperation_t,
        opb: cbs::cublasOperation_t,
        m: usize,
        n: usize,
        k: usize,
        a: ds::CUdeviceptr,
        lda: usize,
        b: ds::CUdeviceptr,
        ldb: usize,
        c: ds::CUdeviceptr,
        ldc: usize,
        ap: *const c_void,
        bp: *const c_void,
        batch: Option<(usize, usize, usize, usize)>,
    ) -> Result<()> {
        let ct = if self.bf16 {
            cbs::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF
        } else {
            cbs::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC
        };
        let f32t = cbs::cudaDataType_t::CUDA_R_32F;
        let algo = cbs::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT;
        let r = unsafe {
            match batch {
                None => cudarc::cublas::result::gemm_ex(
                    self.blas,
                    opb,
                    opa,
                    n as i32,
                    m as i32,
                    k as i32,
                    ap,
                    b as *const c_void,
                    f32t,
                    ldb as i32,
                    a as *const c_void,
                    f32t,
                    lda as i32,
                    bp,
                    c as *mut c_void,
                    f32t,
                    ldc as i32,
                    ct,
                    algo,
                ),
                Some((count, sa, sb, sc)) => cudarc::cublas::result::gemm_strided_batched_ex(
                    self.blas,
                    opb,
                    opa,
                    n as i32,
                    m as i32,
                    k as i32,
                    ap,
                    b as *const c_void,
                    f32t,
                    ldb as i32,
                    sb as i64,
                    a as *const c_void,
                    f32t,
                    lda as i32,
                    sa as i64,
                    bp,
                    c as *mut c_void,
                    f32t,
                    ldc as i32,
                    sc as i64,
                    count as i32,
                    ct,
                    algo,
                ),
            }
        };
        r.map_err(|e| cuda_err(&format!("cuBLAS gemm {m}x{n}x{k}"), e))
    }

    /// The profile (`MASA_CUDA_PROFILE=1`) as a table, slowest first.
    pub fn profile_table(&self) -> Option<String> {
        let p = self.profile.as_ref()?.borrow();
        let total: f64 = p.values().map(|v| v.0).sum();
        let mut rows: Vec<_> = p.iter().collect();
        rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        let mut out = format!("{:>9} {:>6} {:>8}  what (synchronised per launch; total {:.1} ms)\n", "ms", "%", "calls", total * 1e3);
        for (k, (s, n)) in rows {
            out.push_str(&format!("{:>9.2} {:>5.1}% {:>8}  {k}\n", s * 1e3, 100.0 * s / total.max(1e-12), n));
        }
        Some(out)
    }

    /// Device memory in use and total, in bytes.
    pub fn memory(&self) -> (usize, usize) {
        dr::mem_get_info().map(|(free, total)| (total - free, total)).unwrap_or((0, 0))
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        if let Some(t) = self.profile_table() {
            eprintln!("CUDA profile of {}:\n{t}", self.name);
        }
        // Free the scratch copies while the context is alive.
        for s in &self.scratch16 {
            s.borrow_mut().take();
        }
        unsafe {
            let _ = dr::stream::synchronize(self.stream);
            let _ = cudarc::cublas::result::destroy_handle(self.blas);
            let _ = dr::module::unload(self.module);
            let _ = dr::stream::destroy(self.stream);
        }
    }
}

/// The kernels compiled by NVRTC for compute capability `major.minor`, once per process (a
/// run opens the device for calibration, the teacher, training and evaluation; each compile
/// takes about a second).
fn ptx_for(major: i32, minor: i32) -> Result<CString> {
    static PTX: std::sync::Mutex<Vec<((i32, i32), CString)>> = std::sync::Mutex::new(Vec::new());
    let mut cache = PTX.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = cache.iter().find(|(cc, _)| *cc == (major, minor)) {
        return Ok(p.clone());
    }
    let arch = format!("--gpu-architecture=sm_{major}{minor}");
    let opts = cudarc::nvrtc::CompileOptions { options: vec![arch, "--std=c++17".into()], ..Default::default() };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
        .map_err(|e| MasaError::Invalid(format!("compiling src/cuda/kernels.cu with NVRTC: {e}")))?;
    let image = CString::new(ptx.to_src()).map_err(|e| cuda_err("PTX", e))?;
    cache.push(((major, minor), image.clone()));
    Ok(image)
}

impl<T> Drop for DevBuf<T> {
    fn drop(&mut self) {
        unsafe {
            let _ = dr::free_sync(self.ptr);
        }
    }
}
