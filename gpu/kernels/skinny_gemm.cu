// GEMMs with at most 64 rows against a weight matrix: the UNet's 4x4 and 8x8 stages at one
// image a batch, where a layer reads megabytes of weights for 16 or 64 rows of activations and
// the time is the weights' trip from memory. Library kernels tile the rows 64-128 wide and split
// K only a few ways, so a 1280x1280 3x3 filter streamed at about half the memory's speed on an
// H100. Here the weights' columns go in 64-wide tiles and K in as many slices as keep every SM
// streaming: each block reads its slice of W straight into tensor-core fragments (nothing is
// reused, so nothing is staged in shared memory), the slices' sums meet in an fp32 buffer
// through atomics, and the last block of a column tile adds bias and residual, writes fp16 and
// clears the buffer and its counter for the next GEMM.
//
// d [m, n] (rows ldc apart) = A [m, k] · w [n, k]ᵀ (rows ldw apart) + bias [n] + residual
// (rows ldc apart). A is a row-major matrix (rows lda apart) or, for a convolution (`conv`),
// the implicit im2col of an NHWC image [.., h, wd, c]: row (img, oy, ox), column (ky, kx, ch)
// in the channels-last filter's [o, kh, kw, c] order, zero outside the image.
//
// The fragments follow conv_out.cu: the 16 k-slots of an mma.sync m16n8k16 need only be the
// same k in A and in W, so lane t loads k = kc + 8t .. kc + 8t + 7 of its rows as one 16-byte
// vector, which feeds two MMAs. Four warps split a block's slice (chunk j of 32 k to warp j % 4)
// and add their sums in shared memory; with WN = 2 two more split the tile's columns.
#include <cuda_fp16.h>

#define SK_WK 4

__device__ __forceinline__ void sk_mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                       unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Weights are read once: keep them out of L1.
__device__ __forceinline__ uint4 sk_stream(const __half* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void sk_red4(float* p, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1,%2,%3,%4};\n" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z),
               "f"(v.w)
               : "memory");
#else
  atomicAdd(p, v.x);
  atomicAdd(p + 1, v.y);
  atomicAdd(p + 2, v.z);
  atomicAdd(p + 3, v.w);
#endif
}

// Writes columns [col, col + 4) of row r: v + bias + residual, as fp16.
__device__ __forceinline__ void sk_store(float4 v, int r, int col, const __half* __restrict__ bias,
                                         const __half* __restrict__ residual, __half* __restrict__ d, int ldc) {
  float f[4] = {v.x, v.y, v.z, v.w};
  if (bias) {
    const uint2 b = *reinterpret_cast<const uint2*>(bias + col);
    const float2 b0 = __half22float2(*reinterpret_cast<const __half2*>(&b.x));
    const float2 b1 = __half22float2(*reinterpret_cast<const __half2*>(&b.y));
    f[0] += b0.x;
    f[1] += b0.y;
    f[2] += b1.x;
    f[3] += b1.y;
  }
  const long at = (long)r * ldc + col;
  if (residual) {
    const uint2 q = *reinterpret_cast<const uint2*>(residual + at);
    const float2 q0 = __half22float2(*reinterpret_cast<const __half2*>(&q.x));
    const float2 q1 = __half22float2(*reinterpret_cast<const __half2*>(&q.y));
    f[0] += q0.x;
    f[1] += q0.y;
    f[2] += q1.x;
    f[3] += q1.y;
  }
  __half2 h0 = __floats2half2_rn(f[0], f[1]), h1 = __floats2half2_rn(f[2], f[3]);
  uint2 out;
  out.x = *reinterpret_cast<unsigned*>(&h0);
  out.y = *reinterpret_cast<unsigned*>(&h1);
  *reinterpret_cast<uint2*>(d + at) = out;
}

// The block's sums red [ROWS][LD] (rows < m) for columns [64 tile, 64 tile + 64): written out
// (+ bias + residual) when K is one slice, else added into acc; the tile's last block to
// arrive writes acc out and leaves it and its counter zero.
template <int ROWS, int LD>
__device__ void sk_finish(const float* red, const __half* __restrict__ bias, const __half* __restrict__ residual,
                          __half* __restrict__ d, float* __restrict__ acc, unsigned* __restrict__ counters, int m,
                          int n, int ldc, int tile) {
  constexpr int BN = 64;
  __shared__ unsigned s_last;
  const int rows = min(m, ROWS);
  const int col0 = tile * BN;
  if (gridDim.y == 1) {
    for (int i = threadIdx.x; i < rows * BN / 4; i += blockDim.x) {
      const int r = i / (BN / 4), c4 = (i - r * (BN / 4)) * 4;
      sk_store(*reinterpret_cast<const float4*>(&red[r * LD + c4]), r, col0 + c4, bias, residual, d, ldc);
    }
    return;
  }
  for (int i = threadIdx.x; i < rows * BN / 4; i += blockDim.x) {
    const int r = i / (BN / 4), c4 = (i - r * (BN / 4)) * 4;
    sk_red4(acc + (long)r * n + col0 + c4, *reinterpret_cast<const float4*>(&red[r * LD + c4]));
  }
  // Last block of the tile: every other block's sums are in (each fenced them before counting).
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(&counters[tile], 1u) == gridDim.y - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < rows * BN / 4; i += blockDim.x) {
    const int r = i / (BN / 4), c4 = (i - r * (BN / 4)) * 4;
    float4* p = reinterpret_cast<float4*>(acc + (long)r * n + col0 + c4);
    const float4 v = __ldcg(p);
    __stcg(p, make_float4(0.f, 0.f, 0.f, 0.f));
    sk_store(v, r, col0 + c4, bias, residual, d, ldc);
  }
  if (threadIdx.x == 0) counters[tile] = 0;
}


// MT m16 tiles of rows (m <= 16 * MT), NT n8 tiles of columns per warp, WN warps across a
// block's 64 columns. Grid (n / 64, splits); block 32 * WN * SK_WK threads.
template <int MT, int NT, int WN>
__device__ void skinny_gemm(const __half* __restrict__ a, const __half* __restrict__ w,
                            const __half* __restrict__ bias, const __half* __restrict__ residual,
                            __half* __restrict__ d, float* __restrict__ acc, unsigned* __restrict__ counters, int m,
                            int n, int k, int ks, int lda, int ldw, int ldc, int conv, int h, int wd, int c, int ho,
                            int wo, int kw, int sh, int sw, int ph, int pw) {
  constexpr int BN = NT * 8 * WN, ROWS = MT * 16;
  // Rows of the block's sums 8 floats longer than the tile: a warp's float2 stores (rows g,
  // columns 2t) then fill all 32 banks twice instead of eight lanes sharing one.
  constexpr int LD = BN + 8;
  static_assert(BN == 64, "a block covers 64 columns");
  __shared__ __align__(16) float red[ROWS * LD];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x;
  const int k0 = blockIdx.y * ks, k1 = min(k, k0 + ks);

  // This lane's rows mt * 16 + g (+ 8): where their A starts, and for a convolution the
  // window's top-left corner in the image.
  long rbase[MT][2];
  int riy[MT][2], rix[MT][2];
  bool rok[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = mt * 16 + g + 8 * hf;
      rok[mt][hf] = r < m;
      if (conv) {
        const int img = r / (ho * wo), rem = r - img * ho * wo;
        const int oy = rem / wo, ox = rem - oy * wo;
        rbase[mt][hf] = (long)img * h * wd * c;
        riy[mt][hf] = oy * sh - ph;
        rix[mt][hf] = ox * sw - pw;
      } else {
        rbase[mt][hf] = (long)r * lda;
        riy[mt][hf] = 0;
        rix[mt][hf] = 0;
      }
    }
  }
  const __half* wrow[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) wrow[nt] = w + (long)(tile * BN + (wn * NT + nt) * 8 + g) * ldw + 8 * t;

  float sum[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) sum[mt][nt][j] = 0.f;

  const uint4 zero = make_uint4(0, 0, 0, 0);
  // This lane's 8 k of its rows, from k = kc + 8t.
  auto load_a = [&](int kc, uint4 (&av)[MT][2]) {
    const int kk = kc + 8 * t;
    if (conv) {
      const int tap = kk / c, ch = kk - tap * c;
      const int ky = tap / kw, kx = tap - ky * kw;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int iy = riy[mt][hf] + ky, ix = rix[mt][hf] + kx;
          const bool ok = rok[mt][hf] && iy >= 0 && iy < h && ix >= 0 && ix < wd;
          av[mt][hf] = ok ? __ldg(reinterpret_cast<const uint4*>(a + rbase[mt][hf] + ((long)iy * wd + ix) * c + ch))
                          : zero;
        }
      }
    } else {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          av[mt][hf] = rok[mt][hf] ? __ldg(reinterpret_cast<const uint4*>(a + rbase[mt][hf] + kk)) : zero;
        }
      }
    }
  };
  auto load_w = [&](int kc, uint4 (&wv)[NT]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) wv[nt] = sk_stream(wrow[nt] + kc);
  };
  // Weights two chunks ahead and activations one: the loads of the chunks to come are in
  // flight while this one multiplies, so a warp waits on memory latency once, not per chunk.
  constexpr int STEP = SK_WK * 32;
  int kc = k0 + wk * 32;
  uint4 w0[NT], w1[NT], a0[MT][2];
  if (kc < k1) {
    load_w(kc, w0);
    load_a(kc, a0);
  }
  if (kc + STEP < k1) load_w(kc + STEP, w1);
  for (; kc < k1; kc += STEP) {
    uint4 w2[NT], a1[MT][2];
    if (kc + 2 * STEP < k1) load_w(kc + 2 * STEP, w2);
    if (kc + STEP < k1) load_a(kc + STEP, a1);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        sk_mma(sum[mt][nt], a0[mt][0].x, a0[mt][1].x, a0[mt][0].y, a0[mt][1].y, w0[nt].x, w0[nt].y);
        sk_mma(sum[mt][nt], a0[mt][0].z, a0[mt][1].z, a0[mt][0].w, a0[mt][1].w, w0[nt].z, w0[nt].w);
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      w0[nt] = w1[nt];
      w1[nt] = w2[nt];
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      a0[mt][0] = a1[mt][0];
      a0[mt][1] = a1[mt][1];
    }
  }

  // The warps' sums for the block, one K-split warp after another (shared-memory atomics
  // from four warps at once ran an order of magnitude slower): C rows g and g + 8 of each m16
  // tile, columns 2t, 2t + 1.
#pragma unroll
  for (int round = 0; round < SK_WK; ++round) {
    if (wk == round) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int col = (wn * NT + nt) * 8 + 2 * t, r = mt * 16 + g;
          float2* lo = reinterpret_cast<float2*>(&red[r * LD + col]);
          float2* hi = reinterpret_cast<float2*>(&red[(r + 8) * LD + col]);
          float2 a = make_float2(sum[mt][nt][0], sum[mt][nt][1]), b = make_float2(sum[mt][nt][2], sum[mt][nt][3]);
          if (round > 0) {
            const float2 pa = *lo, pb = *hi;
            a.x += pa.x;
            a.y += pa.y;
            b.x += pb.x;
            b.y += pb.y;
          }
          *lo = a;
          *hi = b;
        }
      }
    }
    __syncthreads();
  }
  sk_finish<ROWS, LD>(red, bias, residual, d, acc, counters, m, n, ldc, tile);
}

#define SK_KERNEL(name, MT, NT, WN)                                                                                  \
  extern "C" __global__ void __launch_bounds__(32 * WN * SK_WK)                                                      \
      name(const __half* __restrict__ a, const __half* __restrict__ w, const __half* __restrict__ bias,             \
           const __half* __restrict__ residual, __half* __restrict__ d, float* __restrict__ acc,                    \
           unsigned* __restrict__ counters, int m, int n, int k, int ks, int lda, int ldw, int ldc, int conv, int h, \
           int wd, int c, int ho, int wo, int kw, int sh, int sw, int ph, int pw) {                                  \
    LS_PDL_ENTER();                                                                                                  \
    skinny_gemm<MT, NT, WN>(a, w, bias, residual, d, acc, counters, m, n, k, ks, lda, ldw, ldc, conv, h, wd, c, ho,  \
                            wo, kw, sh, sw, ph, pw);                                                                 \
  }

SK_KERNEL(skinny_gemm_m16, 1, 8, 1)
SK_KERNEL(skinny_gemm_m32, 2, 8, 1)
SK_KERNEL(skinny_gemm_m64, 4, 4, 2)

// The same GEMM with its tiles staged through shared memory: cp.async copies NS - 1 stages of
// 64 k ahead (W's 64 columns and A's rows), so the bytes in flight are the stages', not the
// registers', and an SM holds several blocks; the four warps take 16 columns each and read
// their fragments with ldmatrix. k and the slice (ks) are multiples of 64. Dynamic shared
// memory: NS * (64 + 16 MT) rows of 144 bytes (rows padded by 16 bytes: the eight rows an
// ldmatrix phase reads then fall in distinct banks).
__device__ __forceinline__ void sk_cp16(void* dst, const void* src, bool ok) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ void sk_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void sk_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void sk_ldm4(unsigned (&r)[4], const __half* p) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

#define SK_RB 72  // halves per staged row: 64 k + 8 of padding

template <int MT, int NS>
__device__ void skinny_staged(const __half* __restrict__ a, const __half* __restrict__ w,
                              const __half* __restrict__ bias, const __half* __restrict__ residual,
                              __half* __restrict__ d, float* __restrict__ acc, unsigned* __restrict__ counters, int m,
                              int n, int k, int ks, int lda, int ldw, int ldc, int conv, int h, int wd, int c, int ho,
                              int wo, int kw, int sh, int sw, int ph, int pw) {
  constexpr int BN = 64, ROWS = MT * 16, KS = 64, LD = BN + 8;
  extern __shared__ __align__(16) unsigned char sk_smem[];
  __half* sw_ = reinterpret_cast<__half*>(sk_smem);  // [NS][BN][SK_RB]
  __half* sa = sw_ + NS * BN * SK_RB;                 // [NS][ROWS][SK_RB]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x;
  const int k0 = blockIdx.y * ks, k1 = min(k, k0 + ks);
  const int stages = (k1 - k0) / KS;

  // Copies: thread tid moves 16-byte piece tid & 7 of W rows (tid >> 3) + 16 j and of A rows
  // (tid >> 3) + 16 j, for every stage.
  const int piece = tid & 7, prow = tid >> 3;
  long rbase[MT];
  int riy[MT], rix[MT];
  bool rok[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    const int r = prow + 16 * j;
    rok[j] = r < m;
    if (conv) {
      const int img = r / (ho * wo), rem = r - img * ho * wo;
      const int oy = rem / wo, ox = rem - oy * wo;
      rbase[j] = (long)img * h * wd * c;
      riy[j] = oy * sh - ph;
      rix[j] = ox * sw - pw;
    } else {
      rbase[j] = (long)r * lda;
      riy[j] = 0;
      rix[j] = 0;
    }
  }
  const __half* wsrc = w + (long)(tile * BN + prow) * ldw + piece * 8;
  auto load_stage = [&](int st, int kb) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      sk_cp16(sw_ + (st * BN + prow + 16 * j) * SK_RB + piece * 8, wsrc + (long)16 * j * ldw + kb, true);
    }
    const int kk = kb + piece * 8;
    if (conv) {
      const int tap = kk / c, ch = kk - tap * c;
      const int ky = tap / kw, kx = tap - ky * kw;
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        const int iy = riy[j] + ky, ix = rix[j] + kx;
        const bool ok = rok[j] && iy >= 0 && iy < h && ix >= 0 && ix < wd;
        const __half* src = ok ? a + rbase[j] + ((long)iy * wd + ix) * c + ch : a;
        sk_cp16(sa + (st * ROWS + prow + 16 * j) * SK_RB + piece * 8, src, ok);
      }
    } else {
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        const __half* src = rok[j] ? a + rbase[j] + kk : a;
        sk_cp16(sa + (st * ROWS + prow + 16 * j) * SK_RB + piece * 8, src, rok[j]);
      }
    }
  };

#pragma unroll
  for (int s = 0; s < NS - 1; ++s) {
    if (s < stages) load_stage(s, k0 + s * KS);
    sk_commit();
  }
  float sum[MT][2][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) sum[mt][nt][j] = 0.f;
  // ldmatrix rows: W rows warp * 16 + (lane & 7) + 8 (lane >> 4) at k + 8 ((lane >> 3) & 1)
  // give b0, b1 of this warp's two n8 tiles; A rows lane & 15 at k + 8 (lane >> 4) give a0..a3.
  const int wr = warp * 16 + (lane & 7) + ((lane >> 4) << 3), wk8 = ((lane >> 3) & 1) * 8;
  const int ar = lane & 15, ak8 = (lane >> 4) * 8;
  for (int it = 0; it < stages; ++it) {
    sk_wait<NS - 2>();
    __syncthreads();
    const int nxt = it + NS - 1;
    if (nxt < stages) load_stage(nxt % NS, k0 + nxt * KS);
    sk_commit();
    const int st = it % NS;
    const __half* ws = sw_ + (st * BN + wr) * SK_RB + wk8;
    const __half* as = sa + (st * ROWS + ar) * SK_RB + ak8;
#pragma unroll
    for (int kq = 0; kq < KS; kq += 16) {
      unsigned b[4];
      sk_ldm4(b, ws + kq);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        unsigned af[4];
        sk_ldm4(af, as + mt * 16 * SK_RB + kq);
        sk_mma(sum[mt][0], af[0], af[1], af[2], af[3], b[0], b[1]);
        sk_mma(sum[mt][1], af[0], af[1], af[2], af[3], b[2], b[3]);
      }
    }
  }
  sk_wait<0>();
  __syncthreads();
  // The stages are spent: their memory holds the block's sums now.
  float* red = reinterpret_cast<float*>(sk_smem);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int col = warp * 16 + nt * 8 + 2 * t, r = mt * 16 + g;
      *reinterpret_cast<float2*>(&red[r * LD + col]) = make_float2(sum[mt][nt][0], sum[mt][nt][1]);
      *reinterpret_cast<float2*>(&red[(r + 8) * LD + col]) = make_float2(sum[mt][nt][2], sum[mt][nt][3]);
    }
  }
  __syncthreads();
  sk_finish<ROWS, LD>(red, bias, residual, d, acc, counters, m, n, ldc, tile);
}

#define SK_STAGED(name, MT, NS)                                                                                      \
  extern "C" __global__ void __launch_bounds__(128)                                                                  \
      name(const __half* __restrict__ a, const __half* __restrict__ w, const __half* __restrict__ bias,             \
           const __half* __restrict__ residual, __half* __restrict__ d, float* __restrict__ acc,                    \
           unsigned* __restrict__ counters, int m, int n, int k, int ks, int lda, int ldw, int ldc, int conv, int h, \
           int wd, int c, int ho, int wo, int kw, int sh, int sw, int ph, int pw) {                                  \
    LS_PDL_ENTER();                                                                                                  \
    skinny_staged<MT, NS>(a, w, bias, residual, d, acc, counters, m, n, k, ks, lda, ldw, ldc, conv, h, wd, c, ho,   \
                          wo, kw, sh, sw, ph, pw);                                                                   \
  }

SK_STAGED(skinny_staged_m16, 1, 4)
SK_STAGED(skinny_staged_m32, 2, 4)
SK_STAGED(skinny_staged_m64, 4, 4)
