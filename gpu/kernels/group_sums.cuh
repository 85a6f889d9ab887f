// Group-norm sums written by the kernels that produce a norm's input (the convolution
// epilogues, the subpixel interleave, the small convolutions), so the norm need not read its
// input an extra time for them.
#include <cuda_fp16.h>

// A block's per-group (sum, sum of squares) of the values its threads write, for the GroupNorm
// that reads them next: block b of image n writes partial[(n * gridDim.x + b) * groups + g].
// groups <= 64, group width >= 4, so a thread's eight channels from c0 span at most two groups;
// it sums in registers and adds to the block's shared sums once.
struct GroupSums {
  float* s_sum;
  float* s_sq;
  int g0;
  bool first[4];
  float sum0 = 0.f, sq0 = 0.f, sum1 = 0.f, sq1 = 0.f;

  // Every thread of the block constructs it (it clears the shared sums and syncs).
  __device__ GroupSums(float* sum, float* sq, int groups, int c0, int cg) : s_sum(sum), s_sq(sq), g0(c0 / cg) {
    for (int g = threadIdx.x; g < groups; g += blockDim.x) { s_sum[g] = 0.f; s_sq[g] = 0.f; }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) first[j] = (c0 + 2 * j) / cg == g0;
  }

  // Eight fp16 values as the norm will read them.
  __device__ void add(const __half2* h) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 o = __half22float2(h[j]);
      if (first[j]) { sum0 += o.x + o.y; sq0 += o.x * o.x + o.y * o.y; }
      else { sum1 += o.x + o.y; sq1 += o.x * o.x + o.y * o.y; }
    }
  }

  // Every thread of the block calls it; `active`: the thread summed anything.
  __device__ void store(float2* partial, int groups, bool active) {
    if (active) {
      atomicAdd(&s_sum[g0], sum0);
      atomicAdd(&s_sq[g0], sq0);
      if (!first[3]) {
        atomicAdd(&s_sum[g0 + 1], sum1);
        atomicAdd(&s_sq[g0 + 1], sq1);
      }
    }
    __syncthreads();
    for (int g = threadIdx.x; g < groups; g += blockDim.x)
      partial[((long)blockIdx.y * gridDim.x + blockIdx.x) * groups + g] = make_float2(s_sum[g], s_sq[g]);
  }
};
