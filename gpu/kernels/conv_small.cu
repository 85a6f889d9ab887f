// 3x3 convolutions (stride 1, padding 1, NHWC fp16, fp32 arithmetic) whose input or output has
// only a few channels: the VAE's conv_in from RGB and its conv_out to RGB. A library
// convolution tiles the GEMM's N (output channels) or K (taps x input channels) in widths of 64
// and more, so at 3 real channels of 8 most of its work is padding, and at 256x256 these ran at
// a quarter of the memory bandwidth they need. Here each output value is a short dot product
// on the CUDA cores, the filter in shared memory as fp32.
#include <cuda_fp16.h>

// Few inputs (RGB: c = 3), outputs in whole 8-channel vectors: a thread computes one channel
// vector (8 outputs) of FEW_IN_PIXELS pixels at once, so each filter vector it reads from
// shared memory serves them all: shared-memory bandwidth, not arithmetic, bounds this kernel
// otherwise, which is also why the filter stays fp16 there ([tap * 3 + ci][o / 8][8], the 16
// lanes of a pixel reading 16 consecutive vectors). The vectors are those of the epilogues'
// grid (vector_grid: grid y the image, each block `per_block` vectors from blockIdx.x *
// per_block, threads a multiple of o / 8, so a thread keeps its channel vector; its pixels are
// blockDim.x / (o / 8) apart). It adds the bias and, with `partial`, sums the result per group
// for the group norm that reads it (GroupSums, the convolution epilogue's layout). w is
// [o][3][3][3].
#define FEW_IN_MAX_WEIGHTS 6144
#define FEW_IN_PIXELS 4
extern "C" __global__ void __launch_bounds__(256, 2) conv3x3_few_in_nhwc_f16x8(const __half* __restrict__ x, const __half* __restrict__ w,
                                                     const __half* __restrict__ bias, uint4* __restrict__ y, int h,
                                                     int wd, int o, float2* __restrict__ partial, int groups,
                                                     int per_block) {
  LS_PDL_ENTER();
  __shared__ __align__(16) __half s_w[FEW_IN_MAX_WEIGHTS];
  __shared__ float s_sum[64], s_sq[64];
  const int o8 = o / 8;
  for (int i = threadIdx.x; i < 27 * o; i += blockDim.x) {
    const int oc = i / 27, kk = i % 27;  // w's own order: coalesced reads
    s_w[kk * o + oc] = w[i];
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
  const int step = blockDim.x;
  const __half* xi = x + (long)blockIdx.y * h * wd * 3;
  uint4* yi = y + (long)blockIdx.y * image8;
  const uint4* wv = reinterpret_cast<const uint4*>(s_w);
  for (int v = v0; v < v1; v += FEW_IN_PIXELS * step) {
    int px[FEW_IN_PIXELS], py[FEW_IN_PIXELS];
    float acc[FEW_IN_PIXELS][8];
#pragma unroll
    for (int k = 0; k < FEW_IN_PIXELS; ++k) {
      const int p = (v + k * step) / o8;
      px[k] = p % wd;
      // A vector past the block's range reads nothing (its row is out of the image).
      py[k] = v + k * step < v1 ? p / wd : -2;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[k][j] = b[j];
    }
#pragma unroll
    for (int tap = 0; tap < 9; ++tap) {
      float wf[3][8];
#pragma unroll
      for (int ci = 0; ci < 3; ++ci) {
        uint4 raw = wv[(tap * 3 + ci) * o8 + og];
        const __half2* wh = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = __half22float2(wh[j]);
          wf[ci][2 * j] = f.x;
          wf[ci][2 * j + 1] = f.y;
        }
      }
#pragma unroll
      for (int k = 0; k < FEW_IN_PIXELS; ++k) {
        const int yy = py[k] + tap / 3 - 1, xx = px[k] + tap % 3 - 1;
        if (yy < 0 || yy >= h || xx < 0 || xx >= wd) continue;
        const __half* src = xi + ((long)yy * wd + xx) * 3;
#pragma unroll
        for (int ci = 0; ci < 3; ++ci) {
          const float xv = __half2float(src[ci]);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[k][j] += xv * wf[ci][j];
        }
      }
    }
#pragma unroll
    for (int k = 0; k < FEW_IN_PIXELS; ++k) {
      if (v + k * step >= v1) break;
      uint4 out;
      __half2* oh = reinterpret_cast<__half2*>(&out);
#pragma unroll
      for (int j = 0; j < 4; ++j) oh[j] = __floats2half2_rn(acc[k][2 * j], acc[k][2 * j + 1]);
      if (partial) sums.add(oh);
      yi[v + k * step] = out;
    }
  }
  if (partial) sums.store(partial, groups, v0 < v1);
}

// Few outputs: y [pixels, 8] of which the first OUT channels are computed (the filter's rows
// beyond the real outputs are zero, so OUT may round them up) and the rest are the bias. The
// input's c / 8 channel vectors of a pixel spread over LP = min(c / 8, 32) lanes (a power of
// two), so a warp reads whole pixels, and a lane group takes a strip of FEW_OUT_PIXELS pixels of
// one row: each input vector it loads serves up to three of them, and each filter value it
// reads from shared memory all of them. The pixels' lanes add up by shuffles. Blocks loop over
// the strips, so that few of them load the filter ([tap][j][c / 8][OUT] as fp32, the lanes of
// a pixel reading consecutive entries).
#define FEW_OUT_MAX_WEIGHTS 9216
#define FEW_OUT_PIXELS 8
template <int OUT>
__device__ void conv3x3_few_out(const uint4* __restrict__ x, const __half* __restrict__ w,
                                const __half* __restrict__ bias, uint4* __restrict__ y, int n, int h, int wd,
                                int c) {
  constexpr int P = FEW_OUT_PIXELS;
  __shared__ __align__(16) float s_w[FEW_OUT_MAX_WEIGHTS];
  const int c8 = c / 8;
  for (int i = threadIdx.x; i < OUT * 9 * c; i += blockDim.x) {
    const int oc = i / (9 * c), r = i % (9 * c);  // w is [8][3][3][c]: its first OUT rows
    const int tap = r / c, ci = r % c;
    s_w[((tap * 8 + (ci & 7)) * c8 + ci / 8) * OUT + oc] = __half2float(w[i]);
  }
  __syncthreads();
  const int lp = c8 < 32 ? c8 : 32;
  const int sub = (threadIdx.x & 31) % lp;
  const int per_block = blockDim.x / lp;
  float b[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) b[j] = bias ? __half2float(bias[j]) : 0.f;
  const int strips_row = (wd + P - 1) / P;
  const long strips = (long)n * h * strips_row;
  for (long s0 = (long)blockIdx.x * per_block; s0 < strips; s0 += (long)gridDim.x * per_block) {
    const long s = s0 + threadIdx.x / lp;
    const bool live = s < strips;
    const long row = s / strips_row;  // image * h + py
    const int x0 = (int)(s % strips_row) * P, py = (int)(row % h);
    float acc[P][OUT];
#pragma unroll
    for (int k = 0; k < P; ++k)
#pragma unroll
      for (int o = 0; o < OUT; ++o) acc[k][o] = 0.f;
    if (live) {
      for (int dy = 0; dy < 3; ++dy) {
        const int yy = py + dy - 1;
        if (yy < 0 || yy >= h) continue;
        const uint4* src = x + (row + dy - 1) * wd * c8;
        for (int cv = sub; cv < c8; cv += lp) {
          // The strip's P + 2 columns of this channel vector (zero outside the image).
          uint4 col[P + 2];
#pragma unroll
          for (int k = 0; k < P + 2; ++k) {
            const int xx = x0 + k - 1;
            col[k] = xx >= 0 && xx < wd ? src[(long)xx * c8 + cv] : make_uint4(0, 0, 0, 0);
          }
#pragma unroll
          for (int dx = 0; dx < 3; ++dx) {
            const float* wt = s_w + ((dy * 3 + dx) * 8 * c8 + cv) * OUT;
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
              float w0[OUT], w1[OUT];
#pragma unroll
              for (int o = 0; o < OUT; ++o) {
                w0[o] = wt[(2 * jj) * c8 * OUT + o];
                w1[o] = wt[(2 * jj + 1) * c8 * OUT + o];
              }
#pragma unroll
              for (int k = 0; k < P; ++k) {
                const float2 f = __half22float2(reinterpret_cast<const __half2*>(&col[k + dx])[jj]);
#pragma unroll
                for (int o = 0; o < OUT; ++o) acc[k][o] += f.x * w0[o] + f.y * w1[o];
              }
            }
          }
        }
      }
    }
    // The strip's lanes are an aligned group of lp (a power of two): butterfly within it.
#pragma unroll
    for (int k = 0; k < P; ++k)
#pragma unroll
      for (int o = 0; o < OUT; ++o)
        for (int off = lp / 2; off > 0; off >>= 1) acc[k][o] += __shfl_xor_sync(0xffffffff, acc[k][o], off);
    if (live && sub == 0) {
#pragma unroll
      for (int k = 0; k < P; ++k) {
        if (x0 + k >= wd) break;
        float r[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) r[j] = b[j];
#pragma unroll
        for (int o = 0; o < OUT; ++o) r[o] += acc[k][o];
        uint4 out;
        __half2* oh = reinterpret_cast<__half2*>(&out);
#pragma unroll
        for (int j = 0; j < 4; ++j) oh[j] = __floats2half2_rn(r[2 * j], r[2 * j + 1]);
        y[row * wd + x0 + k] = out;
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(256, 2) conv3x3_few_out4_nhwc_f16(const uint4* __restrict__ x, const __half* __restrict__ w,
                                                     const __half* __restrict__ bias, uint4* __restrict__ y, int n,
                                                     int h, int wd, int c) {
  LS_PDL_ENTER();
  conv3x3_few_out<4>(x, w, bias, y, n, h, wd, c);
}

extern "C" __global__ void conv3x3_few_out8_nhwc_f16(const uint4* __restrict__ x, const __half* __restrict__ w,
                                                     const __half* __restrict__ bias, uint4* __restrict__ y, int n,
                                                     int h, int wd, int c) {
  LS_PDL_ENTER();
  conv3x3_few_out<8>(x, w, bias, y, n, h, wd, c);
}
