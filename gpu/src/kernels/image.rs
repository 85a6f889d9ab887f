//! The face path's pixel kernels (see engines::image, their CPU reference): face box to the
//! model's RGB input, and the model's face blended back into the I420 frame.

use cudarc::driver::{CudaFunction, CudaStream};
use lipstream_engines::image::{FaceBox, LowerFace};

use super::{elems, launch, shape_err, Arg, Ptr};
use crate::device::Device;
use crate::error::GpuError;

pub(crate) const SRC: &str = include_str!("../../kernels/image.cu");

/// An I420 frame on the device: packed planes (luma stride = width, chroma = ceil(width / 2)).
#[derive(Clone, Copy, Debug)]
pub struct DeviceFrame {
    pub y: Ptr,
    pub u: Ptr,
    pub v: Ptr,
    pub width: usize,
    pub height: usize,
}

/// The compiled kernels.
pub struct Image {
    crop: CudaFunction,
    blend: CudaFunction,
}

fn check(f: &DeviceFrame, b: &FaceBox, size: usize) -> Result<(), GpuError> {
    let ok = f.width > 0
        && f.height > 0
        && size > 0
        && b.x1 > b.x0
        && b.y1 > b.y0
        && [b.x0, b.y0, b.x1, b.y1].iter().all(|v| v.is_finite());
    if ok {
        Ok(())
    } else {
        Err(shape_err(
            "face box",
            format!("{b:?} in a {}x{} frame", f.width, f.height),
        ))
    }
}

impl Image {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let m = super::compile(device, "image", SRC)?;
        Ok(Image {
            crop: m.load_function("crop_i420_rgb_f16")?,
            blend: m.load_function("blend_rgb_i420_f16")?,
        })
    }

    /// out [3, size, size] fp16 = the box of `frame` as RGB in [-1, 1].
    ///
    /// # Safety
    /// The frame's planes must be on the device at their sizes; out must hold 3*size*size.
    pub unsafe fn crop(
        &self,
        stream: &CudaStream,
        frame: &DeviceFrame,
        b: &FaceBox,
        size: usize,
        out: Ptr,
    ) -> Result<(), GpuError> {
        check(frame, b, size)?;
        let args = [
            Arg::P(frame.y),
            Arg::P(frame.u),
            Arg::P(frame.v),
            Arg::I(frame.width as i32),
            Arg::I(frame.height as i32),
            Arg::F(b.x0),
            Arg::F(b.y0),
            Arg::F(b.x1),
            Arg::F(b.y1),
            Arg::I(size as i32),
            Arg::P(out),
        ];
        // SAFETY: matches crop_i420_rgb_f16 (3 const u8*, 2 int, 4 float, int, half*); sampling
        // clamps to the planes, one thread per output pixel.
        unsafe { launch(stream, &self.crop, elems(size * size), &args) }
    }

    /// Blends `face` ([3, size, size] fp16 RGB in [0, 1]) into the box of `frame` in place,
    /// under `mask` (engines::image::blend_with at full strength).
    ///
    /// # Safety
    /// As for `crop`, with face holding 3*size*size values.
    pub unsafe fn blend(
        &self,
        stream: &CudaStream,
        frame: &DeviceFrame,
        b: &FaceBox,
        mask: &LowerFace,
        face: Ptr,
        size: usize,
    ) -> Result<(), GpuError> {
        check(frame, b, size)?;
        let (cw, ch) = (frame.width.div_ceil(2), frame.height.div_ceil(2));
        for (a, second, stride, n_w, n_h, scale) in [
            (frame.y, 0, frame.width, frame.width, frame.height, 1.0f32),
            (frame.u, frame.v, cw, cw, ch, 2.0),
        ] {
            let lo = |v: f32| (v / scale).floor().max(0.0) as usize;
            let hi = |v: f32, n: usize| ((v / scale).ceil().max(0.0) as usize).min(n);
            let (x0, y0) = (lo(b.x0).min(n_w), lo(b.y0).min(n_h));
            let (nx, ny) = (
                hi(b.x1, n_w).saturating_sub(x0),
                hi(b.y1, n_h).saturating_sub(y0),
            );
            if nx == 0 || ny == 0 {
                continue;
            }
            let args = [
                Arg::P(a),
                Arg::P(second),
                Arg::I(stride as i32),
                Arg::F(scale),
                Arg::I(x0 as i32),
                Arg::I(y0 as i32),
                Arg::I(nx as i32),
                Arg::I(ny as i32),
                Arg::F(b.x0),
                Arg::F(b.y0),
                Arg::F(b.x1),
                Arg::F(b.y1),
                Arg::F(mask.top),
                Arg::F(mask.top_feather),
                Arg::F(mask.left),
                Arg::F(mask.right),
                Arg::F(mask.side_feather),
                Arg::F(mask.bottom_feather),
                Arg::P(face),
                Arg::I(size as i32),
            ];
            // SAFETY: matches blend_rgb_i420_f16 (2 u8*, int, float, 4 int, 10 float,
            // const half*, int); the rectangle lies inside the plane (clamped above), face
            // sampling clamps.
            unsafe { launch(stream, &self.blend, elems(nx * ny), &args) }?;
        }
        Ok(())
    }
}
