// Attention runs as two batched cuBLASLt GEMMs per layer (scores = q kᵀ / sqrt(d), out = p v)
// around this row softmax, in place over the fp16 scores, fp32 arithmetic. One warp per row.
#include <cuda_fp16.h>

#define PER_LANE 48  // rows up to 1536 columns stay in registers (whisper's 1500 keys)

extern "C" __global__ void softmax_rows_f16(__half* __restrict__ x, long rows, int cols) {
  const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  __half* r = x + row * cols;
  float v[PER_LANE];
  float m = -3.402823466e+38f;  // -FLT_MAX: NVRTC has no math.h INFINITY
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int i = lane + 32 * j;
    v[j] = i < cols ? __half2float(r[i]) : -3.402823466e+38f;
    m = fmaxf(m, v[j]);
  }
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    v[j] = lane + 32 * j < cols ? __expf(v[j] - m) : 0.f;
    sum += v[j];
  }
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, off);
  const float inv = 1.f / sum;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int i = lane + 32 * j;
    if (i < cols) r[i] = __float2half(v[j] * inv);
  }
}
