// 3x3 convolutions (stride 1, padding 1, NHWC fp16, fp32 arithmetic) whose input or output has
// only a few channels: the VAE's conv_in from RGB and its conv_out to RGB. A library
// convolution tiles the GEMM's N (output channels) or K (taps x input channels) in widths of 64
// and more, so at 3 real channels of 8 most of its work is padding, and at 256x256 these ran at
// a quarter of the memory bandwidth they need. Here each output value is a short dot product
// on the CUDA cores, the filter in shared memory as fp32.
#include <cuda_fp16.h>

// Few inputs (c <= 8), outputs in whole 8-channel vectors: a thread computes one vector (8
// output channels of one pixel) over the epilogues' grid (vector_grid: grid y the image, each
// block `per_block` vectors from blockIdx.x * per_block, threads a multiple of o / 8, so a
// thread keeps its channel vector), adds the bias and, with `partial`, sums the result per
// group for the group norm that reads it (GroupSums, the convolution epilogue's layout).
// w is [o][3][3][c]; shared memory holds it as [tap * c + ci][half][o / 8][4] so that the 16
// lanes of a pixel read 16 consecutive float4s.
#define FEW_IN_MAX_WEIGHTS 6144
extern "C" __global__ void conv3x3_few_in_nhwc_f16x8(const __half* __restrict__ x, const __half* __restrict__ w,
                                                     const __half* __restrict__ bias, uint4* __restrict__ y, int h,
                                                     int wd, int c, int o, float2* __restrict__ partial, int groups,
                                                     int per_block) {
  LS_PDL_ENTER();
  __shared__ __align__(16) float s_w[FEW_IN_MAX_WEIGHTS];
  __shared__ float s_sum[64], s_sq[64];
  const int o8 = o / 8, k = 9 * c;
  for (int i = threadIdx.x; i < k * o; i += blockDim.x) {
    const int oc = i / k, kk = i % k;  // w's own order: coalesced reads
    const int og = oc / 8, hf = (oc / 4) & 1, e = oc & 3;
    s_w[((kk * 2 + hf) * o8 + og) * 4 + e] = __half2float(w[i]);
  }
  const int og = threadIdx.x % o8;
  // Its constructor syncs the block: the filter is in shared memory after it.
  GroupSums sums(s_sum, s_sq, partial ? groups : 0, og * 8, partial ? o / groups : 8);
  float b[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) b[j] = bias ? __half2float(bias[og * 8 + j]) : 0.f;
  const int image8 = h * wd * o8;
  const int v0 = blockIdx.x * per_block + threadIdx.x;
  const int v1 = min(image8, (blockIdx.x + 1) * per_block);
  const __half* xi = x + (long)blockIdx.y * h * wd * c;
  uint4* yi = y + (long)blockIdx.y * image8;
  const float4* wv = reinterpret_cast<const float4*>(s_w);
  for (int v = v0; v < v1; v += blockDim.x) {
    const int p = v / o8;
    const int px = p % wd, py = p / wd;
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = b[j];
#pragma unroll
    for (int dy = 0; dy < 3; ++dy) {
      const int yy = py + dy - 1;
      if (yy < 0 || yy >= h) continue;
#pragma unroll
      for (int dx = 0; dx < 3; ++dx) {
        const int xx = px + dx - 1;
        if (xx < 0 || xx >= wd) continue;
        const __half* src = xi + ((long)yy * wd + xx) * c;
        const int kk0 = (dy * 3 + dx) * c;
        for (int ci = 0; ci < c; ++ci) {
          const float xv = __half2float(src[ci]);
          const float4 lo = wv[((kk0 + ci) * 2) * o8 + og];
          const float4 hi = wv[((kk0 + ci) * 2 + 1) * o8 + og];
          acc[0] += xv * lo.x; acc[1] += xv * lo.y; acc[2] += xv * lo.z; acc[3] += xv * lo.w;
          acc[4] += xv * hi.x; acc[5] += xv * hi.y; acc[6] += xv * hi.z; acc[7] += xv * hi.w;
        }
      }
    }
    uint4 out;
    __half2* oh = reinterpret_cast<__half2*>(&out);
#pragma unroll
    for (int j = 0; j < 4; ++j) oh[j] = __floats2half2_rn(acc[2 * j], acc[2 * j + 1]);
    if (partial) sums.add(oh);
    yi[v] = out;
  }
  if (partial) sums.store(partial, groups, v0 < v1);
}

// Few outputs: y [pixels, 8] of which the first OUT channels are computed (the filter's rows
// beyond the real outputs are zero, so OUT may round them up) and the rest are the bias. The
// input's c / 8 channel vectors of a pixel spread over LP = min(c / 8, 32) lanes (a power of
// two), so a warp reads whole pixels; each lane sums its channels over the 3x3 window and the
// pixel's lanes add up by shuffles. Blocks loop over the pixels, so that few of them load the
// filter ([tap][j][c / 8][OUT] as fp32, lanes of a pixel reading consecutive entries).
#define FEW_OUT_MAX_WEIGHTS 9216
template <int OUT>
__device__ void conv3x3_few_out(const uint4* __restrict__ x, const __half* __restrict__ w,
                                const __half* __restrict__ bias, uint4* __restrict__ y, long pixels, int h, int wd,
                                int c) {
  __shared__ __align__(16) float s_w[FEW_OUT_MAX_WEIGHTS];
  const int c8 = c / 8;
  for (int i = threadIdx.x; i < OUT * 9 * c; i += blockDim.x) {
    const int oc = i / (9 * c), r = i % (9 * c);  // w is [8][3][3][c]: its first OUT rows
    const int tap = r / c, ci = r % c;
    s_w[((tap * 8 + (ci & 7)) * c8 + ci / 8) * OUT + oc] = __half2float(w[i]);
  }
  __syncthreads();
  const int lp = c8 < 32 ? c8 : 32;
  const int lane = threadIdx.x & 31, sub = lane % lp;
  const int per_block = blockDim.x / lp;
  float b[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) b[j] = bias ? __half2float(bias[j]) : 0.f;
  const long image = (long)h * wd;
  for (long p0 = (long)blockIdx.x * per_block; p0 < pixels; p0 += (long)gridDim.x * per_block) {
    const long p = p0 + threadIdx.x / lp;
    const bool live = p < pixels;
    const long n = p / image;
    const int q = (int)(p % image);
    const int px = q % wd, py = q / wd;
    float acc[OUT];
#pragma unroll
    for (int o = 0; o < OUT; ++o) acc[o] = 0.f;
    if (live) {
      for (int tap = 0; tap < 9; ++tap) {
        const int yy = py + tap / 3 - 1, xx = px + tap % 3 - 1;
        if (yy < 0 || yy >= h || xx < 0 || xx >= wd) continue;
        const uint4* src = x + ((n * h + yy) * wd + xx) * c8;
        for (int cv = sub; cv < c8; cv += lp) {
          uint4 xv = src[cv];
          const __half2* xh = reinterpret_cast<const __half2*>(&xv);
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            const float2 f = __half22float2(xh[jj]);
            const float* w0 = s_w + ((tap * 8 + 2 * jj) * c8 + cv) * OUT;
            const float* w1 = s_w + ((tap * 8 + 2 * jj + 1) * c8 + cv) * OUT;
#pragma unroll
            for (int o = 0; o < OUT; ++o) acc[o] += f.x * w0[o] + f.y * w1[o];
          }
        }
      }
    }
    // The pixel's lanes are aligned groups of lp (a power of two): butterfly within them.
#pragma unroll
    for (int o = 0; o < OUT; ++o)
      for (int off = lp / 2; off > 0; off >>= 1) acc[o] += __shfl_xor_sync(0xffffffff, acc[o], off);
    if (live && sub == 0) {
      float r[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) r[j] = b[j];
#pragma unroll
      for (int o = 0; o < OUT; ++o) r[o] += acc[o];
      uint4 out;
      __half2* oh = reinterpret_cast<__half2*>(&out);
#pragma unroll
      for (int j = 0; j < 4; ++j) oh[j] = __floats2half2_rn(r[2 * j], r[2 * j + 1]);
      y[p] = out;
    }
  }
}

extern "C" __global__ void conv3x3_few_out4_nhwc_f16(const uint4* __restrict__ x, const __half* __restrict__ w,
                                                     const __half* __restrict__ bias, uint4* __restrict__ y,
                                                     long pixels, int h, int wd, int c) {
  LS_PDL_ENTER();
  conv3x3_few_out<4>(x, w, bias, y, pixels, h, wd, c);
}

extern "C" __global__ void conv3x3_few_out8_nhwc_f16(const uint4* __restrict__ x, const __half* __restrict__ w,
                                                     const __half* __restrict__ bias, uint4* __restrict__ y,
                                                     long pixels, int h, int wd, int c) {
  LS_PDL_ENTER();
  conv3x3_few_out<8>(x, w, bias, y, pixels, h, wd, c);
}
