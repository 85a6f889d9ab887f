// GroupNorm (+ optional SiLU) over NCHW fp16 activations, fp32 statistics.
// One block per (image, group): pass 1 accumulates sum and sum of squares, pass 2 normalises.
#include <cuda_fp16.h>

extern "C" __global__ void group_norm_f16(
    const __half* __restrict__ x, const __half* __restrict__ gamma, const __half* __restrict__ beta,
    __half* __restrict__ y, int channels, int groups, int inner, float eps, int silu) {
  const int n = blockIdx.x / groups;
  const int g = blockIdx.x % groups;
  const int cg = channels / groups;
  const long base = ((long)n * channels + (long)g * cg) * inner;
  const int count = cg * inner;

  float sum = 0.f, sq = 0.f;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    float v = __half2float(x[base + i]);
    sum += v;
    sq += v * v;
  }
  __shared__ float s_sum[32], s_sq[32];
  for (int off = 16; off > 0; off >>= 1) {
    sum += __shfl_down_sync(0xffffffff, sum, off);
    sq += __shfl_down_sync(0xffffffff, sq, off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { s_sum[warp] = sum; s_sq[warp] = sq; }
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    sum = lane < warps ? s_sum[lane] : 0.f;
    sq = lane < warps ? s_sq[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) {
      sum += __shfl_down_sync(0xffffffff, sum, off);
      sq += __shfl_down_sync(0xffffffff, sq, off);
    }
    if (lane == 0) { s_sum[0] = sum; s_sq[0] = sq; }
  }
  __syncthreads();
  const float mean = s_sum[0] / count;
  const float var = fmaxf(s_sq[0] / count - mean * mean, 0.f);
  const float inv = rsqrtf(var + eps);

  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const int c = g * cg + i / inner;
    float v = (__half2float(x[base + i]) - mean) * inv * __half2float(gamma[c]) + __half2float(beta[c]);
    if (silu) v = v / (1.f + __expf(-v));
    y[base + i] = __float2half(v);
  }
}
