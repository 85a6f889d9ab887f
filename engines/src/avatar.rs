//! Avatar bundles: what avatar mode needs per frame of the looped clip, computed once — the
//! frame itself (RGB), its face box (MuseTalk 1.5's crop), the blend mask from its landmarks, and
//! the UNet's 8 latent channels (the
//! VAE means of the masked and of the reference crop, scaled by 0.18215) — so that serving a
//! frame costs the UNet and the VAE decode only.
//!
//! Two `.safetensors` files: `NAME.safetensors` holds `rgb` [N, H, W, 3] in U8 with
//! `__metadata__` saying what made it; `NAME.latents.safetensors` holds `boxes` [N, 4], `masks`
//! [N, 6] (`LowerFace::to_array`) and `latents` [N, 8, 32, 32] in F32. Older bundles are read
//! too: version 1 kept `rgb` in F16 (exact for bytes, but twice the size: a clip's frames are
//! most of a bundle), and those written before masks were kept use the default mask.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{EngineError, Result};
use crate::face::{Crop, FaceTracker, TrackerConfig};
use crate::image::{FaceBox, LowerFace};
use crate::models::mtcnn::Mtcnn;
use crate::models::musetalk::{CROP, LATENT};
use crate::tensor::Tensor;
use crate::weights::safetensors::{self, Blob};
use crate::weights::{Checkpoint, DType};

/// The bundle format this version writes.
const VERSION: &str = "2";

/// MuseTalk's latent scale (sd-vae-ft-mse).
pub const LATENT_SCALE: f32 = 0.18215;

/// One prepared frame.
#[derive(Clone, Debug)]
pub struct AvatarFrame {
    pub width: usize,
    pub height: usize,
    /// `height` rows of `width` x 3 bytes.
    pub rgb: Vec<u8>,
    pub face: FaceBox,
    /// The part of the box the rendered face replaces.
    pub mask: LowerFace,
}

/// A prepared avatar.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub frames: Vec<AvatarFrame>,
    /// [N, 8, 32, 32]: masked crop's latents, then the reference crop's.
    pub latents: Tensor,
}

/// The box of an RGB image resampled (bilinear) to `size` x `size`, [3, size, size] in [-1, 1].
pub fn crop_rgb(rgb: &[u8], width: usize, height: usize, b: &FaceBox, size: usize) -> Tensor {
    let (sx, sy) = ((b.x1 - b.x0) / size as f32, (b.y1 - b.y0) / size as f32);
    let mut out = vec![0f32; 3 * size * size];
    for oy in 0..size {
        for ox in 0..size {
            let fx = (b.x0 + (ox as f32 + 0.5) * sx - 0.5).clamp(0.0, (width - 1) as f32);
            let fy = (b.y0 + (oy as f32 + 0.5) * sy - 0.5).clamp(0.0, (height - 1) as f32);
            let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(width - 1), (y0 + 1).min(height - 1));
            let (ax, ay) = (fx - x0 as f32, fy - y0 as f32);
            for c in 0..3 {
                let p = |x: usize, y: usize| f32::from(rgb[(y * width + x) * 3 + c]);
                let top = p(x0, y0) * (1.0 - ax) + p(x1, y0) * ax;
                let bottom = p(x0, y1) * (1.0 - ax) + p(x1, y1) * ax;
                out[(c * size + oy) * size + ox] = (top * (1.0 - ay) + bottom * ay) / 127.5 - 1.0;
            }
        }
    }
    Tensor::new(vec![3, size, size], out)
}

/// MuseTalk's masked crop: the lower half set to -1 (black in [-1, 1]).
pub fn mask_lower_half(crop: &Tensor) -> Tensor {
    let size = crop.shape[1];
    let mut m = crop.clone();
    for c in 0..3 {
        for y in size / 2..size {
            let row = (c * size + y) * size;
            m.data[row..row + size].fill(-1.0);
        }
    }
    m
}

/// Prepares frames: finds the face in each (smoothed across frames like the live tracker),
/// crops it, and encodes the masked and reference crops. `encode` maps [2, 3, 256, 256] in
/// [-1, 1] to the VAE's latent means [2, 4, 32, 32]. `progress` hears each frame done.
pub fn prepare(
    frames: Vec<(Vec<u8>, usize, usize)>,
    detector: &mut Mtcnn,
    mut encode: impl FnMut(&Tensor) -> Result<Tensor>,
    mut progress: impl FnMut(usize),
) -> Result<Bundle> {
    let mut tracker = FaceTracker::new(TrackerConfig {
        redetect_every: 1,
        ..TrackerConfig::default()
    });
    let mut out = Vec::with_capacity(frames.len());
    let mut latents = Vec::with_capacity(frames.len() * 8 * LATENT * LATENT);
    for (i, (rgb, width, height)) in frames.into_iter().enumerate() {
        let faces = detector.detect(&rgb, width, height)?;
        let Crop::Face(face, mask) = tracker.update(Some(&faces), width, height) else {
            return Err(EngineError::NoFace {
                frame: i,
                seconds: i as f64 * 0.04,
            });
        };
        let reference = crop_rgb(&rgb, width, height, &face, CROP);
        let masked = mask_lower_half(&reference);
        let mut both = masked.data.clone();
        both.extend_from_slice(&reference.data);
        let means = encode(&Tensor::new(vec![2, 3, CROP, CROP], both))?;
        if means.shape != [2, 4, LATENT, LATENT] {
            return Err(EngineError::Input {
                name: "VAE latent means".into(),
                expected: vec![2, 4, LATENT, LATENT],
                got: means.shape.clone(),
            });
        }
        latents.extend(means.data.iter().map(|v| v * LATENT_SCALE));
        out.push(AvatarFrame {
            width,
            height,
            rgb,
            face,
            mask,
        });
        progress(i + 1);
    }
    let n = out.len();
    Ok(Bundle {
        frames: out,
        latents: Tensor::new(vec![n, 8, LATENT, LATENT], latents),
    })
}

impl Bundle {
    /// Writes the bundle as `path` (and its `.latents.safetensors` beside it) with `metadata`.
    pub fn write(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<()> {
        let Some(first) = self.frames.first() else {
            return Err(EngineError::format(
                path,
                "an avatar needs at least one frame",
            ));
        };
        let (w, h) = (first.width, first.height);
        if self.frames.iter().any(|f| f.width != w || f.height != h) {
            return Err(EngineError::format(path, "avatar frames differ in size"));
        }
        let n = self.frames.len();
        if self.frames.iter().any(|f| f.rgb.len() != w * h * 3) {
            return Err(EngineError::format(
                path,
                "an avatar frame is not W x H x 3 bytes",
            ));
        }
        let rgb = Blob {
            shape: vec![n, h, w, 3],
            bytes: self
                .frames
                .iter()
                .flat_map(|f| f.rgb.iter().copied())
                .collect(),
        };
        let boxes = self
            .frames
            .iter()
            .flat_map(|f| [f.face.x0, f.face.y0, f.face.x1, f.face.y1])
            .collect();
        let masks = self.frames.iter().flat_map(|f| f.mask.to_array()).collect();
        let mut tensors = BTreeMap::new();
        tensors.insert("boxes".to_string(), Tensor::new(vec![n, 4], boxes));
        tensors.insert("masks".to_string(), Tensor::new(vec![n, 6], masks));
        tensors.insert("latents".to_string(), self.latents.clone());
        let mut meta = metadata.clone();
        meta.insert("lipstream.avatar".into(), VERSION.into());
        safetensors::write_with_blobs(
            path,
            &BTreeMap::new(),
            DType::F32,
            &meta,
            &BTreeMap::from([("rgb".to_string(), rgb)]),
        )?;
        // Boxes can pass 2048 px (F16's exact integers end there) and latents want F32.
        let side = path.with_extension("latents.safetensors");
        safetensors::write(&side, &tensors, DType::F32)
    }

    /// Reads a bundle written by `write`.
    pub fn read(path: &Path) -> Result<Self> {
        let meta = safetensors::read_metadata(path)?;
        let version = meta.get("lipstream.avatar").map(String::as_str);
        if !matches!(version, Some("1" | VERSION)) {
            return Err(EngineError::format(
                path,
                match version {
                    None => "not a lipstream avatar bundle".to_string(),
                    Some(v) => format!(
                        "avatar bundle version {v}: this lipstream reads 1 and {VERSION} (prepare it again)"
                    ),
                },
            ));
        }
        let pictures = Checkpoint::open(path)?;
        let entry = pictures
            .entry("rgb")
            .ok_or_else(|| EngineError::format(path, "the bundle holds no rgb frames"))?;
        let shape = entry.shape.clone();
        let [n, h, w, 3] = shape[..] else {
            return Err(EngineError::format(path, "rgb is not [N, H, W, 3]"));
        };
        let rgb: Vec<u8> = if entry.dtype == DType::Other("U8".into()) {
            pictures.bytes("rgb")?
        } else {
            pictures
                .load("rgb")?
                .data
                .iter()
                .map(|&v| v.clamp(0.0, 255.0) as u8)
                .collect()
        };
        if rgb.len() != n * h * w * 3 {
            return Err(EngineError::format(
                path,
                "rgb holds the wrong number of bytes",
            ));
        }
        let side = Checkpoint::open(&path.with_extension("latents.safetensors"))?;
        let (boxes, latents) = (side.load("boxes")?, side.load("latents")?);
        if boxes.shape != [n, 4] || latents.shape != [n, 8, LATENT, LATENT] {
            return Err(EngineError::format(
                path,
                "boxes or latents do not match the frames",
            ));
        }
        let masks = match side.entry("masks") {
            None => vec![LowerFace::DEFAULT; n],
            Some(_) => {
                let m = side.load("masks")?;
                if m.shape != [n, 6] {
                    return Err(EngineError::format(path, "masks do not match the frames"));
                }
                m.data
                    .chunks_exact(6)
                    .enumerate()
                    .map(|(i, c)| {
                        let a = [c[0], c[1], c[2], c[3], c[4], c[5]];
                        LowerFace::from_array(a).ok_or_else(|| {
                            EngineError::format(path, format!("frame {i}: mask {a:?} is no mask"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let frames = (0..n)
            .map(|i| AvatarFrame {
                width: w,
                height: h,
                rgb: rgb[i * h * w * 3..(i + 1) * h * w * 3].to_vec(),
                face: FaceBox {
                    x0: boxes.data[4 * i],
                    y0: boxes.data[4 * i + 1],
                    x1: boxes.data[4 * i + 2],
                    y1: boxes.data[4 * i + 3],
                },
                mask: masks[i],
            })
            .collect();
        Ok(Bundle { frames, latents })
    }
}
