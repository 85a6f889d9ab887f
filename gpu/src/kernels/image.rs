//! The face path's pixel kernels (see engines::image, their CPU reference), for a batch of
//! frames of any sizes: each frame's face box cropped from its packed region to the model's RGB
//! inputs, and the model's face blended back into the region.
//!
//! Only a frame's region (`engines::image::Region`: the box with a few pixels to spare) crosses
//! PCIe, packed back to back with the batch's other regions in one page-locked buffer: one
//! upload before the crop, one download after the blend, the same bytes both ways.

use cudarc::driver::{
    CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice,
};
use std::sync::Arc;

use cudarc::driver::sys;
use lipstream_engines::image::{FaceBox, LowerFace, Region};

use super::{launch, shape_err, Arg, Ptr, THREADS};
use crate::device::Device;
use crate::error::GpuError;

pub(crate) const SRC: &str = include_str!("../../kernels/image.cu");

/// Words of one frame's `FaceJob` (image.cu): seven ints, then ten floats.
const JOB_WORDS: usize = 17;

/// One frame of a batch: its packed region (`Region::copy_out`), the face box and the mask.
#[derive(Clone, Copy, Debug)]
pub struct FaceFrame<'a> {
    pub region: Region,
    pub pixels: &'a [u8],
    pub face: FaceBox,
    pub mask: LowerFace,
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
/// Grows to the largest batch seen; a batch uses it from `crop` until `region` has read its
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
    size: usize,
    /// Recorded behind the current batch's download.
    downloaded: CudaEvent,
}

/// The descriptions' place in the buffer: 4-byte aligned after the regions.
fn jobs_offset(region_bytes: usize) -> usize {
    region_bytes.next_multiple_of(16)
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
            size: 0,
            downloaded: device
                .ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))?,
        })
    }

    /// Uploads `frames` and crops each face box to `reference` (and `masked`, its lower half
    /// black; 0 for none) at `[frames.len(), 3, size, size]` fp16. Waits for this buffer's
    /// previous batch to have come back first.
    ///
    /// # Safety
    /// `reference` (and `masked` unless 0) must hold `frames.len() * 3 * size * size` fp16
    /// values on `stream`'s device.
    pub unsafe fn crop(
        &mut self,
        image: &Image,
        stream: &Arc<CudaStream>,
        frames: &[FaceFrame],
        size: usize,
        reference: Ptr,
        masked: Ptr,
    ) -> Result<(), GpuError> {
        self.downloaded.synchronize()?;
        if frames.is_empty() || size == 0 {
            return Err(shape_err("crop_faces_f16", "an empty batch".into()));
        }
        let mut at = 0usize;
        self.frames.clear();
        self.widest = 0;
        for (i, f) in frames.iter().enumerate() {
            let r = &f.region;
            let fits = Region::around(&f.face, r.frame_width, r.frame_height).is_some_and(|need| {
                r.x <= need.x
                    && r.y <= need.y
                    && r.x + r.width >= need.x + need.width
                    && r.y + r.height >= need.y + need.height
            });
            let sane =
                f.face.x1 > f.face.x0 && f.face.y1 > f.face.y0 && r.x % 2 == 0 && r.y % 2 == 0;
            if !fits || !sane || f.pixels.len() != r.bytes() {
                return Err(shape_err(
                    "crop_faces_f16",
                    format!(
                        "frame {i}: box {:?} with region {r:?} and {} bytes",
                        f.face,
                        f.pixels.len()
                    ),
                ));
            }
            self.frames.push((at, r.bytes(), *r));
            let (_, _, cw, ch) = r.chroma();
            self.widest = self.widest.max(r.width * r.height).max(cw * ch);
            at += r.bytes();
        }
        let jobs_at = jobs_offset(at);
        let need = jobs_at + 4 * JOB_WORDS * frames.len();
        if i32::try_from(need).is_err() {
            return Err(shape_err(
                "crop_faces_f16",
                format!("{need} bytes in one batch"),
            ));
        }
        if need > self.capacity {
            // The old buffers' last batch is done (waited for above).
            let capacity = need.next_power_of_two();
            self.host = None;
            self.device = None;
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
        for (f, &(at, len, _)) in frames.iter().zip(&self.frames) {
            buf[at..at + len].copy_from_slice(f.pixels);
        }
        for (i, (f, &(at, _, r))) in frames.iter().zip(&self.frames).enumerate() {
            let (b, m) = (&f.face, &f.mask);
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
            ];
            let words = ints
                .iter()
                .map(|&v| v as u32)
                .chain(floats.iter().map(|v| v.to_bits()));
            let base = jobs_at + 4 * JOB_WORDS * i;
            for (k, w) in words.enumerate() {
                buf[base + 4 * k..base + 4 * k + 4].copy_from_slice(&w.to_ne_bytes());
            }
        }
        self.jobs_at = jobs_at;
        self.size = size;
        // The copy runs from page-locked memory, asynchronously; nothing writes `buf` until
        // `downloaded` says this batch is back.
        stream.memcpy_htod(&buf[..need], &mut dev.slice_mut(..need))?;
        let (base, _sync) = dev.device_ptr(stream);
        let cfg = LaunchConfig {
            grid_dim: (
                (size * size).div_ceil(THREADS as usize) as u32,
                frames.len() as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            Arg::P(base),
            Arg::P(base + jobs_at as u64),
            Arg::I(size as i32),
            Arg::P(reference),
            Arg::P(masked),
        ];
        // SAFETY: matches crop_faces_f16 (u8*, const FaceJob*, int, half*, half*); every
        // description's region lies in the uploaded bytes and holds its box's taps (checked
        // above); the outputs hold the batch (the caller's promise).
        unsafe { launch(stream, &image.crop, cfg, &args) }
    }

    /// Blends `faces` ([batch, 3, size, size] fp16 RGB in [0, 1], the batch `crop` uploaded)
    /// into their regions and queues the regions' download.
    ///
    /// # Safety
    /// `faces` must hold the batch's faces on `stream`'s device; `crop` ran on `stream`.
    pub unsafe fn blend(
        &mut self,
        image: &Image,
        stream: &Arc<CudaStream>,
        faces: Ptr,
    ) -> Result<(), GpuError> {
        let (Some(host), Some(dev)) = (self.host.as_mut(), self.device.as_ref()) else {
            return Err(shape_err("blend_faces_f16", "no batch was cropped".into()));
        };
        if self.frames.is_empty() {
            return Err(shape_err("blend_faces_f16", "no batch was cropped".into()));
        }
        let (base, _sync) = dev.device_ptr(stream);
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
            Arg::I(self.size as i32),
        ];
        // SAFETY: matches blend_faces_f16 (u8*, const FaceJob*, const half*, int); the
        // descriptions and regions are the ones `crop` uploaded; threads past a rectangle return.
        unsafe { launch(stream, &image.blend, cfg, &args) }?;
        let regions = self.jobs_at;
        let buf = host.as_mut_slice()?;
        stream.memcpy_dtoh(&dev.slice(..regions), &mut buf[..regions])?;
        self.downloaded.record(stream)?;
        Ok(())
    }

    /// The current batch's crop size.
    pub fn size(&self) -> usize {
        self.size
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
