// Attention runs as two batched cuBLASLt GEMMs per layer (scores = q kᵀ / sqrt(d), out = p v)
// around this row softmax, in place over the fp16 scores, fp32 arithmetic. One warp per row.
#include <cuda_fp16.h>

// A row lives in registers as PAIRS half2 values per lane (64 * PAIRS columns at most): read
// once, written once. Instantiated for 1024 (the UNet's and the VAE's 32x32 tokens) and 1536
// (whisper's 1500 frames) columns; cols must be even.
template <int PAIRS>
__device__ void softmax_row(__half2* __restrict__ r, int pairs, int lane) {
  float2 v[PAIRS];
  float m = -3.402823466e+38f;  // -FLT_MAX: NVRTC has no math.h INFINITY
#pragma unroll
  for (int j = 0; j < PAIRS; ++j) {
    const int i = lane + 32 * j;
    v[j] = i < pairs ? __half22float2(r[i]) : make_float2(-3.402823466e+38f, -3.402823466e+38f);
    m = fmaxf(m, fmaxf(v[j].x, v[j].y));
  }
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < PAIRS; ++j) {
    const bool in = lane + 32 * j < pairs;
    v[j].x = in ? __expf(v[j].x - m) : 0.f;
    v[j].y = in ? __expf(v[j].y - m) : 0.f;
    sum += v[j].x + v[j].y;
  }
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, off);
  const float inv = 1.f / sum;
#pragma unroll
  for (int j = 0; j < PAIRS; ++j) {
    const int i = lane + 32 * j;
    if (i < pairs) r[i] = __floats2half2_rn(v[j].x * inv, v[j].y * inv);
  }
}

extern "C" __global__ void softmax_rows_f16x2_1024(__half2* __restrict__ x, long rows, int cols) {
  const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  if (row >= rows) return;
  softmax_row<16>(x + row * (cols / 2), cols / 2, threadIdx.x & 31);
}

extern "C" __global__ void softmax_rows_f16x2_1536(__half2* __restrict__ x, long rows, int cols) {
  const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  if (row >= rows) return;
  softmax_row<24>(x + row * (cols / 2), cols / 2, threadIdx.x & 31);
}

// Any width, three passes over the row (odd widths).
extern "C" __global__ void softmax_rows_f16(__half* __restrict__ x, long rows, int cols) {
  const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  __half* r = x + row * cols;
  float m = -3.402823466e+38f;
  for (int i = lane; i < cols; i += 32) m = fmaxf(m, __half2float(r[i]));
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
  float sum = 0.f;
  for (int i = lane; i < cols; i += 32) sum += __expf(__half2float(r[i]) - m);
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, off);
  const float inv = 1.f / sum;
  for (int i = lane; i < cols; i += 32) r[i] = __float2half(__expf(__half2float(r[i]) - m) * inv);
}
