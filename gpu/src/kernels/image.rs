//! The face path's pixel kernels (see engines::image, their CPU reference), for a batch of
//! frames of any sizes: each frame's face box cropped from its packed region to the model's RGB
//! inputs (camera mode), and the model's face blended back into the region (both modes).
//!
//! Only a frame's region (`engines::image::Region`: the box with a few pixels to spare) crosses
//! PCIe, packed back to back with the batch's other regions in one page-locked buffer: one
//! upload before the model, one download after the blend, the same bytes both ways.

use cudarc::driver::{
    CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice,
};
use std::sync::Arc;

use cudarc::driver::sys;
use lipstream_engines::image::{FaceBox, LowerFace, Region};

use super::{launch, shape_err, Arg, Ptr, THREADS};
use crate::device::Device;
use crate::error::GpuError;

pub(crate) const SRC: &str = concat!(
    include_str!("../../kernels/pdl.cuh"),
    include_str!("../../kernels/image.cu")
);

/// Words of one frame's `FaceJob` (image.cu).
const JOB_WORDS: usize = 18;

/// One frame of a batch: its packed region (`Region::copy_out`), the face box, the mask and how
/// strongly the face replaces the frame under it (0..1, `engines::image::blend_with`).
#[derive(Clone, Copy, Debug)]
pub struct FaceFrame<'a> {
    pub region: Region,
    pub pixels: &'a [u8],
    pub face: FaceBox,
    pub mask: LowerFace,
    pub strength: f32,
}

/// A frame's `FaceJob` (image.cu): seven ints, then eleven floats.
fn job_words(at: usize, f: &FaceFrame) -> [u32; JOB_WORDS] {
    let (r, b, m) = (&f.region, &f.face, &f.mask);
    let ints = [
        at,
        r.frame_width,
        r.frame_height,
        r.x,
        r.y,
        r.width,
        r.height,
    ];
    let floats = [
        b.x0,
        b.y0,
        b.x1,
        b.y1,
        m.top,
        m.top_feather,
        m.left,
        m.right,
        m.side_feather,
        m.bottom_feather,
        f.strength.clamp(0.0, 1.0),
    ];
    let mut words = [0u32; JOB_WORDS];
    for (w, v) in words.iter_mut().zip(
        ints.iter()
            .map(|&v| v as u32)
            .chain(floats.iter().map(|v| v.to_bits())),
    ) {
        *w = v;
    }
    words
}

/// The compiled kernels.
pub struct Image {
    crop: CudaFunction,
    blend: CudaFunction,
}

impl Image {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let m = super::compile(device, "image", SRC)?;
        Ok(Image {
            crop: m.load_function("crop_faces_f16")?,
            blend: m.load_function("blend_faces_f16")?,
        })
    }
}

/// A batch's packed regions and frame descriptions, on the host (page-locked) and the device.
/// Grows to the largest batch seen; a batch uses it from `upload` until `region` has read its
/// results back.
pub struct Faces {
    host: Option<PinnedHostSlice<u8>>,
    device: Option<CudaSlice<u8>>,
    /// Bytes of each; the current batch's descriptions start at `jobs_at`, after its regions.
    capacity: usize,
    jobs_at: usize,
    /// (offset, length, region) of each frame of the current batch.
    frames: Vec<(usize, usize, Region)>,
    /// The largest plane rectangle of the batch, in pixels (the blend's grid).
    widest: usize,
    /// Recorded behind the current batch's download.
    downloaded: CudaEvent,
}

/// The descriptions' place in the buffer: 16-byte aligned after the regions.
fn jobs_offset(region_bytes: usize) -> usize {
    region_bytes.next_multiple_of(16)
}

/// Why a frame cannot go to the kernels, if it cannot: its region must hold every pixel its
/// box's crop and blend touch (`Region::around`), with an even origin, and its pixels be the
/// region's size.
fn refused(f: &FaceFrame) -> Option<String> {
    let r = &f.region;
    let holds = Region::around(&f.face, r.frame_width, r.frame_height).is_some_and(|need| {
        r.x <= need.x
            && r.y <= need.y
            && r.x + r.width >= need.x + need.width
            && r.y + r.height >= need.y + need.height
    });
    let sane = f.face.x1 > f.face.x0
        && f.face.y1 > f.face.y0
        && r.x.is_multiple_of(2)
        && r.y.is_multiple_of(2);
    let ok = holds && sane && f.pixels.len() == r.bytes() && f.strength.is_finite();
    (!ok).then(|| {
        format!(
            "box {:?} with region {r:?}, {} bytes and strength {}",
            f.face,
            f.pixels.len(),
            f.strength
        )
    })
}

impl Faces {
    pub fn new(device: &Device) -> Result<Self, GpuError> {
        Ok(Faces {
            host: None,
            device: None,
            capacity: 0,
            jobs_at: 0,
            frames: Vec::new(),
            widest: 0,
            downloaded: device
                .ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))?,
        })
    }

    /// Packs `frames`' regions and descriptions and queues their upload on `stream`: the
    /// batch the next `crop` and `blend` work on. Waits for this buffer's previous batch to
    /// have come back first; a frame that cannot go (see `refused`) fails the batch before
    /// anything is queued.
    pub fn upload(
        &mut self,
        stream: &Arc<CudaStream>,
        frames: &[FaceFrame],
    ) -> Result<(), GpuError> {
        self.downloaded.synchronize()?;
        self.frames.clear();
        if frames.is_empty() {
            return Err(shape_err("faces", "an empty batch".into()));
        }
        let mut at = 0usize;
        let mut widest = 0;
        let mut placed = Vec::with_capacity(frames.len());
        for (i, f) in frames.iter().enumerate() {
            if let Some(why) = refused(f) {
                return Err(shape_err("faces", format!("frame {i}: {why}")));
            }
            let r = f.region;
            placed.push((at, r.bytes(), r));
            let (_, _, cw, ch) = r.chroma();
            widest = (r.width * r.height).max(cw * ch).max(widest);
            at += r.bytes();
        }
        let jobs_at = jobs_offset(at);
        let need = jobs_at + 4 * JOB_WORDS * frames.len();
        if i32::try_from(need).is_err() {
            return Err(shape_err("faces", format!("{need} bytes in one batch")));
        }
        if need > self.capacity {
            // The old buffers' last batch is done (waited for above).
            let capacity = need.next_power_of_two();
            self.host = None;
            self.device = None;
            self.capacity = 0;
            // SAFETY: plain bytes, every one written below before an upload reads it; cached
            // (flags 0): the CPU also reads the blended regions back.
            self.host =
                Some(unsafe { stream.context().alloc_pinned_with_flags::<u8>(capacity, 0) }?);
            self.device = Some(stream.alloc_zeros::<u8>(capacity)?);
            self.capacity = capacity;
        }
        let (Some(host), Some(dev)) = (self.host.as_mut(), self.device.as_mut()) else {
            return Err(GpuError::Capture("no face buffers".into()));
        };
        let buf = host.as_mut_slice()?;
        for (i, (f, &(at, len, _))) in frames.iter().zip(&placed).enumerate() {
            buf[at..at + len].copy_from_slice(f.pixels);
            let base = jobs_at + 4 * JOB_WORDS * i;
            for (k, w) in job_words(at, f).iter().enumerate() {
                buf[base + 4 * k..base + 4 * k + 4].copy_from_slice(&w.to_ne_bytes());
            }
        }
        // The copy runs from page-locked memory, asynchronously; nothing writes `buf` until
        // `downloaded` says this batch is back.
        stream.memcpy_htod(&buf[..need], &mut dev.slice_mut(..need))?;
        self.frames = placed;
        self.jobs_at = jobs_at;
        self.widest = widest;
        Ok(())
    }

    /// The device buffer's address, for a batch that was uploaded.
    fn base(&self, stream: &CudaStream, kernel: &'static str) -> Result<Ptr, GpuError> {
        match &self.device {
            Some(dev) if !self.frames.is_empty() => Ok(dev.device_ptr(stream).0),
            _ => Err(shape_err(kernel, "no batch was uploaded".into())),
        }
    }

    /// Crops each uploaded frame's face box to `reference` (and `masked`, its lower half
    /// black; 0 for none) at `[len(), 3, size, size]` fp16.
    ///
    /// # Safety
    /// `reference` (and `masked` unless 0) must hold `len() * 3 * size * size` fp16 values on
    /// `stream`'s device; `upload` ran on `stream`.
    pub unsafe fn crop(
        &mut self,
        image: &Image,
        stream: &Arc<CudaStream>,
        size: usize,
        reference: Ptr,
        masked: Ptr,
    ) -> Result<(), GpuError> {
        let base = self.base(stream, "crop_faces_f16")?;
        if size == 0 {
            return Err(shape_err("crop_faces_f16", "a crop of 0 pixels".into()));
        }
        let cfg = LaunchConfig {
            grid_dim: (
                (size * size).div_ceil(THREADS as usize) as u32,
                self.frames.len() as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            Arg::P(base),
            Arg::P(base + self.jobs_at as u64),
            Arg::I(size as i32),
            Arg::P(reference),
            Arg::P(masked),
        ];
        // SAFETY: matches crop_faces_f16 (u8*, const FaceJob*, int, half*, half*); every
        // description's region lies in the uploaded bytes and holds its box's taps (checked by
        // `upload`); the outputs hold the batch (the caller's promise).
        unsafe { launch(stream, &image.crop, cfg, &args) }
    }

    /// Blends `faces` ([len(), 3, size, size] fp16 RGB in [0, 1]) into the uploaded regions
    /// and queues the regions' download (`region` reads them).
    ///
    /// # Safety
    /// `faces` must hold the batch's faces at `size` on `stream`'s device; `upload` ran on
    /// `stream`.
    pub unsafe fn blend(
        &mut self,
        image: &Image,
        stream: &Arc<CudaStream>,
        faces: Ptr,
        size: usize,
    ) -> Result<(), GpuError> {
        let base = self.base(stream, "blend_faces_f16")?;
        if size == 0 {
            return Err(shape_err("blend_faces_f16", "faces of 0 pixels".into()));
        }
        let cfg = LaunchConfig {
            grid_dim: (
                self.widest.div_ceil(THREADS as usize).max(1) as u32,
                self.frames.len() as u32,
                2,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            Arg::P(base),
            Arg::P(base + self.jobs_at as u64),
            Arg::P(faces),
            Arg::I(size as i32),
        ];
        // SAFETY: matches blend_faces_f16 (u8*, const FaceJob*, const half*, int); the
        // descriptions and regions are the ones `upload` queued; threads past a rectangle
        // return.
        unsafe { launch(stream, &image.blend, cfg, &args) }?;
        let regions = self.jobs_at;
        let (Some(host), Some(dev)) = (self.host.as_mut(), self.device.as_ref()) else {
            return Err(GpuError::Capture("no face buffers".into()));
        };
        let buf = host.as_mut_slice()?;
        stream.memcpy_dtoh(&dev.slice(..regions), &mut buf[..regions])?;
        self.downloaded.record(stream)?;
        Ok(())
    }

    /// Frames in the current batch.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frame `i`'s blended region (packed like `Region::copy_out`), once the download is done.
    pub fn region(&self, i: usize) -> Result<(Region, &[u8]), GpuError> {
        self.downloaded.synchronize()?;
        let &(at, len, r) = self.frames.get(i).ok_or_else(|| GpuError::Binding {
            name: format!("face {i}"),
            reason: format!("the batch has {} frames", self.frames.len()),
        })?;
        let host = self
            .host
            .as_ref()
            .ok_or_else(|| GpuError::Capture("no face buffers".into()))?;
        Ok((r, &host.as_slice()?[at..at + len]))
    }
}
