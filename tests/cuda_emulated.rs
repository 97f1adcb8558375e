//! The CUDA kernels (`src/cuda/kernels.cu`) checked on the CPU: `tests/cuda_emu/check.cpp` runs
//! every kernel under the small CUDA emulator of `src/cuda/emu.h` (blocks of cooperative
//! threads, `__syncthreads`, warp shuffles, and the bf16 conversions and `mma.sync` of the flash
//! kernels from the PTX ISA's description), with the block sizes `src/cuda/llama.rs` launches,
//! against f64 references, finite differences and adjoint identities. It needs no GPU and no
//! CUDA toolkit, only the C++ compiler the build already uses (tokenizers compiles C++), so a
//! session without a device still catches indexing, tie-breaking, barrier and fragment-layout
//! mistakes; speed and the driver are `masa bench cuda-check`'s on a device (docs/gpu.md).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[cfg(target_os = "linux")]
#[test]
fn cuda_kernels_match_their_references_under_the_emulator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("check");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-fno-strict-aliasing", "-DMASA_EMU", "-I"])
        .arg(root.join("src/cuda"))
        .arg(root.join("tests/cuda_emu/check.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running the C++ compiler `{cxx}` (install one, or set CXX): {e}"));
    assert!(built.status.success(), "compiling tests/cuda_emu/check.cpp with {cxx}:\n{}", String::from_utf8_lossy(&built.stderr));

    let mut child = Command::new(&exe).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(300) {
            child.kill().unwrap();
            panic!("the emulated kernels still ran after 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && table.contains("ok: 0 check(s) failed"), "a kernel differs from its reference (table above)");
    // Every kernel the engine launches is in the table.
    let src = std::fs::read_to_string(root.join("src/cuda/kernels.cu")).unwrap();
    for name in src.split("extern \"C\" __global__ void ").skip(1).map(|s| s.split('(').next().unwrap()) {
        // A check's label names its kernels before the colon: `a + b: what`.
        let names = |l: &str| l.split(':').next().unwrap_or("").split(&[' ', '+'][..]).any(|w| w == name);
        assert!(table.lines().any(names), "kernel {name} has no check in tests/cuda_emu/check.cpp");
    }
}
