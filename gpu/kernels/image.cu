// The face path's pixel kernels, mirroring engines/src/image.rs (the CPU reference): an I420
// frame's face box resampled bilinearly to the model's RGB input in [-1, 1] (NCHW fp16), and the
// model's face (RGB in [0, 1], NCHW fp16) blended back under a feathered lower-face mask.
// BT.601 limited range; pixel i covers [i, i + 1).
#include <cuda_fp16.h>

__device__ __forceinline__ float sample_u8(const unsigned char* p, int w, int h, float x, float y) {
  const float fx = fminf(fmaxf(x - 0.5f, 0.f), (float)(w - 1));
  const float fy = fminf(fmaxf(y - 0.5f, 0.f), (float)(h - 1));
  const int x0 = (int)floorf(fx), y0 = (int)floorf(fy);
  const int x1 = min(x0 + 1, w - 1), y1 = min(y0 + 1, h - 1);
  const float ax = fx - x0, ay = fy - y0;
  const float top = p[y0 * w + x0] * (1.f - ax) + p[y0 * w + x1] * ax;
  const float bottom = p[y1 * w + x0] * (1.f - ax) + p[y1 * w + x1] * ax;
  return top * (1.f - ay) + bottom * ay;
}

// out [3, size, size]: thread per output pixel.
extern "C" __global__ void crop_i420_rgb_f16(const unsigned char* __restrict__ y, const unsigned char* __restrict__ u,
                                             const unsigned char* __restrict__ v, int w, int h,
                                             float bx0, float by0, float bx1, float by1, int size,
                                             __half* __restrict__ out) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= size * size) return;
  const int ox = idx % size, oy = idx / size;
  const float x = bx0 + (ox + 0.5f) * ((bx1 - bx0) / size);
  const float yy = by0 + (oy + 0.5f) * ((by1 - by0) / size);
  const int cw = (w + 1) / 2, ch = (h + 1) / 2;
  const float c = sample_u8(y, w, h, x, yy) - 16.f;
  const float d = sample_u8(u, cw, ch, x / 2.f, yy / 2.f) - 128.f;
  const float e = sample_u8(v, cw, ch, x / 2.f, yy / 2.f) - 128.f;
  const float rgb[3] = {1.164f * c + 1.596f * e, 1.164f * c - 0.392f * d - 0.813f * e, 1.164f * c + 2.017f * d};
#pragma unroll
  for (int k = 0; k < 3; ++k)
    out[(k * size + oy) * size + ox] = __float2half(fminf(fmaxf(rgb[k], 0.f), 255.f) / 127.5f - 1.f);
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

// One plane (luma: scale 1, one channel; chroma: scale 2, U and V) over the pixel rectangle
// [px0, px0 + nx) x [py0, py0 + ny) of that plane; thread per pixel.
extern "C" __global__ void blend_rgb_i420_f16(unsigned char* __restrict__ a, unsigned char* __restrict__ b,
                                              int stride, float scale, int px0, int py0, int nx, int ny,
                                              float bx0, float by0, float bx1, float by1,
                                              float top, float top_feather, float left, float right,
                                              float side_feather, float bottom_feather,
                                              const __half* __restrict__ face, int size) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= nx * ny) return;
  const int x = px0 + idx % nx, y = py0 + idx / nx;
  const float cx = (x + 0.5f) * scale, cy = (y + 0.5f) * scale;
  const float u = (cx - bx0) / (bx1 - bx0), v = (cy - by0) / (by1 - by0);
  if (u < 0.f || u >= 1.f || v < 0.f || v >= 1.f) return;
  // engines::image::LowerFace::weight.
  const float m = smoothstep(0.f, top_feather, v - top) * smoothstep(0.f, side_feather, u - left) *
                  smoothstep(0.f, side_feather, right - u) * smoothstep(0.f, bottom_feather, 1.f - v);
  if (m <= 0.f) return;
  const float r = face_at(face, size, 0, u, v), g = face_at(face, size, 1, u, v), bl = face_at(face, size, 2, u, v);
  const long at = (long)y * stride + x;
  if (b == nullptr) {
    const float want = 16.f + 65.481f * r + 128.553f * g + 24.966f * bl;
    const float old = a[at];
    a[at] = (unsigned char)fminf(fmaxf(rintf(old + (want - old) * m), 0.f), 255.f);
  } else {
    const float wu = 128.f - 37.797f * r - 74.203f * g + 112.f * bl;
    const float wv = 128.f + 112.f * r - 93.786f * g - 18.214f * bl;
    const float ou = a[at], ov = b[at];
    a[at] = (unsigned char)fminf(fmaxf(rintf(ou + (wu - ou) * m), 0.f), 255.f);
    b[at] = (unsigned char)fminf(fmaxf(rintf(ov + (wv - ov) * m), 0.f), 255.f);
  }
}
