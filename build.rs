//! The `cuda-emu` feature (tests of the CUDA engine's host code without a GPU) compiles the
//! kernels with the system C++ compiler under the CPU emulator `src/cuda/emu.h`. Other builds
//! compile nothing here.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda-emu")]
    {
        for f in ["src/cuda/emu.cpp", "src/cuda/emu.h", "src/cuda/kernels.cu"] {
            println!("cargo:rerun-if-changed={f}");
        }
        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .flag("-fno-strict-aliasing")
            .define("MASA_EMU", None)
            .include("src/cuda")
            .file("src/cuda/emu.cpp")
            .warnings(false)
            .compile("masa_cuda_emu");
    }
}
