// LayerNorm over the last axis of fp16 rows, fp32 statistics: one warp per row.
#include <cuda_fp16.h>

extern "C" __global__ void layer_norm_f16(
    const __half* __restrict__ x, const __half* __restrict__ gamma, const __half* __restrict__ beta,
    __half* __restrict__ y, int rows, int cols, float eps) {
  LS_PDL_ENTER();
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const __half* xr = x + (long)row * cols;
  float sum = 0.f, sq = 0.f;
  for (int i = lane; i < cols; i += 32) {
    float v = __half2float(xr[i]);
    sum += v;
    sq += v * v;
  }
  for (int off = 16; off > 0; off >>= 1) {
    sum += __shfl_xor_sync(0xffffffff, sum, off);
    sq += __shfl_xor_sync(0xffffffff, sq, off);
  }
  const float mean = sum / cols;
  const float inv = rsqrtf(fmaxf(sq / cols - mean * mean, 0.f) + eps);
  __half* yr = y + (long)row * cols;
  for (int i = lane; i < cols; i += 32) {
    yr[i] = __float2half((__half2float(xr[i]) - mean) * inv * __half2float(gamma[i]) + __half2float(beta[i]));
  }
}

// The same, eight columns per load (cols % 8 == 0, x, y, gamma and beta 16-byte aligned): a
// row of the UNet's 320..1280 or whisper's 384 columns is one to five 16-byte loads per lane
// instead of ten to forty 2-byte ones; the second pass re-reads the row from L1.
extern "C" __global__ void layer_norm_f16x8(
    const uint4* __restrict__ x, const uint4* __restrict__ gamma, const uint4* __restrict__ beta,
    uint4* __restrict__ y, int rows, int cols8, float eps) {
  LS_PDL_ENTER();
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const uint4* xr = x + (long)row * cols8;
  float sum = 0.f, sq = 0.f;
  for (int i = lane; i < cols8; i += 32) {
    const uint4 raw = xr[i];
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __half22float2(h[k]);
      sum += f.x + f.y;
      sq += f.x * f.x + f.y * f.y;
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    sum += __shfl_xor_sync(0xffffffff, sum, off);
    sq += __shfl_xor_sync(0xffffffff, sq, off);
  }
  const float cols = 8.f * cols8, mean = sum / cols;
  const float inv = rsqrtf(fmaxf(sq / cols - mean * mean, 0.f) + eps);
  uint4* yr = y + (long)row * cols8;
  for (int i = lane; i < cols8; i += 32) {
    uint4 raw = xr[i];
    const uint4 gr = gamma[i], br = beta[i];
    __half2* h = reinterpret_cast<__half2*>(&raw);
    const __half2* gh = reinterpret_cast<const __half2*>(&gr);
    const __half2* bh = reinterpret_cast<const __half2*>(&br);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __half22float2(h[k]), g = __half22float2(gh[k]), b = __half22float2(bh[k]);
      h[k] = __floats2half2_rn(fmaf((f.x - mean) * inv, g.x, b.x), fmaf((f.y - mean) * inv, g.y, b.y));
    }
    yr[i] = raw;
  }
}
