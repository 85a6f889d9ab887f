//! Writes the kernel families' cubins for one architecture, compiled by NVRTC exactly as an
//! engine build compiles them, so their registers, shared memory and SASS can be read without a
//! GPU (`scripts/kernel_sass.sh` runs this, then cuobjdump).
//!
//!   cargo run --release -p lipstream-gpu --example cubins -- sm_90 OUT_DIR [FAMILY...]

use std::path::PathBuf;

use anyhow::{bail, Context};
use lipstream_gpu::device::libraries;
use lipstream_gpu::kernels::{cubin, ARCHS, SOURCES};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [arch, out, families @ ..] = args.as_slice() else {
        bail!("usage: cubins ARCH OUT_DIR [FAMILY...] (ARCH one of {ARCHS:?})");
    };
    if !ARCHS.contains(&arch.as_str()) {
        bail!("{arch} is not an architecture lipstream builds for ({ARCHS:?})");
    }
    if !libraries().nvrtc {
        bail!("libnvrtc.so is not on the loader path (scripts/setup.sh --test fetches it into .cache/cuda)");
    }
    for family in families {
        if !SOURCES.iter().any(|(f, _)| f == family) {
            let known: Vec<_> = SOURCES.iter().map(|(f, _)| *f).collect();
            bail!("no kernel family {family} (families: {known:?})");
        }
    }
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for (family, src) in SOURCES {
        if !families.is_empty() && !families.iter().any(|f| f == family) {
            continue;
        }
        let image = cubin(family, src, arch)?;
        let path = out.join(format!("{family}.cubin"));
        std::fs::write(&path, &image).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}
