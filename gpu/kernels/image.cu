// The face path's pixel kernels, mirroring engines/src/image.rs (the CPU reference), for a batch
// of frames of any sizes: each frame's face box resampled bilinearly from its packed region to
// the model's RGB inputs in [-1, 1] (NCHW fp16), and the model's face (RGB in [0, 1], NCHW fp16)
// blended back into the region under a feathered lower-face mask. BT.601 limited range; pixel i
// covers [i, i + 1).
#include <cuda_fp16.h>

// One frame of a batch: its packed region (engines::image::Region: luma rows, then U, then V,
// at byte `at` of the batch's buffer), the frame's size, the region's luma rectangle (even
// origin), the face box, the lower-face mask and the blend's strength (0..1). Mirrors
// `job_words` in src/kernels/image.rs.
struct FaceJob {
  int at, fw, fh, rx, ry, rw, rh;
  float bx0, by0, bx1, by1;
  float top, top_feather, left, right, side_feather, bottom_feather, strength;
};

// A plane's rectangle inside the packed region: origin in the frame's plane, size, data.
struct Rect {
  int ox, oy, w, h;
  unsigned char* p;
};

__device__ __forceinline__ Rect plane_rect(const FaceJob& j, unsigned char* regions, int plane) {
  const int cx = j.rx / 2, cy = j.ry / 2;
  const int cw = (j.rx + j.rw + 1) / 2 - cx, ch = (j.ry + j.rh + 1) / 2 - cy;
  unsigned char* y = regions + j.at;
  if (plane == 0) return Rect{j.rx, j.ry, j.rw, j.rh, y};
  unsigned char* u = y + j.rw * j.rh;
  return Rect{cx, cy, cw, ch, plane == 1 ? u : u + cw * ch};
}

// Bilinear sample at frame-plane coordinates (x, y) of an n_w x n_h plane, edges clamped to the
// frame as engines::image::crop does, read from the plane's rectangle (which holds every tap).
__device__ __forceinline__ float sample_rect(const Rect& r, int n_w, int n_h, float x, float y) {
  const float fx = fminf(fmaxf(x - 0.5f, 0.f), (float)(n_w - 1));
  const float fy = fminf(fmaxf(y - 0.5f, 0.f), (float)(n_h - 1));
  const int x0 = (int)floorf(fx), y0 = (int)floorf(fy);
  const int x1 = min(x0 + 1, n_w - 1), y1 = min(y0 + 1, n_h - 1);
  const float ax = fx - x0, ay = fy - y0;
  const int c0 = min(max(x0 - r.ox, 0), r.w - 1), c1 = min(max(x1 - r.ox, 0), r.w - 1);
  const int r0 = min(max(y0 - r.oy, 0), r.h - 1) * r.w, r1 = min(max(y1 - r.oy, 0), r.h - 1) * r.w;
  const float top = r.p[r0 + c0] * (1.f - ax) + r.p[r0 + c1] * ax;
  const float bottom = r.p[r1 + c0] * (1.f - ax) + r.p[r1 + c1] * ax;
  return top * (1.f - ay) + bottom * ay;
}

// reference [B, 3, size, size]: frame blockIdx.y's box as RGB in [-1, 1]; masked (optional):
// the same with its lower half black (-1), MuseTalk's masked input. Thread per output pixel.
extern "C" __global__ void crop_faces_f16(unsigned char* __restrict__ regions, const FaceJob* __restrict__ jobs,
                                          int size, __half* __restrict__ reference, __half* __restrict__ masked) {
  LS_PDL_ENTER();
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= size * size) return;
  const FaceJob j = jobs[blockIdx.y];
  const int ox = idx % size, oy = idx / size;
  const float x = j.bx0 + (ox + 0.5f) * ((j.bx1 - j.bx0) / size);
  const float yy = j.by0 + (oy + 0.5f) * ((j.by1 - j.by0) / size);
  const int cw = (j.fw + 1) / 2, ch = (j.fh + 1) / 2;
  const float c = sample_rect(plane_rect(j, regions, 0), j.fw, j.fh, x, yy) - 16.f;
  const float d = sample_rect(plane_rect(j, regions, 1), cw, ch, x / 2.f, yy / 2.f) - 128.f;
  const float e = sample_rect(plane_rect(j, regions, 2), cw, ch, x / 2.f, yy / 2.f) - 128.f;
  const float rgb[3] = {1.164f * c + 1.596f * e, 1.164f * c - 0.392f * d - 0.813f * e, 1.164f * c + 2.017f * d};
  const long frame = (long)blockIdx.y * 3 * size * size;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    const __half v = __float2half(fminf(fmaxf(rgb[k], 0.f), 255.f) / 127.5f - 1.f);
    const long at = frame + (long)(k * size + oy) * size + ox;
    reference[at] = v;
    if (masked != nullptr) masked[at] = oy >= size / 2 ? __float2half(-1.f) : v;
  }
}

__device__ __forceinline__ float smoothstep(float e0, float e1, float x) {
  const float t = fminf(fmaxf((x - e0) / (e1 - e0), 0.f), 1.f);
  return t * t * (3.f - 2.f * t);
}

__device__ __forceinline__ float face_at(const __half* f, int size, int c, float u, float v) {
  const float fx = fminf(fmaxf(u * size - 0.5f, 0.f), (float)(size - 1));
  const float fy = fminf(fmaxf(v * size - 0.5f, 0.f), (float)(size - 1));
  const int x0 = (int)floorf(fx), y0 = (int)floorf(fy);
  const int x1 = min(x0 + 1, size - 1), y1 = min(y0 + 1, size - 1);
  const float ax = fx - x0, ay = fy - y0;
  const __half* p = f + (long)c * size * size;
  const float top = __half2float(p[y0 * size + x0]) * (1.f - ax) + __half2float(p[y0 * size + x1]) * ax;
  const float bottom = __half2float(p[y1 * size + x0]) * (1.f - ax) + __half2float(p[y1 * size + x1]) * ax;
  return top * (1.f - ay) + bottom * ay;
}

// faces [B, 3, size, size] (RGB in [0, 1]) blended into their frames' regions in place, under
// each frame's mask at its strength (engines::image::blend_with). blockIdx.y: the frame;
// blockIdx.z: 0 luma, 1 chroma (U and V); thread per pixel of that plane's rectangle.
extern "C" __global__ void blend_faces_f16(unsigned char* __restrict__ regions, const FaceJob* __restrict__ jobs,
                                           const __half* __restrict__ faces, int size) {
  LS_PDL_ENTER();
  const FaceJob j = jobs[blockIdx.y];
  const int chroma = blockIdx.z;
  const Rect r = plane_rect(j, regions, chroma);
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= r.w * r.h) return;
  const int px = idx % r.w, py = idx / r.w;
  const float scale = chroma ? 2.f : 1.f;
  const float cx = (r.ox + px + 0.5f) * scale, cy = (r.oy + py + 0.5f) * scale;
  const float u = (cx - j.bx0) / (j.bx1 - j.bx0), v = (cy - j.by0) / (j.by1 - j.by0);
  if (u < 0.f || u >= 1.f || v < 0.f || v >= 1.f) return;
  // engines::image::LowerFace::weight.
  const float m = smoothstep(0.f, j.top_feather, v - j.top) * smoothstep(0.f, j.side_feather, u - j.left) *
                  smoothstep(0.f, j.side_feather, j.right - u) * smoothstep(0.f, j.bottom_feather, 1.f - v) *
                  j.strength;
  if (m <= 0.f) return;
  const __half* face = faces + (long)blockIdx.y * 3 * size * size;
  const float red = face_at(face, size, 0, u, v), g = face_at(face, size, 1, u, v), bl = face_at(face, size, 2, u, v);
  const int at = idx;
  if (!chroma) {
    const float want = 16.f + 65.481f * red + 128.553f * g + 24.966f * bl;
    const float old = r.p[at];
    r.p[at] = (unsigned char)fminf(fmaxf(rintf(old + (want - old) * m), 0.f), 255.f);
  } else {
    unsigned char* pv = r.p + r.w * r.h;
    const float wu = 128.f - 37.797f * red - 74.203f * g + 112.f * bl;
    const float wv = 128.f + 112.f * red - 93.786f * g - 18.214f * bl;
    const float ou = r.p[at], ov = pv[at];
    r.p[at] = (unsigned char)fminf(fmaxf(rintf(ou + (wu - ou) * m), 0.f), 255.f);
    pv[at] = (unsigned char)fminf(fmaxf(rintf(ov + (wv - ov) * m), 0.f), 255.f);
  }
}
