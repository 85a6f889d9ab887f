// GroupNorm (+ optional SiLU) over NHWC fp16 activations, fp32 statistics, in three kernels so
// that a 256x256 image spreads over the whole GPU instead of one block per group:
// per-chunk partial sums, per-(image, group) mean and 1/std, then the elementwise apply.
#include <cuda_fp16.h>

// Grid (chunks, n). Block b sums pixels [b*chunk, (b+1)*chunk) of image n. Work unit u covers
// group u % groups of pixel u / groups; blockDim is a multiple of groups, so each thread keeps one
// group for the whole loop and a warp reads whole pixel rows.
extern "C" __global__ void group_norm_nhwc_stats_f16(const __half* __restrict__ x, float2* __restrict__ partial,
                                                     int hw, int c, int groups, int chunk, int vec8) {
  LS_PDL_ENTER();
  __shared__ float s_sum[1024], s_sq[1024];
  const int n = blockIdx.y, s = blockIdx.x;
  const int p0 = s * chunk, p1 = min(hw, p0 + chunk);
  const int cg = c / groups;
  const __half* base = x + (long)n * hw * c;
  float sum = 0.f, sq = 0.f;
  const int g = threadIdx.x % groups;
  const int units = max(p1 - p0, 0) * groups;
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    const __half* e = base + (long)(p0 + u / groups) * c + g * cg;
    if (vec8) {  // cg % 8 == 0 and 16-byte aligned rows: whole uint4 loads
      for (int i = 0; i < cg; i += 8) {
        const uint4 raw = *reinterpret_cast<const uint4*>(e + i);
        const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = __half22float2(h[j]);
          sum += f.x + f.y;
          sq += f.x * f.x + f.y * f.y;
        }
      }
    } else {
      for (int i = 0; i < cg; ++i) {
        const float v = __half2float(e[i]);
        sum += v;
        sq += v * v;
      }
    }
  }
  s_sum[threadIdx.x] = sum;
  s_sq[threadIdx.x] = sq;
  __syncthreads();
  if (threadIdx.x < groups) {
    for (int j = threadIdx.x + groups; j < blockDim.x; j += groups) {
      sum += s_sum[j];
      sq += s_sq[j];
    }
    partial[((long)n * gridDim.x + s) * groups + threadIdx.x] = make_float2(sum, sq);
  }
}

// One warp per (image, group): stats = (mean, 1/sqrt(var + eps)). The lanes split the chunks,
// so the partial sums load in parallel instead of one dependent load after another.
extern "C" __global__ void group_norm_nhwc_finalize(const float2* __restrict__ partial, float2* __restrict__ stats,
                                                    int n, int groups, int chunks, float count, float eps) {
  LS_PDL_ENTER();
  const int t = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (t >= n * groups) return;
  const int img = t / groups, g = t % groups;
  float sum = 0.f, sq = 0.f;
  for (int s = lane; s < chunks; s += 32) {
    const float2 p = partial[((long)img * chunks + s) * groups + g];
    sum += p.x;
    sq += p.y;
  }
  for (int off = 16; off > 0; off >>= 1) {
    sum += __shfl_xor_sync(0xffffffff, sum, off);
    sq += __shfl_xor_sync(0xffffffff, sq, off);
  }
  if (lane == 0) {
    const float mean = sum / count;
    stats[t] = make_float2(mean, rsqrtf(fmaxf(sq / count - mean * mean, 0.f) + eps));
  }
}

// Eight channels of one pixel normalised in place: v * scale + shift per channel (the norm and
// its gamma and beta as one multiply-add), then SiLU.
__device__ __forceinline__ void gn_apply8(uint4& v, const float* scale, const float* shift, int silu) {
  __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 f = __half22float2(h[j]);
    f.x = fmaf(f.x, scale[2 * j], shift[2 * j]);
    f.y = fmaf(f.y, scale[2 * j + 1], shift[2 * j + 1]);
    if (silu) {
      f.x = __fdividef(f.x, 1.f + __expf(-f.x));
      f.y = __fdividef(f.y, 1.f + __expf(-f.y));
    }
    h[j] = __floats2half2_rn(f.x, f.y);
  }
}

// y = (x - mean) / std * gamma + beta (then SiLU), eight channels per thread (c % 8 == 0,
// 16-byte aligned). Grid (blocks per image, n); each block covers per_block vectors of one image.
// blockDim and per_block are multiples of c / 8, so a thread keeps the same eight channels for
// its whole loop: their scale and shift are computed once, in registers, and the loop is one
// load, eight FMAs (+ SiLU) and one store per vector — bound by memory, not by index math.
extern "C" __global__ void group_norm_nhwc_apply_f16x8(const uint4* __restrict__ x, const float2* __restrict__ stats,
                                                       const __half* __restrict__ gamma, const __half* __restrict__ beta,
                                                       uint4* __restrict__ y, int image8, int c, int groups, int silu,
                                                       int per_block) {
  LS_PDL_ENTER();
  const int v0 = blockIdx.x * per_block + threadIdx.x;
  const int v1 = min(image8, (blockIdx.x + 1) * per_block);
  if (v0 >= v1) return;
  const int c0 = (v0 % (c / 8)) * 8;
  const int cg = c / groups;
  const float2* st = stats + (long)blockIdx.y * groups;
  float scale[8], shift[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float2 s = st[(c0 + k) / cg];
    scale[k] = s.y * __half2float(gamma[c0 + k]);
    shift[k] = __half2float(beta[c0 + k]) - s.x * scale[k];
  }
  const long base = (long)blockIdx.y * image8;
  for (int v = v0; v < v1; v += blockDim.x) {
    uint4 xv = x[base + v];
    gn_apply8(xv, scale, shift, silu);
    y[base + v] = xv;
  }
}

// y = (x - mean) / std * gamma + beta (then SiLU), two channels per thread (c even).
extern "C" __global__ void group_norm_nhwc_apply_f16(const __half2* __restrict__ x, const float2* __restrict__ stats,
                                                     const __half* __restrict__ gamma, const __half* __restrict__ beta,
                                                     __half2* __restrict__ y, long n2, long hw, int c, int groups, int silu) {
  LS_PDL_ENTER();
  long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n2) return;
  const int ch = (int)((idx * 2) % c);
  const long img = (idx * 2) / (hw * c);
  const float2 st = stats[img * groups + ch / (c / groups)];
  float2 v = __half22float2(x[idx]);
  v.x = (v.x - st.x) * st.y * __half2float(gamma[ch]) + __half2float(beta[ch]);
  v.y = (v.y - st.x) * st.y * __half2float(gamma[ch + 1]) + __half2float(beta[ch + 1]);
  if (silu) {
    v.x = v.x / (1.f + __expf(-v.x));
    v.y = v.y / (1.f + __expf(-v.y));
  }
  y[idx] = __floats2half2_rn(v.x, v.y);
}

// Thread-block clusters (sm_90): the blocks of one group sum their parts, then each reads the
// others' partial sums from their shared memory. `cluster_done` tells the others this block has
// read theirs; `cluster_leave` waits until all have, since a block's shared memory must outlive
// every read of it.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_done() { asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_leave() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }
__device__ __forceinline__ float2 cluster_load(const float2* p, unsigned rank) {
  const unsigned local = (unsigned)__cvta_generic_to_shared(p);
  unsigned remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
  float2 v;
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(remote) : "memory");
  return v;
}
#else
__device__ __forceinline__ void cluster_sync() {}
__device__ __forceinline__ void cluster_done() {}
__device__ __forceinline__ void cluster_leave() {}
__device__ __forceinline__ float2 cluster_load(const float2* p, unsigned) { return *p; }
#endif

// A whole GroupNorm in one launch, `parts` blocks per (group, image), for groups small enough
// that one block reads its part twice (the second time from L2) faster than three launches
// cost: the UNet's 4x4 .. 32x32 images at every batch. With one part a block per group; with
// more (a cluster of `parts` blocks, where one image a batch would leave most SMs idle), block
// `part` takes pixels [part * hw / parts, (part + 1) * hw / parts) and the cluster shares its
// sums. x is read V channels at a time (V = 8: uint4, the group width a multiple of 8 and rows
// 16-byte aligned; V = 2: half2); the block sums the group, then normalises it (then SiLU).
// Statistics in fp32.
//
// With `cols` (not null) the result goes nowhere else but into the patch matrix of the kxk,
// stride-1, padding-(k-1)/2 convolution that reads it (the layout layout.cu's im2col writes:
// row (image, oy, ox), column (ky, kx, channel)): each value lands in the up to k*k rows whose
// window covers its pixel, and each pixel's thread writes the zeros of the taps its own
// window takes from outside the image. The im2col launch before the convolution's GEMM goes.
template <int V>
__device__ void group_norm_small(const __half* __restrict__ x, const __half* __restrict__ gamma,
                                 const __half* __restrict__ beta, __half* __restrict__ y, int hw,
                                 int c, int groups, float eps, int silu, int parts, __half* __restrict__ cols,
                                 int wd, int kk) {
  __shared__ float s_sum[32], s_sq[32];
  __shared__ float2 s_part;
  const int g = blockIdx.x / parts, part = blockIdx.x - g * parts, n = blockIdx.y;
  const int cg = c / groups, per_px = cg / V;
  const int p0 = (int)((long)hw * part / parts), p1 = (int)((long)hw * (part + 1) / parts);
  const long off = ((long)n * hw + p0) * c + (long)g * cg;
  const int units = (p1 - p0) * per_px;
  // Unit u: pixel p0 + u / per_px, channels [j, j + V) of the group; its element offset in x and y.
  const auto at = [&](int u, int& j) {
    const int p = u / per_px;
    j = (u - p * per_px) * V;
    return off + (long)p * c + j;
  };
  float sum = 0.f, sq = 0.f;
#pragma unroll 4
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    int j;
    const __half* e = x + at(u, j);
    float f[V];
    if (V == 8) {
      const uint4 raw = *reinterpret_cast<const uint4*>(e);
      const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
      for (int k = 0; k < V / 2; ++k) {
        const float2 t = __half22float2(h[k]);
        f[2 * k] = t.x;
        f[2 * k + 1] = t.y;
      }
    } else {
      const float2 t = __half22float2(*reinterpret_cast<const __half2*>(e));
      f[0] = t.x;
      f[1] = t.y;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      sum += f[k];
      sq += f[k] * f[k];
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    sum += __shfl_xor_sync(0xffffffff, sum, o);
    sq += __shfl_xor_sync(0xffffffff, sq, o);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) {
    s_sum[warp] = sum;
    s_sq[warp] = sq;
  }
  __syncthreads();
  sum = lane < warps ? s_sum[lane] : 0.f;
  sq = lane < warps ? s_sq[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) {
    sum += __shfl_xor_sync(0xffffffff, sum, o);
    sq += __shfl_xor_sync(0xffffffff, sq, o);
  }
  if (parts > 1) {
    if (threadIdx.x == 0) s_part = make_float2(sum, sq);
    cluster_sync();
    const float2 t = lane < parts ? cluster_load(&s_part, lane) : make_float2(0.f, 0.f);
    cluster_done();
    sum = t.x;
    sq = t.y;
    for (int o = 16; o > 0; o >>= 1) {
      sum += __shfl_xor_sync(0xffffffff, sum, o);
      sq += __shfl_xor_sync(0xffffffff, sq, o);
    }
  }
  const float count = (float)hw * cg, mean = sum / count;
  const float rstd = rsqrtf(fmaxf(sq / count - mean * mean, 0.f) + eps);
  const int ht = cols ? hw / wd : 0, pad = kk / 2;
  const long krow = (long)kk * kk * c;
#pragma unroll 4
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    int j;
    const long i = at(u, j);
    const int ch = g * cg + j;
    uint4 raw;
    __half* h = reinterpret_cast<__half*>(&raw);
    if (V == 8) {
      raw = *reinterpret_cast<const uint4*>(x + i);
    } else {
      *reinterpret_cast<__half2*>(h) = *reinterpret_cast<const __half2*>(x + i);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float sc = rstd * __half2float(gamma[ch + k]);
      float v = fmaf(__half2float(h[k]) - mean, sc, __half2float(beta[ch + k]));
      if (silu) v = __fdividef(v, 1.f + __expf(-v));
      h[k] = __float2half(v);
    }
    if (cols) {
      const int q = p0 + (u / per_px), py = q / wd, px = q - py * wd;
      __half* img = cols + (long)n * hw * krow + ch;
      for (int ky = 0; ky < kk; ++ky) {
        for (int kx = 0; kx < kk; ++kx) {
          const long tap = (long)(ky * kk + kx) * c;
          // This value, in the row of the output pixel whose window has it at (ky, kx).
          const int oy = py - ky + pad, ox = px - kx + pad;
          if (oy >= 0 && oy < ht && ox >= 0 && ox < wd) {
            __half* dst = img + (long)(oy * wd + ox) * krow + tap;
            if (V == 8) {
              *reinterpret_cast<uint4*>(dst) = raw;
            } else {
              *reinterpret_cast<__half2*>(dst) = *reinterpret_cast<const __half2*>(h);
            }
          }
          // Zeros where this pixel's own window leaves the image.
          const int iy = py + ky - pad, ix = px + kx - pad;
          if (iy < 0 || iy >= ht || ix < 0 || ix >= wd) {
            __half* dst = img + (long)q * krow + tap;
            if (V == 8) {
              *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
            } else {
              *reinterpret_cast<__half2*>(dst) = __float2half2_rn(0.f);
            }
          }
        }
      }
    } else if (V == 8) {
      *reinterpret_cast<uint4*>(y + i) = raw;
    } else {
      *reinterpret_cast<__half2*>(y + i) = *reinterpret_cast<const __half2*>(h);
    }
  }
  if (parts > 1) cluster_leave();
}

extern "C" __global__ void group_norm_nhwc_small_f16x8(const __half* __restrict__ x, const __half* __restrict__ gamma,
                                                       const __half* __restrict__ beta, __half* __restrict__ y, int hw,
                                                       int c, int groups, float eps, int silu, int parts,
                                                       __half* __restrict__ cols, int wd, int kk) {
  LS_PDL_ENTER();
  group_norm_small<8>(x, gamma, beta, y, hw, c, groups, eps, silu, parts, cols, wd, kk);
}

extern "C" __global__ void group_norm_nhwc_small_f16x2(const __half* __restrict__ x, const __half* __restrict__ gamma,
                                                       const __half* __restrict__ beta, __half* __restrict__ y, int hw,
                                                       int c, int groups, float eps, int silu, int parts,
                                                       __half* __restrict__ cols, int wd, int kk) {
  LS_PDL_ENTER();
  group_norm_small<2>(x, gamma, beta, y, hw, c, groups, eps, silu, parts, cols, wd, kk);
}
