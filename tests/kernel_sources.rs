//! Every CUDA kernel family compiles to a cubin for every GPU architecture lipstream supports.
//! NVRTC runs without a GPU, so this runs in CI (`scripts/setup.sh --test` installs NVRTC and the
//! CUDA headers from NVIDIA's PyPI wheels): a .cu change that does not compile fails here, not on
//! the GPU machine.

use lipstream_gpu::device::libraries;
use lipstream_gpu::kernels::{cubin, ARCHS, SOURCES};
use lipstream_gpu::GpuError;

/// Whether NVRTC is here; without it the tests say so and pass, unless CI asked for it.
fn nvrtc() -> bool {
    if libraries().nvrtc {
        return true;
    }
    assert!(
        std::env::var_os("LIPSTREAM_REQUIRE_NVRTC").is_none(),
        "LIPSTREAM_REQUIRE_NVRTC is set but libnvrtc.so is not on the loader path"
    );
    eprintln!("skipped: libnvrtc.so not found (set LD_LIBRARY_PATH and CUDA_INCLUDE)");
    false
}

#[test]
fn every_kernel_family_compiles_for_every_supported_architecture() {
    if !nvrtc() {
        return;
    }
    for arch in ARCHS {
        for (kernel, src) in SOURCES {
            let image =
                cubin(kernel, src, arch).unwrap_or_else(|e| panic!("{kernel} for {arch}: {e}"));
            assert!(image.starts_with(b"\x7fELF"), "{kernel} for {arch}");
            assert!(
                image.len() > 1024,
                "{kernel} for {arch}: {} bytes",
                image.len()
            );
        }
    }
}

#[test]
fn a_broken_source_or_a_virtual_architecture_is_a_clear_error() {
    if !nvrtc() {
        return;
    }
    let broken = "extern \"C\" __global__ void k(float* x) { x[0] = no_such_name; }";
    match cubin("broken", broken, "sm_90") {
        Err(GpuError::Compile { kernel, arch, log }) => {
            assert_eq!((kernel, arch.as_str()), ("broken", "sm_90"));
            assert!(log.contains("no_such_name"), "{log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
    let fine = "extern \"C\" __global__ void k(float* x) { x[0] = 1.0f; }";
    let err = cubin("virtual", fine, "compute_90")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a cubin"), "{err}");
}
