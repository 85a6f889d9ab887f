// LayerNorm over the last axis of fp16 rows, fp32 statistics: one warp per row.
#include <cuda_fp16.h>

extern "C" __global__ void layer_norm_f16(
    const __half* __restrict__ x, const __half* __restrict__ gamma, const __half* __restrict__ beta,
    __half* __restrict__ y, int rows, int cols, float eps) {
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
