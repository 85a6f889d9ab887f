//! MTCNN face detection as facenet-pytorch runs it: P-Net over an image pyramid, R-Net and O-Net
//! on the candidates, non-maximum suppression between stages, box regression, 5 landmarks.
//!
//! The nets are graphs of the shared op set (built per input size; the weights are tiny and held
//! in memory). The cascade around them — pyramid, area resampling, NMS, box arithmetic — follows
//! `facenet_pytorch/models/utils/detect_face.py` step by step, in the same float precision, so the
//! boxes agree with it to well under a pixel.

use std::collections::HashMap;
use std::path::Path;

use crate::cpu;
use crate::error::{EngineError, Result};
use crate::graph::{Graph, Op, ValueId};
use crate::models::blocks::{conv2d, linear};
use crate::tensor::Tensor;
use crate::weights::{Vb, Weights};

/// facenet-pytorch's defaults.
#[derive(Clone, Debug)]
pub struct MtcnnParams {
    pub min_face_size: f64,
    pub thresholds: [f32; 3],
    pub factor: f64,
}

impl Default for MtcnnParams {
    fn default() -> Self {
        MtcnnParams {
            min_face_size: 20.0,
            thresholds: [0.6, 0.7, 0.7],
            factor: 0.709,
        }
    }
}

/// One detected face: box corners in pixels, confidence, and 5 landmarks (eyes, nose, mouth
/// corners) as (x, y).
#[derive(Clone, Debug, PartialEq)]
pub struct Face {
    pub box_xyxy: [f32; 4],
    pub score: f32,
    pub landmarks: [[f32; 2]; 5],
}

/// The three nets' weights, loaded once.
pub struct Mtcnn {
    pnet: Weights,
    rnet: Weights,
    onet: Weights,
    params: MtcnnParams,
    pnet_graphs: HashMap<(usize, usize), Graph>,
}

fn prelu(g: &mut Graph, vb: &Vb, x: ValueId, c: usize) -> Result<ValueId> {
    let a = vb.get("weight", &[c])?;
    let a = g.constant(&vb.key("weight"), a);
    g.push(&vb.key("prelu"), Op::PRelu, &[x, a])
}

fn pool(g: &mut Graph, name: &str, x: ValueId, kernel: usize, stride: usize) -> Result<ValueId> {
    g.push(
        name,
        Op::MaxPool2d {
            kernel,
            stride,
            ceil_mode: true,
        },
        &[x],
    )
}

/// P-Net on one [1,3,h,w] image: outputs `reg` [1,4,h',w'] and `prob` [1,2,h',w'].
pub fn pnet(vb: &Vb, h: usize, w: usize) -> Result<Graph> {
    let mut g = Graph::new();
    let x = g.input("image", &[1, 3, h, w]);
    let x = conv2d(&mut g, &vb.pp("conv1"), x, 3, 10, 3, 1, 0)?;
    let x = prelu(&mut g, &vb.pp("prelu1"), x, 10)?;
    let x = pool(&mut g, "pool1", x, 2, 2)?;
    let x = conv2d(&mut g, &vb.pp("conv2"), x, 10, 16, 3, 1, 0)?;
    let x = prelu(&mut g, &vb.pp("prelu2"), x, 16)?;
    let x = conv2d(&mut g, &vb.pp("conv3"), x, 16, 32, 3, 1, 0)?;
    let x = prelu(&mut g, &vb.pp("prelu3"), x, 32)?;
    let a = conv2d(&mut g, &vb.pp("conv4_1"), x, 32, 2, 1, 1, 0)?;
    let a = g.push("softmax4_1", Op::Softmax { axis: 1 }, &[a])?;
    let b = conv2d(&mut g, &vb.pp("conv4_2"), x, 32, 4, 1, 1, 0)?;
    g.output("reg", b);
    g.output("prob", a);
    Ok(g)
}

/// [N,C,H,W] -> permute(0,3,2,1) -> [N, W*H*C]: facenet-pytorch's flatten before the dense layers.
fn flatten_whc(g: &mut Graph, x: ValueId) -> Result<ValueId> {
    let s = g.shape(x).to_vec();
    let t = g.push(
        "flatten.permute",
        Op::Permute {
            perm: vec![0, 3, 2, 1],
        },
        &[x],
    )?;
    g.push(
        "flatten",
        Op::Reshape {
            shape: vec![s[0], s[1] * s[2] * s[3]],
        },
        &[t],
    )
}

/// R-Net on [n,3,24,24] crops: `reg` [n,4], `prob` [n,2].
pub fn rnet(vb: &Vb, n: usize) -> Result<Graph> {
    let mut g = Graph::new();
    let x = g.input("image", &[n, 3, 24, 24]);
    let x = conv2d(&mut g, &vb.pp("conv1"), x, 3, 28, 3, 1, 0)?;
    let x = prelu(&mut g, &vb.pp("prelu1"), x, 28)?;
    let x = pool(&mut g, "pool1", x, 3, 2)?;
    let x = conv2d(&mut g, &vb.pp("conv2"), x, 28, 48, 3, 1, 0)?;
    let x = prelu(&mut g, &vb.pp("prelu2"), x, 48)?;
    let x = pool(&mut g, "pool2", x, 3, 2)?;
    let x = conv2d(&mut g, &vb.pp("conv3"), x, 48, 64, 2, 1, 0)?;
    let x = prelu(&mut g, &vb.pp("prelu3"), x, 64)?;
    let x = flatten_whc(&mut g, x)?;
    let x = linear(&mut g, &vb.pp("dense4"), x, 576, 128, true)?;
    let x = prelu(&mut g, &vb.pp("prelu4"), x, 128)?;
    let a = linear(&mut g, &vb.pp("dense5_1"), x, 128, 2, true)?;
    let a = g.push("softmax5_1", Op::Softmax { axis: 1 }, &[a])?;
    let b = linear(&mut g, &vb.pp("dense5_2"), x, 128, 4, true)?;
    g.output("reg", b);
    g.output("prob", a);
    Ok(g)
}

/// O-Net on [n,3,48,48] crops: `reg` [n,4], `landmarks` [n,10], `prob` [n,2].
pub fn onet(vb: &Vb, n: usize) -> Result<Graph> {
    let mut g = Graph::new();
    let x = g.input("image", &[n, 3, 48, 48]);
    let x = conv2d(&mut g, &vb.pp("conv1"), x, 3, 32, 3, 1, 0)?;
    let x = prelu(&mut g, &vb.pp("prelu1"), x, 32)?;
    let x = pool(&mut g, "pool1", x, 3, 2)?;
    let x = conv2d(&mut g, &vb.pp("conv2"), x, 32, 64, 3, 1, 0)?;
    let x = prelu(&mut g, &vb.pp("prelu2"), x, 64)?;
    let x = pool(&mut g, "pool2", x, 3, 2)?;
    let x = conv2d(&mut g, &vb.pp("conv3"), x, 64, 64, 3, 1, 0)?;
    let x = prelu(&mut g, &vb.pp("prelu3"), x, 64)?;
    let x = pool(&mut g, "pool3", x, 2, 2)?;
    let x = conv2d(&mut g, &vb.pp("conv4"), x, 64, 128, 2, 1, 0)?;
    let x = prelu(&mut g, &vb.pp("prelu4"), x, 128)?;
    let x = flatten_whc(&mut g, x)?;
    let x = linear(&mut g, &vb.pp("dense5"), x, 1152, 256, true)?;
    let x = prelu(&mut g, &vb.pp("prelu5"), x, 256)?;
    let a = linear(&mut g, &vb.pp("dense6_1"), x, 256, 2, true)?;
    let a = g.push("softmax6_1", Op::Softmax { axis: 1 }, &[a])?;
    let b = linear(&mut g, &vb.pp("dense6_2"), x, 256, 4, true)?;
    let c = linear(&mut g, &vb.pp("dense6_3"), x, 256, 10, true)?;
    g.output("reg", b);
    g.output("landmarks", c);
    g.output("prob", a);
    Ok(g)
}

/// A candidate box: x1, y1, x2, y2, score, and its pending regression.
#[derive(Clone, Copy, Debug)]
struct Cand {
    b: [f32; 4],
    score: f32,
    reg: [f32; 4],
}

impl Mtcnn {
    /// Loads `pnet.pt`, `rnet.pt`, `onet.pt` from `dir` (facenet-pytorch's `data/` layout).
    pub fn open(dir: &Path, params: MtcnnParams) -> Result<Self> {
        let load = |n: &str| Weights::load_all(&dir.join(n));
        let m = Mtcnn {
            pnet: load("pnet.pt")?,
            rnet: load("rnet.pt")?,
            onet: load("onet.pt")?,
            params,
            pnet_graphs: HashMap::new(),
        };
        // Build once to check every key and shape now, not at the first frame.
        pnet(&m.pnet.root(""), 12, 12)?;
        rnet(&m.rnet.root(""), 1)?;
        onet(&m.onet.root(""), 1)?;
        m.pnet.finish("")?;
        m.rnet.finish("")?;
        m.onet.finish("")?;
        Ok(m)
    }

    /// Faces in an RGB image (`rgb` is `height` rows of `width` x 3 bytes), best boxes first as
    /// facenet-pytorch orders them before its selection step.
    pub fn detect(&mut self, rgb: &[u8], width: usize, height: usize) -> Result<Vec<Face>> {
        if rgb.len() != width * height * 3 {
            return Err(EngineError::Input {
                name: "rgb".into(),
                expected: vec![height, width, 3],
                got: vec![rgb.len()],
            });
        }
        // CHW float image, 0..255.
        let mut img = vec![0f32; 3 * width * height];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                img[c * width * height + i] = f32::from(px[c]);
            }
        }
        let (h, w) = (height, width);
        let p = self.params.clone();

        // Stage 1: P-Net over the pyramid.
        let m = 12.0 / p.min_face_size;
        let mut minl = h.min(w) as f64 * m;
        let mut scales = Vec::new();
        let mut scale = m;
        while minl >= 12.0 {
            scales.push(scale);
            scale *= p.factor;
            minl *= p.factor;
        }
        let mut cands: Vec<Cand> = Vec::new();
        for &s in &scales {
            let (hs, ws) = ((h as f64 * s + 1.0) as usize, (w as f64 * s + 1.0) as usize);
            let im = normalize(area_resize(&img, h, w, hs, ws));
            let graph = match self.pnet_graphs.entry((hs, ws)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(pnet(&self.pnet.root(""), hs, ws)?)
                }
            };
            let out = cpu::run(graph, &[("image", &Tensor::new(vec![1, 3, hs, ws], im))])?;
            let (reg, prob) = (&out[0].1, &out[1].1);
            let found = generate_boxes(reg, prob, s as f32, p.thresholds[0]);
            let keep = nms(&found, 0.5, false);
            cands.extend(keep.into_iter().map(|i| found[i]));
        }
        let keep = nms(&cands, 0.7, false);
        let mut boxes: Vec<Cand> = keep
            .into_iter()
            .map(|i| {
                let c = cands[i];
                let (rw, rh) = (c.b[2] - c.b[0], c.b[3] - c.b[1]);
                let b = [
                    c.b[0] + c.reg[0] * rw,
                    c.b[1] + c.reg[1] * rh,
                    c.b[2] + c.reg[2] * rw,
                    c.b[3] + c.reg[3] * rh,
                ];
                Cand {
                    b: rerec(b),
                    score: c.score,
                    reg: [0.0; 4],
                }
            })
            .collect();

        // Stage 2: R-Net on 24x24 crops.
        if !boxes.is_empty() {
            let crops = crop_all(&img, h, w, &boxes, 24);
            let g = rnet(&self.rnet.root(""), boxes.len())?;
            let out = cpu::run(&g, &[("image", &crops)])?;
            let (reg, prob) = (&out[0].1, &out[1].1);
            let passed: Vec<Cand> = (0..boxes.len())
                .filter(|&i| prob.data[i * 2 + 1] > p.thresholds[1])
                .map(|i| Cand {
                    b: boxes[i].b,
                    score: prob.data[i * 2 + 1],
                    reg: row4(&reg.data, i),
                })
                .collect();
            let keep = nms(&passed, 0.7, false);
            boxes = keep
                .into_iter()
                .map(|i| Cand {
                    b: rerec(bbreg(passed[i].b, passed[i].reg)),
                    ..passed[i]
                })
                .collect();
        }

        // Stage 3: O-Net on 48x48 crops, landmarks.
        let mut faces = Vec::new();
        if !boxes.is_empty() {
            let crops = crop_all(&img, h, w, &boxes, 48);
            let g = onet(&self.onet.root(""), boxes.len())?;
            let out = cpu::run(&g, &[("image", &crops)])?;
            let (reg, marks, prob) = (&out[0].1, &out[1].1, &out[2].1);
            let mut passed = Vec::new();
            for (i, c) in boxes.iter().enumerate() {
                let score = prob.data[i * 2 + 1];
                if score <= p.thresholds[2] {
                    continue;
                }
                let (wi, hi) = (c.b[2] - c.b[0] + 1.0, c.b[3] - c.b[1] + 1.0);
                let mut landmarks = [[0f32; 2]; 5];
                for (k, lm) in landmarks.iter_mut().enumerate() {
                    lm[0] = wi * marks.data[i * 10 + k] + c.b[0] - 1.0;
                    lm[1] = hi * marks.data[i * 10 + 5 + k] + c.b[1] - 1.0;
                }
                let b = bbreg(c.b, row4(&reg.data, i));
                passed.push((
                    Cand {
                        b,
                        score,
                        reg: [0.0; 4],
                    },
                    landmarks,
                ));
            }
            let cands: Vec<Cand> = passed.iter().map(|(c, _)| *c).collect();
            for i in nms(&cands, 0.7, true) {
                let (c, landmarks) = passed[i];
                faces.push(Face {
                    box_xyxy: c.b,
                    score: c.score,
                    landmarks,
                });
            }
        }
        Ok(faces)
    }
}

fn row4(data: &[f32], i: usize) -> [f32; 4] {
    [
        data[i * 4],
        data[i * 4 + 1],
        data[i * 4 + 2],
        data[i * 4 + 3],
    ]
}

/// (x - 127.5) * 0.0078125, as facenet-pytorch scales pixels for every net.
fn normalize(mut v: Vec<f32>) -> Vec<f32> {
    v.iter_mut().for_each(|x| *x = (*x - 127.5) * 0.0078125);
    v
}

/// PyTorch's `interpolate(mode="area")` (adaptive average pooling) on a CHW image.
pub fn area_resize(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let c = src.len() / (h * w);
    let mut out = vec![0f32; c * oh * ow];
    let span =
        |i: usize, n_in: usize, n_out: usize| (i * n_in / n_out, ((i + 1) * n_in).div_ceil(n_out));
    for ch in 0..c {
        let plane = &src[ch * h * w..][..h * w];
        for oy in 0..oh {
            let (y0, y1) = span(oy, h, oh);
            for ox in 0..ow {
                let (x0, x1) = span(ox, w, ow);
                // Row slices (no index check per element), summed in the same order as ever.
                let mut sum = 0f32;
                for row in plane[y0 * w..y1 * w].chunks_exact(w) {
                    for v in &row[x0..x1] {
                        sum += v;
                    }
                }
                out[ch * oh * ow + oy * ow + ox] = sum / ((y1 - y0) * (x1 - x0)) as f32;
            }
        }
    }
    out
}

/// Candidates from one pyramid level: every cell whose face probability reaches the threshold.
fn generate_boxes(reg: &Tensor, prob: &Tensor, scale: f32, threshold: f32) -> Vec<Cand> {
    let (hh, ww) = (prob.shape[2], prob.shape[3]);
    let plane = hh * ww;
    let mut out = Vec::new();
    for y in 0..hh {
        for x in 0..ww {
            let score = prob.data[plane + y * ww + x];
            if score < threshold {
                continue;
            }
            let (bx, by) = (x as f32, y as f32);
            let b = [
                ((2.0 * bx + 1.0) / scale).floor(),
                ((2.0 * by + 1.0) / scale).floor(),
                ((2.0 * bx + 12.0) / scale).floor(),
                ((2.0 * by + 12.0) / scale).floor(),
            ];
            let r = |k: usize| reg.data[k * plane + y * ww + x];
            out.push(Cand {
                b,
                score,
                reg: [r(0), r(1), r(2), r(3)],
            });
        }
    }
    out
}

/// Greedy non-maximum suppression, highest score first. `min_mode`: facenet-pytorch's numpy
/// "Min" variant (areas with +1, overlap over the smaller area); otherwise torchvision's IoU.
fn nms(c: &[Cand], threshold: f32, min_mode: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..c.len()).collect();
    order.sort_by(|&a, &b| c[b].score.total_cmp(&c[a].score));
    let plus = if min_mode { 1.0 } else { 0.0 };
    let area = |b: &[f32; 4]| (b[2] - b[0] + plus) * (b[3] - b[1] + plus);
    let mut keep = Vec::new();
    let mut dead = vec![false; c.len()];
    for (oi, &i) in order.iter().enumerate() {
        if dead[i] {
            continue;
        }
        keep.push(i);
        for &j in &order[oi + 1..] {
            if dead[j] {
                continue;
            }
            let (a, b) = (&c[i].b, &c[j].b);
            let iw = (a[2].min(b[2]) - a[0].max(b[0]) + plus).max(0.0);
            let ih = (a[3].min(b[3]) - a[1].max(b[1]) + plus).max(0.0);
            let inter = iw * ih;
            let overlap = if min_mode {
                inter / area(a).min(area(b))
            } else {
                inter / (area(a) + area(b) - inter)
            };
            if overlap > threshold {
                dead[j] = true;
            }
        }
    }
    keep
}

fn bbreg(b: [f32; 4], reg: [f32; 4]) -> [f32; 4] {
    let (w, h) = (b[2] - b[0] + 1.0, b[3] - b[1] + 1.0);
    [
        b[0] + reg[0] * w,
        b[1] + reg[1] * h,
        b[2] + reg[2] * w,
        b[3] + reg[3] * h,
    ]
}

/// Squares a box around its centre.
fn rerec(b: [f32; 4]) -> [f32; 4] {
    let (h, w) = (b[3] - b[1], b[2] - b[0]);
    let l = w.max(h);
    let x1 = b[0] + w * 0.5 - l * 0.5;
    let y1 = b[1] + h * 0.5 - l * 0.5;
    [x1, y1, x1 + l, y1 + l]
}

/// Crops each box (clipped to the image as facenet-pytorch's `pad` does) and area-resizes it to
/// `size`x`size`, normalised, as one [n,3,size,size] batch.
fn crop_all(img: &[f32], h: usize, w: usize, boxes: &[Cand], size: usize) -> Tensor {
    let mut out = Vec::with_capacity(boxes.len() * 3 * size * size);
    for c in boxes {
        let x = (c.b[0].trunc() as i64).max(1);
        let y = (c.b[1].trunc() as i64).max(1);
        let ex = (c.b[2].trunc() as i64).min(w as i64);
        let ey = (c.b[3].trunc() as i64).min(h as i64);
        let (cw, ch) = ((ex - x + 1).max(1) as usize, (ey - y + 1).max(1) as usize);
        let mut crop = vec![0f32; 3 * cw * ch];
        for k in 0..3 {
            for yy in 0..ch {
                for xx in 0..cw {
                    let (sy, sx) = ((y - 1) as usize + yy, (x - 1) as usize + xx);
                    if sy < h && sx < w {
                        crop[k * cw * ch + yy * cw + xx] = img[k * w * h + sy * w + sx];
                    }
                }
            }
        }
        out.extend(normalize(area_resize(&crop, ch, cw, size, size)));
    }
    Tensor::new(vec![boxes.len(), 3, size, size], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_resize_averages_like_adaptive_pooling() {
        // 1 channel, 3x3 -> 2x2: windows [0,2) and [1,3) overlap in the middle row/column.
        let src: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let out = area_resize(&src, 3, 3, 2, 2);
        assert_eq!(out, vec![2.0, 3.0, 5.0, 6.0]);
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes() {
        let c = |x: f32, s: f32| Cand {
            b: [x, 0.0, x + 10.0, 10.0],
            score: s,
            reg: [0.0; 4],
        };
        let boxes = [c(0.0, 0.5), c(1.0, 0.9), c(30.0, 0.7)];
        assert_eq!(nms(&boxes, 0.5, false), vec![1, 2]);
        assert_eq!(rerec([0.0, 0.0, 10.0, 20.0]), [-5.0, 0.0, 15.0, 20.0]);
    }
}
