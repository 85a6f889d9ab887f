//! Finding the GPU and its libraries without ever letting cudarc panic on a missing one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};

use crate::error::GpuError;

/// Which CUDA libraries the loader can find.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Libraries {
    pub driver: bool,
    pub nvrtc: bool,
    pub cublas: bool,
    pub cublaslt: bool,
    pub cudnn: bool,
}

/// Looks for the libraries cudarc would load.
pub fn libraries() -> Libraries {
    // SAFETY: each call only tries to dlopen the library (and keeps it loaded); no symbol of it
    // is called. cudarc's own loader would panic where we return `false`.
    unsafe {
        Libraries {
            driver: cudarc::driver::sys::is_culib_present(),
            nvrtc: cudarc::nvrtc::sys::is_culib_present(),
            cublas: cudarc::cublas::sys::is_culib_present(),
            cublaslt: cudarc::cublaslt::sys::is_culib_present(),
            cudnn: cudarc::cudnn::sys::is_culib_present(),
        }
    }
}

/// One GPU, ready for kernels: its context, a stream and what it is.
#[derive(Clone)]
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    /// Compute capability, e.g. (9, 0) for an H100.
    pub sm: (i32, i32),
    pub memory_bytes: usize,
    /// Compiled kernel families by name (cubins for this SM): given by an engine file, or
    /// compiled on first use. Shared by the device's clones.
    images: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

/// A short description of what is there, for `lipstream doctor` and the server's start log.
#[derive(Clone, Debug)]
pub struct Report {
    pub libraries: Libraries,
    pub driver_version: Option<(i32, i32)>,
    pub gpus: Vec<String>,
    pub error: Option<String>,
}

impl Device {
    /// Opens GPU `ordinal`; a missing driver is an error, never a panic. (NVRTC is needed only
    /// to compile kernels an engine file does not bring.)
    pub fn open(ordinal: usize) -> Result<Self, GpuError> {
        if !libraries().driver {
            return Err(GpuError::LibraryMissing {
                name: "libcuda.so.1 (the NVIDIA driver)",
            });
        }
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: everything lipstream does on a device runs on this one stream, so cudarc's
        // per-buffer events (which would also break CUDA graph capture with
        // STREAM_CAPTURE_ISOLATION) guard nothing; turned off before any allocation.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream()?;
        Ok(Device {
            name: ctx.name()?,
            sm: ctx.compute_capability()?,
            memory_bytes: ctx.total_mem()?,
            ctx,
            stream,
            images: Arc::default(),
        })
    }

    /// The cubin of kernel family `kernel` for this GPU: the one given (engine file), else
    /// compiled from `src` now and kept.
    pub fn kernel_image(&self, kernel: &'static str, src: &str) -> Result<Vec<u8>, GpuError> {
        if let Some(image) = self.lock_images().get(kernel) {
            return Ok(image.clone());
        }
        let image = crate::kernels::cubin(kernel, src, &self.arch())?;
        self.lock_images().insert(kernel.to_string(), image.clone());
        Ok(image)
    }

    /// Kernel images to use instead of compiling (an engine file's, checked against the
    /// sources this build carries by the caller).
    pub fn use_kernel_images(&self, images: BTreeMap<String, Vec<u8>>) {
        self.lock_images().extend(images);
    }

    /// The kernel images this device has now (given or compiled so far): to share with another
    /// handle of the same GPU without compiling again.
    pub fn kernel_images(&self) -> BTreeMap<String, Vec<u8>> {
        self.lock_images().clone()
    }

    /// Every family's cubin for this GPU (compiling those not compiled yet): what an engine file
    /// stores.
    pub fn all_kernel_images(&self) -> Result<BTreeMap<String, Vec<u8>>, GpuError> {
        for (kernel, src) in crate::kernels::SOURCES {
            self.kernel_image(kernel, src)?;
        }
        Ok(self.lock_images().clone())
    }

    fn lock_images(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        // A panic while holding it leaves a valid map: keep using it.
        self.images.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// NVRTC's architecture name for this GPU, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.sm.0, self.sm.1)
    }
}

/// What this machine has, without failing.
pub fn report() -> Report {
    let libraries = libraries();
    if !libraries.driver {
        return Report {
            libraries,
            driver_version: None,
            gpus: vec![],
            error: Some("no NVIDIA driver".into()),
        };
    }
    let mut gpus = Vec::new();
    let mut error = None;
    let count = match CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        Err(e) => {
            error = Some(e.to_string());
            0
        }
    };
    for i in 0..count {
        match CudaContext::new(i) {
            Ok(ctx) => {
                let name = ctx.name().unwrap_or_else(|_| "?".into());
                let (ma, mi) = ctx.compute_capability().unwrap_or((0, 0));
                let gib = ctx
                    .total_mem()
                    .map(|b| b as f64 / (1u64 << 30) as f64)
                    .unwrap_or(0.0);
                gpus.push(format!("GPU {i}: {name}, sm_{ma}{mi}, {gib:.1} GiB"));
            }
            Err(e) => error = Some(format!("GPU {i}: {e}")),
        }
    }
    let mut v: std::ffi::c_int = 0;
    // SAFETY: the driver library is present (checked above); cuDriverGetVersion only writes the
    // int we pass, and needs no context.
    let ok = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        == cudarc::driver::sys::CUresult::CUDA_SUCCESS;
    let driver_version = ok.then_some((v / 1000, (v % 1000) / 10));
    Report {
        libraries,
        driver_version,
        gpus,
        error,
    }
}

/// Library versions an engine depends on (all present: checked by the caller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versions {
    /// CUDA driver API version, e.g. (13, 0).
    pub driver: (i32, i32),
    pub cudnn: usize,
    pub cublaslt: usize,
}

impl Device {
    /// The driver's and libraries' versions (needs cuDNN and cuBLASLt present).
    pub fn versions(&self) -> Result<Versions, GpuError> {
        let libs = libraries();
        if !libs.cudnn || !libs.cublaslt {
            return Err(GpuError::LibraryMissing {
                name: "libcudnn.so.9 / libcublasLt.so",
            });
        }
        let mut v: std::ffi::c_int = 0;
        // SAFETY: the driver is loaded (a context exists); the call only writes `v`.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }.result()?;
        Ok(Versions {
            driver: (v / 1000, (v % 1000) / 10),
            cudnn: cudarc::cudnn::result::get_version(),
            // SAFETY: cuBLASLt is present (checked); the call takes no arguments.
            cublaslt: unsafe { cudarc::cublaslt::sys::cublasLtGetVersion() },
        })
    }

    /// Bytes of device memory in use on this GPU (by every process).
    pub fn memory_used(&self) -> Result<usize, GpuError> {
        self.ctx.bind_to_thread()?;
        let (free, total) = cudarc::driver::result::mem_get_info()?;
        Ok(total - free)
    }
}

/// Which executor a model stage would run on here: `Ok("<GPU 0 description>")` for the CUDA
/// executor, or `Err(reason)` for the CPU reference executor. Never panics without CUDA.
/// `compile`: the kernels must be compiled here (a models folder, an engine build), which needs
/// NVRTC; an engine file brings them compiled.
pub fn executor_choice(compile: bool) -> Result<String, String> {
    let r = report();
    let l = &r.libraries;
    let missing: Vec<&str> = [
        (l.driver, "the NVIDIA driver (libcuda.so.1)"),
        (l.nvrtc || !compile, "NVRTC"),
        (l.cudnn, "cuDNN 9"),
        (l.cublaslt, "cuBLASLt"),
    ]
    .into_iter()
    .filter(|(found, _)| !found)
    .map(|(_, name)| name)
    .collect();
    if !missing.is_empty() {
        return Err(format!("not found: {}", missing.join(", ")));
    }
    r.gpus.first().cloned().ok_or_else(|| {
        r.error
            .clone()
            .unwrap_or_else(|| "the driver reports no GPU".into())
    })
}

/// Work on a device's stream timed by the device: `begin` and `end` record events behind what
/// is queued at the time, `wait` blocks until the end is reached and says how long the device
/// took from one to the other.
pub struct StreamTimer {
    begin: cudarc::driver::CudaEvent,
    end: cudarc::driver::CudaEvent,
}

impl StreamTimer {
    pub fn new(device: &Device) -> Result<Self, GpuError> {
        // Blocking sync: `wait` sleeps instead of spinning a core.
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC);
        Ok(StreamTimer {
            begin: device.ctx.new_event(flags)?,
            end: device.ctx.new_event(flags)?,
        })
    }

    pub fn begin(&self, device: &Device) -> Result<(), GpuError> {
        Ok(self.begin.record(&device.stream)?)
    }

    pub fn end(&self, device: &Device) -> Result<(), GpuError> {
        Ok(self.end.record(&device.stream)?)
    }

    /// Whether the device has reached `end` already.
    pub fn ended(&self) -> Result<bool, GpuError> {
        Ok(self.end.try_is_complete()?)
    }

    /// Milliseconds from `begin` to `end`, once the device has reached `end`.
    pub fn wait(&self) -> Result<f32, GpuError> {
        self.end.synchronize()?;
        Ok(self.begin.elapsed_ms(&self.end)?)
    }
}
