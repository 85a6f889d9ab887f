//! The CUDA executor of the engines IR: fp16 activations and weights, fp32 accumulation.
//!
//! A `Runtime` owns what the graphs of one engine share on one GPU: kernels, the cuDNN and
//! cuBLASLt handles, uploaded weights (keyed, so batch profiles share them), tuned convolution
//! algorithms, the convolution workspace and one activation arena (profiles replay one at a time
//! on the one stream, so they share it). An `Executor` is one lowered graph at one batch size:
//! its activations' offsets in that arena (placed by the liveness planner), its prepared library
//! calls, and — once captured — one CUDA graph replayed per run. It never allocates after it is
//! built. Build every executor, call `Runtime::finish_building`, then capture: a later build may
//! grow the arena or the workspace and leave earlier captures pointing at freed memory.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cudnn::sys::{cudnnConvolutionFwdAlgo_t, cudnnMathType_t};
use cudarc::driver::{
    sys, CudaEvent, CudaGraph, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice,
};
use half::f16;
use lipstream_engines::graph::Graph;
use lipstream_engines::tensor::Tensor;

use crate::arena;
use crate::blas::{Blas, Gemm, GemmPlan};
use crate::conv::{Conv, ConvPlan, ConvShape};
use crate::conv_graph::{ConvGraph, EngineChoice, GraphArgs, GraphCall, GraphKey, GraphPlan};
use crate::device::Device;
use crate::error::GpuError;
use crate::kernels::group_norm::GroupNorm;
use crate::kernels::image::{Faces, Image};
use crate::kernels::layout::{Layout, RowsPart};
use crate::kernels::{conv_in, conv_out};
use crate::kernels::{Experiment, Kernels, Ptr};
use crate::plan::{self, Binding, Loc, NormInput, PadInput, Plan, Step, WeightForm, WeightUse};

/// Arena offsets are multiples of this (cuDNN and vector loads like aligned operands).
const ALIGN: usize = 256;
/// The most workspace a convolution algorithm may ask for while tuning.
const TUNE_WORKSPACE_BYTES: usize = 256 << 20;

/// How executors are built.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Time every cuDNN algorithm per convolution shape (engine build); else use heuristics.
    pub tune: bool,
    /// Whether a convolution's bias (and residual) ride on cuDNN's fused call.
    pub fuse: FuseConv,
    /// Whether a convolution runs as im2col + one cuBLASLt GEMM instead of cuDNN.
    pub gemm: ConvAsGemm,
    /// Whether a convolution runs on an engine of cuDNN's graph API instead of its legacy call.
    pub graphs: ConvGraphs,
    /// Whether a thin convolution (to 8 outputs, from at most 3 inputs) runs on our kernel for it.
    pub mma: ThinConvs,
    /// Whether a convolution to 8 outputs of a group norm normalises the norm's input itself.
    pub normed: NormedConvs,
}

impl Options {
    /// Engine build: every choice timed.
    pub const TUNED: Options = Options {
        tune: true,
        fuse: FuseConv::Timed,
        gemm: ConvAsGemm::Timed,
        graphs: ConvGraphs::Timed,
        mma: ThinConvs::Timed,
        normed: NormedConvs::Large,
    };
    /// cuDNN's heuristics, our own epilogues (quick to build: tests, debugging).
    pub const HEURISTIC: Options = Options {
        tune: false,
        fuse: FuseConv::Never,
        gemm: ConvAsGemm::Never,
        graphs: ConvGraphs::Never,
        mma: ThinConvs::Never,
        normed: NormedConvs::Large,
    };
}

/// Whether a convolution to 8 outputs of a two-pass group norm that nothing else reads (the
/// VAE decoder's norm_out + SiLU -> conv_out) runs on `conv_out`'s normed kernel, which reads
/// the norm's input and normalises it on the way in, so the norm computes its statistics only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormedConvs {
    /// Never: the norm's own pass, then the convolution as prepared.
    Never,
    /// Where the kernel's grid fills the GPU (`conv_out::normed_pays`).
    Large,
    /// Wherever the kernel fits (tests).
    Always,
}

/// Whether a thin 3x3 convolution runs on our tensor-core kernel for its kind instead of the
/// library path chosen for it, which spends most of its work on channel padding: to 8 (padded)
/// outputs (the VAE's conv_out to RGB, the UNet's to its latents; `kernels::conv_out`), or from
/// at most 3 inputs (the VAE encoder's conv_in on RGB; `kernels::conv_in`). Which wins depends
/// on the batch: on an H100 the conv_out kernel lost at one 32x32 image and won at 16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThinConvs {
    /// Always the library path.
    Never,
    /// Every convolution a kernel fits, the conv_out kernel's warps taking `rows` output rows
    /// each (numerics tests).
    Always { rows: usize },
    /// Whichever of the two was faster when timed on the real buffers (`tune`); decisions
    /// already in the runtime (an engine file's) are kept.
    Timed,
}

/// What decides a thin convolution: its shape and whether a channel bias is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct MmaKey {
    pub shape: ConvShape,
    pub bias: bool,
}

/// A timed decision: whether our kernel runs, with how many output rows a warp (the faster of
/// `conv_out::TILE_ROWS`), and both times.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct MmaConv {
    pub mma: bool,
    #[serde(default = "one_row")]
    pub rows: usize,
    pub mma_ms: f32,
    pub library_ms: f32,
}

/// Decisions recorded before a warp could take two rows were timed with one.
fn one_row() -> usize {
    1
}

/// Whether a channels-last convolution is lowered to im2col + one cuBLASLt GEMM (its bias and
/// residual in the GEMM's epilogue). At small images and many channels (the UNet's 4x4 and 8x8
/// stages at B=1) a convolution only streams its filter, and cuBLASLt's GEMM kernels stream it
/// faster than cuDNN's convolutions do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvAsGemm {
    /// Always cuDNN.
    Never,
    /// Every convolution the lowering takes (numerics tests).
    Always,
    /// Whichever of cuDNN (as chosen, its epilogue included) and each of cuBLASLt's proposed
    /// algorithms was fastest when timed on the real buffers (`tune`); decisions already in the
    /// runtime (an engine file's) are kept.
    Timed,
}

/// Patch matrices above this stay on cuDNN: large images are compute-bound, where cuDNN's
/// implicit GEMM wins without the patch round trip through memory.
const IM2COL_MAX_BYTES: usize = 32 << 20;

/// What decides a convolution's lowering: its shape and its epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct GemmKey {
    pub shape: ConvShape,
    /// One bias per output channel (or none), which the GEMM's epilogue adds; a per-image bias
    /// stays on our epilogue kernel.
    pub channel_bias: bool,
    pub residual: bool,
    pub stats: bool,
}

/// A timed lowering decision: cuBLASLt's proposal (its index in the heuristic's list, which the
/// same GPU and cuBLASLt reproduce) when the GEMM won, and both times.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct GemmConv {
    pub algo: Option<usize>,
    /// The best proposal's time; none when no proposal ran (an engine file's JSON header has no
    /// infinity to write instead).
    pub gemm_ms: Option<f32>,
    pub cudnn_ms: f32,
}

/// What decides a GEMM step's algorithm (a linear layer's or attention's product): its shape,
/// strides and epilogue, which fix the list cuBLASLt's heuristic proposes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct LinearKey {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub b_trans: bool,
    /// Leading dimensions and batch strides of a, b and c.
    pub lds: [usize; 3],
    pub strides: [usize; 3],
    pub bias: bool,
    pub residual: bool,
    pub gelu: bool,
}

impl LinearKey {
    pub fn of(g: &Gemm, bias: bool, residual: bool, gelu: bool) -> Self {
        LinearKey {
            m: g.m,
            n: g.n,
            k: g.k,
            batch: g.batch,
            b_trans: g.b_trans,
            lds: [g.lda, g.ldb, g.ldc],
            strides: [g.stride_a, g.stride_b, g.stride_c],
            bias,
            residual,
            gelu,
        }
    }
}

/// A timed GEMM: the fastest of cuBLASLt's proposals (its index in the heuristic's list, which
/// the same GPU and cuBLASLt reproduce) and its time. The heuristic's first proposal is not
/// always the fastest, and a served engine would otherwise run the first.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct LinearChoice {
    pub algo: usize,
    pub ms: f32,
}

/// Whether a channels-last convolution runs on an engine of cuDNN's graph API, with the knob
/// settings (tile size, split-K, ...) that timed fastest. The legacy call picks the kernel of an
/// algorithm itself, and at one image it picks poorly: on an H100 the VAE's 256x256 and the
/// UNet's 32x32 convolutions ran 28-44 % faster on the graph API's best configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvGraphs {
    /// Always the legacy call.
    Never,
    /// The first configuration cuDNN's heuristics propose that runs (numerics tests).
    Always,
    /// Whichever of the legacy call (as prepared) and the proposed configurations was fastest
    /// when timed on the real buffers (`tune`); decisions already in the runtime are kept.
    Timed,
}

/// Most configurations timed per convolution: the heuristics list the likely winners first.
const GRAPH_CHOICES_MAX: usize = 32;

/// What decides a graph-API convolution: its shape and its epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct GraphConvKey {
    pub shape: ConvShape,
    /// The bias rides on the graph (one per channel, no residual); else our epilogue adds it.
    pub bias_in_graph: bool,
    pub residual: bool,
    pub stats: bool,
}

impl GraphConvKey {
    /// The operation graph of this key (its shape, the bias when it rides on the graph).
    fn graph(&self, rt: &Runtime) -> Result<ConvGraph, GpuError> {
        ConvGraph::new(
            rt.conv.handle(),
            GraphKey {
                shape: self.shape,
                bias: self.bias_in_graph,
            },
        )
    }

    /// The call an engine file's decision `choice` names for this key.
    fn call(&self, rt: &Runtime, choice: &EngineChoice) -> Result<GraphCall, GpuError> {
        let graph = self.graph(rt)?;
        let plan = graph.plan(rt.conv.handle(), choice)?;
        Ok(GraphCall { graph, plan })
    }
}

/// A timed graph-API decision: the engine configuration when it won, and both times.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct GraphConv {
    pub choice: Option<EngineChoice>,
    /// The best configuration's time; none when no configuration ran.
    pub graph_ms: Option<f32>,
    pub legacy_ms: f32,
}

/// Where a convolution's bias, residual and group-norm sums are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuseConv {
    /// Our epilogue kernel after the plain cuDNN call (the sums need it, or a read-only pass).
    Never,
    /// cuDNN's fused call wherever cuDNN runs it (numerics tests).
    Always,
    /// Whichever of the two was faster when timed on the real buffers (`tune`); decisions
    /// already in the runtime (an engine file's) are kept.
    Timed,
}

/// The epilogue a convolution needs, which decides whether fusing it pays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FuseKey {
    pub shape: ConvShape,
    pub residual: bool,
    pub stats: bool,
}

/// A timed fusion decision: the fused call's algorithm when it won, and both times.
#[derive(Clone, Copy, Debug)]
pub struct Fusion {
    pub fused: Option<Tuned>,
    pub fused_ms: f32,
    pub plain_ms: f32,
}

/// A convolution algorithm chosen by timing.
#[derive(Clone, Copy, Debug)]
pub struct Tuned {
    pub algo: cudnnConvolutionFwdAlgo_t,
    pub math: cudnnMathType_t,
    pub workspace_bytes: usize,
    pub ms: f32,
}

impl Tuned {
    /// cuDNN's numeric codes of the algorithm and math type, for engine files.
    pub fn codes(&self) -> (u32, u32) {
        (self.algo as u32, self.math as u32)
    }

    /// Back from `codes`; `None` for codes this cuDNN does not define.
    pub fn from_codes(algo: u32, math: u32, workspace_bytes: usize, ms: f32) -> Option<Self> {
        use cudnnConvolutionFwdAlgo_t as A;
        use cudnnMathType_t as M;
        let algo = match algo {
            0 => A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            1 => A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            2 => A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
            3 => A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
            4 => A::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
            5 => A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
            6 => A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
            7 => A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
            _ => return None,
        };
        let math = match math {
            0 => M::CUDNN_DEFAULT_MATH,
            1 => M::CUDNN_TENSOR_OP_MATH,
            2 => M::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
            3 => M::CUDNN_FMA_MATH,
            _ => return None,
        };
        Some(Tuned {
            algo,
            math,
            workspace_bytes,
            ms,
        })
    }
}

/// What an engine build timed, to replay without timing again: each convolution shape's
/// algorithm and each fusion decision.
#[derive(Clone, Debug, Default)]
pub struct Tuning {
    pub convs: Vec<(ConvShape, Tuned)>,
    pub fusions: Vec<(FuseKey, Fusion)>,
    pub gemm_convs: Vec<(GemmKey, GemmConv)>,
    pub graph_convs: Vec<(GraphConvKey, GraphConv)>,
    pub mma_convs: Vec<(MmaKey, MmaConv)>,
    pub linears: Vec<(LinearKey, LinearChoice)>,
}

impl Tuning {
    pub fn is_empty(&self) -> bool {
        self.convs.is_empty()
            && self.fusions.is_empty()
            && self.gemm_convs.is_empty()
            && self.graph_convs.is_empty()
            && self.mma_convs.is_empty()
            && self.linears.is_empty()
    }

    /// What `rt` has timed so far.
    pub fn of(rt: &Runtime) -> Tuning {
        Tuning {
            convs: rt.tuned.iter().map(|(k, v)| (*k, *v)).collect(),
            fusions: rt.fusions.iter().map(|(k, v)| (*k, *v)).collect(),
            gemm_convs: rt.gemm_convs.iter().map(|(k, v)| (*k, *v)).collect(),
            graph_convs: rt
                .graph_convs
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            mma_convs: rt.mma_convs.iter().map(|(k, v)| (*k, *v)).collect(),
            linears: rt.linears.iter().map(|(k, v)| (*k, *v)).collect(),
        }
    }

    /// Makes `rt` use these choices.
    pub fn apply(&self, rt: &mut Runtime) {
        rt.tuned.extend(self.convs.iter().copied());
        rt.fusions.extend(self.fusions.iter().copied());
        rt.gemm_convs.extend(self.gemm_convs.iter().copied());
        rt.graph_convs.extend(self.graph_convs.iter().cloned());
        rt.mma_convs.extend(self.mma_convs.iter().copied());
        rt.linears.extend(self.linears.iter().copied());
    }
}

/// What one GPU's graphs share.
pub struct Runtime {
    pub device: Device,
    pub kernels: Kernels,
    pub conv: Conv,
    pub blas: Blas,
    weights: HashMap<String, CudaSlice<f16>>,
    /// Bytes of uploaded weights.
    pub weight_bytes: usize,
    /// Convolution algorithm per shape: (algorithm, workspace bytes, measured ms).
    pub tuned: HashMap<ConvShape, Tuned>,
    /// Whether each convolution-with-bias kind takes cuDNN's fused call.
    pub fusions: HashMap<FuseKey, Fusion>,
    /// Whether each convolution kind runs as im2col + GEMM.
    pub gemm_convs: HashMap<GemmKey, GemmConv>,
    /// Whether each convolution kind runs on a graph-API engine, and which.
    pub graph_convs: HashMap<GraphConvKey, GraphConv>,
    /// Whether each thin convolution kind runs on our tensor-core kernel for it.
    pub mma_convs: HashMap<MmaKey, MmaConv>,
    /// Which of cuBLASLt's proposals each GEMM kind runs.
    pub linears: HashMap<LinearKey, LinearChoice>,
    workspace: Option<CudaSlice<u8>>,
    workspace_bytes: usize,
    /// The most workspace any prepared convolution needs.
    workspace_need: usize,
    /// One arena for every executor: batch profiles replay one at a time on the one stream, so
    /// they share activation memory (the largest profile's size).
    arena: Option<CudaSlice<f16>>,
    arena_bytes: usize,
}

impl Runtime {
    /// Loads the kernels and library handles for `device`.
    pub fn new(device: Device) -> Result<Self, GpuError> {
        let kernels = Kernels::load(&device)?;
        let conv = Conv::new(device.stream.clone())?;
        let blas = Blas::new(device.stream.clone())?;
        Ok(Runtime {
            device,
            kernels,
            conv,
            blas,
            weights: HashMap::new(),
            weight_bytes: 0,
            tuned: HashMap::new(),
            fusions: HashMap::new(),
            gemm_convs: HashMap::new(),
            graph_convs: HashMap::new(),
            mma_convs: HashMap::new(),
            linears: HashMap::new(),
            workspace: None,
            workspace_bytes: 0,
            workspace_need: 0,
            arena: None,
            arena_bytes: 0,
        })
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.device.stream
    }

    /// Uploads a weight once (fp16, in its device form); returns its address.
    fn upload(&mut self, w: &WeightUse) -> Result<Ptr, GpuError> {
        if !self.weights.contains_key(&w.key) {
            let t = &w.tensor;
            let data: Vec<f16> = match w.form {
                WeightForm::Plain => t.data.iter().map(|&v| f16::from_f32(v)).collect(),
                WeightForm::PaddedOut(o8) if t.shape.len() == 1 => {
                    let mut out: Vec<f16> = t.data.iter().map(|&v| f16::from_f32(v)).collect();
                    out.resize(o8, f16::ZERO);
                    out
                }
                WeightForm::ChannelsLast | WeightForm::PaddedOut(_) => {
                    // A 1-d filter [O, C, K] is a one-row 2-d one.
                    let (o, c, h, wd) = match t.shape[..] {
                        [o, c, k] => (o, c, 1, k),
                        [o, c, h, w] => (o, c, h, w),
                        _ => {
                            return Err(GpuError::Shape {
                                kernel: "upload",
                                reason: format!("{:?} filter {:?}", w.form, t.shape),
                            })
                        }
                    };
                    let rows = match w.form {
                        WeightForm::PaddedOut(o8) => o8,
                        _ => o,
                    };
                    // Padded rows (outputs beyond o) stay zero.
                    let mut out = vec![f16::ZERO; rows * c * h * wd];
                    for oi in 0..o {
                        for ci in 0..c {
                            for y in 0..h {
                                for x in 0..wd {
                                    out[((oi * h + y) * wd + x) * c + ci] =
                                        f16::from_f32(t.data[((oi * c + ci) * h + y) * wd + x]);
                                }
                            }
                        }
                    }
                    out
                }
            };
            let slice = self.stream().clone_htod(&data)?;
            self.weight_bytes += 2 * data.len();
            self.weights.insert(w.key.clone(), slice);
        }
        let slice = &self.weights[&w.key];
        let (ptr, _sync) = slice.device_ptr(self.stream());
        Ok(ptr)
    }

    /// Makes the shared convolution workspace at least `bytes` large. Graphs captured before a
    /// growth would point at the old allocation, so engines size it before capturing.
    fn reserve_workspace(&mut self, bytes: usize) -> Result<(), GpuError> {
        if self.workspace.is_none() || bytes > self.workspace_bytes {
            self.workspace = None;
            self.workspace = Some(self.stream().alloc_zeros::<u8>(bytes.max(1))?);
            self.workspace_bytes = bytes.max(1);
        }
        Ok(())
    }

    /// Makes the shared arena at least `bytes` large (same caveat as the workspace).
    fn reserve_arena(&mut self, bytes: usize) -> Result<(), GpuError> {
        if self.arena.is_none() || bytes > self.arena_bytes {
            self.arena = None;
            self.arena = Some(self.stream().alloc_zeros::<f16>(bytes.div_ceil(2).max(1))?);
            self.arena_bytes = bytes.max(2);
        }
        Ok(())
    }

    fn arena_ptr(&self) -> Ptr {
        match &self.arena {
            Some(a) => a.device_ptr(self.stream()).0,
            None => 0,
        }
    }

    /// Bytes of the shared arena and workspace.
    pub fn scratch_bytes(&self) -> usize {
        self.arena_bytes + self.workspace_bytes
    }

    /// Shrinks the convolution workspace from the tuning size to what the chosen algorithms
    /// need. Call after building every executor and before capturing any.
    pub fn finish_building(&mut self) -> Result<(), GpuError> {
        if self.workspace_bytes != self.workspace_need.max(1) {
            self.workspace = None;
            self.workspace_bytes = 0;
            self.reserve_workspace(self.workspace_need)?;
        }
        Ok(())
    }

    fn workspace_ptr(&self) -> Ptr {
        match &self.workspace {
            Some(w) => w.device_ptr(self.stream()).0,
            None => 0,
        }
    }

    /// A second set of the memory a replay writes (arena, convolution and cuBLASLt
    /// workspaces), the arena a copy of the current one (so inputs match). Call after
    /// `finish_building`. Captured between two `swap_scratch` calls, an executor's graph
    /// touches only this set: it may replay on another stream at the same time as the graph
    /// captured on the first set.
    pub fn second_scratch(&self) -> Result<Scratch, GpuError> {
        let s = self.stream();
        let arena = match &self.arena {
            Some(a) => {
                let mut b = s.alloc_zeros::<f16>(a.len())?;
                s.memcpy_dtod(a, &mut b)?;
                Some(b)
            }
            None => None,
        };
        let workspace = match self.workspace_bytes {
            0 => None,
            n => Some(s.alloc_zeros::<u8>(n)?),
        };
        Ok(Scratch {
            arena,
            workspace,
            blas: Blas::new_workspace(s)?,
        })
    }

    /// Trades the runtime's scratch memory for `other`'s (see `second_scratch`); a second
    /// call trades it back. Sizes stay those of the first set.
    pub fn swap_scratch(&mut self, other: &mut Scratch) {
        std::mem::swap(&mut self.arena, &mut other.arena);
        std::mem::swap(&mut self.workspace, &mut other.workspace);
        self.blas.swap_workspace(&mut other.blas);
    }
}

/// The memory one replay writes, apart from a runtime's own (`Runtime::second_scratch`).
pub struct Scratch {
    arena: Option<CudaSlice<f16>>,
    workspace: Option<CudaSlice<u8>>,
    blas: CudaSlice<u8>,
}

/// Records `ev` on `stream` so that, inside a capture, it becomes a real event-record node of
/// the graph (a plain record would only order the capture).
fn record_external(ev: &CudaEvent, stream: &CudaStream) -> Result<(), GpuError> {
    // SAFETY: the event and the stream are live for the call; the flag asks for a record node.
    unsafe {
        sys::cuEventRecordWithFlags(
            ev.cu_event(),
            stream.cu_stream(),
            sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as u32,
        )
    }
    .result()?;
    Ok(())
}

/// Milliseconds per `run`, as a CUDA graph replays it: ten runs captured into one graph, the
/// graph replayed three times after a warm-up, timed with CUDA events. (Timed eagerly, a small
/// convolution measures the CPU's launch cost, which a graph does not pay.)
fn time_gpu(
    stream: &Arc<CudaStream>,
    mut run: impl FnMut() -> Result<(), GpuError>,
) -> Result<f32, GpuError> {
    const RUNS: usize = 10;
    const REPLAYS: usize = 3;
    stream.synchronize()?;
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
    let ran = (0..RUNS).try_for_each(|_| run());
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    ran?;
    let graph =
        graph?.ok_or_else(|| GpuError::Capture("the timing capture recorded nothing".into()))?;
    let f = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (a, b) = (
        stream.context().new_event(f)?,
        stream.context().new_event(f)?,
    );
    graph.launch()?;
    a.record(stream)?;
    for _ in 0..REPLAYS {
        graph.launch()?;
    }
    b.record(stream)?;
    b.synchronize()?;
    Ok(a.elapsed_ms(&b)? / (RUNS * REPLAYS) as f32)
}

/// The fastest of `plan`'s cuBLASLt proposals as `run` drives it (`time_gpu`; one eager run
/// first loads what a proposal loads lazily): its index and milliseconds, with the plan left on
/// it. A proposal that fails to run is skipped; None when none ran.
fn fastest_proposal(
    stream: &Arc<CudaStream>,
    plan: &mut GemmPlan,
    run: impl Fn(&GemmPlan) -> Result<(), GpuError>,
) -> Option<(usize, f32)> {
    let mut best: Option<(usize, f32)> = None;
    for i in 0..plan.candidates() {
        plan.pick(i);
        let ms = match run(plan) {
            Ok(()) => time_gpu(stream, || run(plan)).unwrap_or(f32::INFINITY),
            Err(_) => f32::INFINITY,
        };
        if ms.is_finite() && best.is_none_or(|(_, b)| ms < b) {
            best = Some((i, ms));
        }
    }
    if let Some((i, _)) = best {
        plan.pick(i);
    }
    best
}

/// Whether a convolution's bias (when it has one) is one per output channel, as the libraries'
/// epilogues take it: a bias per image (the UNet's time embedding at B > 1) is not.
fn channel_bias(shape: &ConvShape, bias: &Option<(Loc, usize)>) -> bool {
    bias.is_none_or(|(_, stride)| stride == 0 || shape.n == 1)
}

/// A 1x1, stride-1, unpadded convolution: channels-last, its input is already the GEMM's
/// left operand.
fn pointwise(s: &ConvShape) -> bool {
    s.kh == 1 && s.kw == 1 && s.stride == [1, 1] && s.pad == [0, 0]
}

/// Whether convolution `s` may run as im2col + GEMM.
fn lowerable(s: &ConvShape) -> bool {
    let flat = s.nhwc && s.groups == 1 && s.c.is_multiple_of(8);
    flat && (pointwise(s) || Layout::im2col_fits(s) && Layout::im2col_bytes(s) <= IM2COL_MAX_BYTES)
}

/// A prepared library call for a step.
enum Prepared {
    None,
    Conv(ConvPlan),
    /// A convolution lowered to im2col (none for a pointwise one) + GEMM; `in_gemm`: its bias
    /// and residual ride on the GEMM.
    ConvGemm {
        plan: GemmPlan,
        in_gemm: bool,
    },
    /// A one-launch group norm that writes the next step's (a convolution lowered to GEMM)
    /// patch matrix instead of its own output, which nothing else reads (an experiment,
    /// `LIPSTREAM_NORM_COLS=1`): the image width and the convolution's kernel size.
    NormToCols {
        w: usize,
        k: usize,
    },
    Gemm(GemmPlan),
    /// A thin convolution on our tensor-core kernel for its kind (the conv_out one's warps
    /// taking `rows` output rows each).
    Thin {
        kernel: Thin,
        rows: usize,
    },
    /// A convolution on a graph-API engine that pads its input itself: it reads `x`, what
    /// its pad step (`PadInput`) would have padded.
    PaddingConv {
        call: GraphCall,
        x: Loc,
    },
    /// A pad step its convolution does itself: nothing runs.
    Absorbed,
    /// A two-pass group norm whose output nobody reads: its statistics alone, for the
    /// convolution after it (`NormedOut`).
    NormStats,
    /// A convolution to 8 outputs of the norm before it, on `conv_out`'s normed kernel: it
    /// reads the norm's input and statistics instead of its output (`NormedConvs`).
    NormedOut(NormInput),
}

/// Our tensor-core kernels for thin convolutions (`ThinConvs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Thin {
    /// To 8 (padded) outputs: `kernels::conv_out`.
    Out,
    /// From at most 3 inputs: `kernels::conv_in`.
    In,
}

/// One graph at fixed shapes, ready to run.
pub struct Executor {
    plan: Plan,
    prepared: Vec<Prepared>,
    weight_ptrs: Vec<Ptr>,
    offsets: Vec<usize>,
    graph: Option<CudaGraph>,
    /// Bytes of arena this graph needs, and the least any placement could use.
    pub arena_bytes: usize,
    pub peak_bytes: usize,
}

impl Executor {
    /// Lowers `graph`, uploads its weights (shared through `rt` under `prefix`), places its
    /// activations and prepares every library call.
    pub fn new(
        rt: &mut Runtime,
        graph: &Graph,
        prefix: &str,
        opts: Options,
    ) -> Result<Self, GpuError> {
        let plan = plan::lower(graph, prefix)?;
        let weight_ptrs = plan
            .weights
            .iter()
            .map(|w| rt.upload(w))
            .collect::<Result<Vec<_>, _>>()?;
        let (offsets, arena_bytes) = arena::place(&plan.lifetimes, ALIGN);
        let peak_bytes = arena::peak(&plan.lifetimes, ALIGN);
        rt.reserve_arena(arena_bytes)?;
        let mut ex = Executor {
            plan,
            prepared: Vec::new(),
            weight_ptrs,
            offsets,
            graph: None,
            arena_bytes,
            peak_bytes,
        };
        let mut prepared = Vec::with_capacity(ex.plan.steps.len());
        let mut need_ws = 0;
        for step in &ex.plan.steps {
            let library = match step {
                Step::Conv {
                    shape,
                    x,
                    w,
                    y,
                    bias,
                    residual,
                    stats,
                } => {
                    let mut p = rt.conv.plan(*shape)?;
                    if let Some(t) = rt.tuned.get(shape) {
                        rt.conv
                            .set_algo(&mut p, t.algo, t.math, t.workspace_bytes)?;
                    } else if opts.tune {
                        rt.reserve_workspace(TUNE_WORKSPACE_BYTES)?;
                        let ws = rt.workspace_ptr();
                        // SAFETY: x, w and y are this step's operands (placed above, sized by
                        // the plan for `shape`); y is scratch until the step runs; the workspace
                        // holds TUNE_WORKSPACE_BYTES.
                        let ms = unsafe {
                            rt.conv.tune(
                                &mut p,
                                ex.ptr(rt, *x),
                                ex.ptr(rt, *w),
                                ex.ptr(rt, *y),
                                ws,
                                TUNE_WORKSPACE_BYTES,
                            )
                        }?;
                        rt.tuned.insert(
                            *shape,
                            Tuned {
                                algo: p.algo,
                                math: p.math,
                                workspace_bytes: p.workspace_bytes,
                                ms,
                            },
                        );
                    }
                    need_ws = need_ws.max(p.workspace_bytes);
                    // cuDNN's bias is one per output channel: a per-image one (the UNet's time
                    // embedding at B > 1) stays on our epilogue.
                    let fusable = bias.is_some() && channel_bias(shape, bias);
                    if fusable && opts.fuse != FuseConv::Never {
                        let key = FuseKey {
                            shape: *shape,
                            residual: residual.is_some(),
                            stats: stats.is_some(),
                        };
                        let decided = rt.fusions.get(&key).copied();
                        let fusion = match decided {
                            Some(f) if opts.fuse == FuseConv::Timed => Some(f),
                            _ if opts.fuse == FuseConv::Timed && !opts.tune => None,
                            _ => {
                                let f = ex.time_fusion(rt, &p, step, opts.fuse)?;
                                if opts.fuse == FuseConv::Timed {
                                    rt.fusions.insert(key, f);
                                }
                                Some(f)
                            }
                        };
                        if let Some(t) = fusion.and_then(|f| f.fused) {
                            if let Some(call) = rt.conv.fused(&p, t.algo, t.math)? {
                                need_ws = need_ws.max(call.workspace_bytes);
                                rt.conv.keep_fused(&mut p, call)?;
                            }
                        }
                    }
                    if opts.graphs != ConvGraphs::Never {
                        need_ws = need_ws.max(ex.choose_graph(rt, &mut p, step, opts)?);
                    }
                    match ex.lower_conv(rt, &p, step, opts)? {
                        Some((plan, in_gemm, cols_bytes)) => {
                            need_ws = need_ws.max(cols_bytes);
                            Prepared::ConvGemm { plan, in_gemm }
                        }
                        None => Prepared::Conv(p),
                    }
                }
                Step::Gemm {
                    gemm,
                    a,
                    b,
                    bias,
                    residual,
                    gelu,
                    c,
                } => {
                    let key = LinearKey::of(gemm, bias.is_some(), residual.is_some(), *gelu);
                    let bias = bias.map(|b| ex.ptr(rt, b));
                    let mut plan = rt.blas.plan(*gemm, bias, residual.is_some(), *gelu)?;
                    match rt.linears.get(&key).copied() {
                        // Another cuBLASLt may propose a shorter list (engine files refuse
                        // other versions, so this is a fallback, not a path): the first then.
                        Some(c) => {
                            plan.pick(c.algo);
                        }
                        None if opts.tune && plan.candidates() > 1 => {
                            let (pa, pb) = (ex.ptr(rt, *a), ex.ptr(rt, *b));
                            let (pr, pc) = (residual.map_or(0, |r| ex.ptr(rt, r)), ex.ptr(rt, *c));
                            // Timed in graphs as a frame replays them: eagerly, a GEMM of the
                            // UNet at one image measures cuBLASLt's launch on the CPU (9-10 µs
                            // for every proposal), not the GPU's 2-6 µs.
                            // SAFETY: a, b, residual and c are this step's operands, placed and
                            // sized by the plan; c is scratch until the step runs; every
                            // proposal fits the plan's workspace.
                            let timed = fastest_proposal(rt.stream(), &mut plan, |p| unsafe {
                                rt.blas.gemm(p, pa, pb, pr, pc)
                            });
                            if let Some((algo, ms)) = timed {
                                rt.linears.insert(key, LinearChoice { algo, ms });
                            }
                        }
                        None => {}
                    }
                    Prepared::Gemm(plan)
                }
                _ => Prepared::None,
            };
            prepared.push(match Self::thin_kernel(step) {
                Some(kernel) => ex.choose_thin(rt, step, kernel, library, opts)?,
                None => library,
            });
        }
        need_ws = need_ws.max(ex.absorb_pads(rt, &mut prepared, opts)?);
        rt.reserve_workspace(need_ws)?;
        rt.workspace_need = rt.workspace_need.max(need_ws);
        if Experiment::NormCols.on() {
            ex.norms_into_cols(&mut prepared);
        }
        if opts.normed != NormedConvs::Never {
            ex.norms_into_convs(rt, &mut prepared, opts.normed);
        }
        ex.prepared = prepared;
        Ok(ex)
    }

    /// Lets each convolution whose input its pad step wrote (`PadInput`: the VAE encoder's
    /// downsamplers, padded 0 before and 1 after) read the unpadded input on a graph-API
    /// engine that takes the padding itself, where the build times that at least 3 % faster
    /// than the pad copy and the convolution as prepared; the pad step then runs nothing.
    /// Returns the workspace the kept plans need. On an H100 every VAE-encoder downsampler
    /// takes it (a camera frame 1.0-1.5 % faster, bench/results/2026-12-06_h100_pad_conv).
    fn absorb_pads(
        &self,
        rt: &mut Runtime,
        prepared: &mut [Prepared],
        opts: Options,
    ) -> Result<usize, GpuError> {
        if opts.graphs == ConvGraphs::Never {
            return Ok(0);
        }
        let mut need_ws = 0;
        for s in 1..self.plan.steps.len() {
            let step = &self.plan.steps[s];
            let (Some(input), Some(mut key)) =
                (PadInput::of(&self.plan.steps, s), Self::graph_key(step))
            else {
                continue;
            };
            key.shape = input.conv_shape(&key.shape);
            let call = match rt.graph_convs.get(&key) {
                Some(d) if opts.graphs == ConvGraphs::Timed => match &d.choice {
                    Some(choice) => Some(key.call(rt, choice)?),
                    None => None,
                },
                _ if opts.graphs == ConvGraphs::Timed && !opts.tune => None,
                _ => {
                    let pad_step = &self.plan.steps[s - 1];
                    let as_prepared = &prepared[s];
                    // SAFETY: both steps' own operands, placed and sized by the plan; the
                    // padded buffer and y are scratch until the steps run; the workspace holds
                    // what the prepared convolution asks (TUNE_WORKSPACE_BYTES at least).
                    let padded = |rt: &Runtime, ws: Ptr| unsafe {
                        self.run_pad(rt, pad_step)?;
                        self.run_conv_prepared(rt, step, as_prepared, ws)
                    };
                    let (d, call) =
                        self.time_graph_against(rt, step, input.x, &key, opts.graphs, &padded)?;
                    if opts.graphs == ConvGraphs::Timed {
                        rt.graph_convs.insert(key, d);
                    }
                    call
                }
            };
            if let Some(call) = call {
                need_ws = need_ws.max(call.plan.workspace_bytes);
                prepared[s - 1] = Prepared::Absorbed;
                prepared[s] = Prepared::PaddingConv { call, x: input.x };
            }
        }
        Ok(need_ws)
    }

    /// Runs pad step `step`.
    ///
    /// # Safety
    /// `step` is one of this executor's steps, its operands placed.
    unsafe fn run_pad(&self, rt: &Runtime, step: &Step) -> Result<(), GpuError> {
        let Step::Pad { x, y, nhwc, pad } = step else {
            return Ok(());
        };
        // SAFETY: per the caller's contract, the plan sized x and y for nhwc and pad.
        unsafe {
            rt.kernels
                .layout
                .pad_nhwc(rt.stream(), self.ptr(rt, *x), self.ptr(rt, *y), *nhwc, *pad)
        }
    }

    /// Runs convolution `step` as `prepared` for a library or our kernel, its epilogue
    /// included (for timings: nothing marks the boundary).
    ///
    /// # Safety
    /// `step` is one of this executor's convolutions, its operands placed; `ws` holds what
    /// `prepared` needs.
    unsafe fn run_conv_prepared(
        &self,
        rt: &Runtime,
        step: &Step,
        prepared: &Prepared,
        ws: Ptr,
    ) -> Result<(), GpuError> {
        // SAFETY: per the caller's contract.
        unsafe {
            match prepared {
                Prepared::Conv(plan) => self.run_conv(rt, step, plan, ws, &mut |_| Ok(())),
                Prepared::ConvGemm { plan, in_gemm } => {
                    self.run_conv_gemm(rt, step, plan, *in_gemm, false, ws, &mut |_| Ok(()))
                }
                Prepared::Thin { kernel, rows } => {
                    self.run_thin(rt, rt.stream(), step, *kernel, *rows)?;
                    self.conv_epilogue(rt, step, true)
                }
                _ => Err(GpuError::Capture(
                    "a convolution prepared for no library or kernel".into(),
                )),
            }
        }
    }

    /// Lets each one-launch group norm whose only reader is the next step, a k x k "same"
    /// convolution lowered to im2col + GEMM, write that convolution's patches itself: one
    /// launch less per such pair (the resnets' norm -> SiLU -> conv at the UNet's small stages,
    /// B=1). Both run back to back on the workspace, which holds the patches.
    fn norms_into_cols(&self, prepared: &mut [Prepared]) {
        let steps = &self.plan.steps;
        // Steps (and graph outputs) touching each arena buffer.
        let mut touches: HashMap<usize, usize> = HashMap::new();
        let locs = steps
            .iter()
            .flat_map(Step::locs)
            .chain(self.plan.outputs.iter().map(|o| o.loc));
        for l in locs {
            if let Loc::Arena(b, _) = l {
                *touches.entry(b).or_default() += 1;
            }
        }
        for i in 1..steps.len() {
            let (Step::Conv { shape, x, .. }, Step::GroupNorm { shape: norm, y, .. }) =
                (&steps[i], &steps[i - 1])
            else {
                continue;
            };
            let same = shape.nhwc
                && shape.groups == 1
                && shape.kh == shape.kw
                && shape.stride == [1, 1]
                && shape.pad == [shape.kh / 2, shape.kw / 2]
                && !pointwise(shape)
                && (shape.n, shape.h * shape.w, shape.c) == (norm.n, norm.hw, norm.c)
                // 16-byte vectors only: scattered as 4-byte ones (groups of 10-30 channels,
                // the 16x16 and 32x32 stages) the patches cost the norm more than the im2col
                // launch saved (H100, 2026-12-06).
                && (norm.c / norm.groups.max(1)).is_multiple_of(8)
                && GroupNorm::fits_cols(norm, shape.w, shape.kh);
            let Loc::Arena(buffer, 0) = *y else {
                continue;
            };
            // The norm writes y and the convolution reads it: nothing else may.
            let only_pair = touches.get(&buffer) == Some(&2);
            if !same || x != y || !only_pair || !matches!(prepared[i], Prepared::ConvGemm { .. }) {
                continue;
            }
            prepared[i - 1] = Prepared::NormToCols {
                w: shape.w,
                k: shape.kh,
            };
        }
    }

    /// Lets each convolution to 8 outputs of a two-pass group norm that nothing else reads
    /// (`NormInput`) normalise the norm's input itself, whatever the convolution was prepared
    /// on, where `normed` allows: the norm then computes its statistics only.
    fn norms_into_convs(&self, rt: &Runtime, prepared: &mut [Prepared], normed: NormedConvs) {
        for s in 1..self.plan.steps.len() {
            let Some(norm) = NormInput::of(&self.plan.steps, &self.plan.outputs, s) else {
                continue;
            };
            let Step::Conv { shape, .. } = &self.plan.steps[s] else {
                continue;
            };
            if normed == NormedConvs::Large && !conv_out::normed_pays(shape) {
                continue;
            }
            // The kernel reads x, gamma and beta as 16-byte vectors (the arena's base is
            // aligned more, so its offsets decide for good).
            let p = |l: Loc| self.ptr(rt, l);
            if crate::kernels::elementwise::aligned16(&[p(norm.x), p(norm.gamma), p(norm.beta)]) {
                prepared[s - 1] = Prepared::NormStats;
                prepared[s] = Prepared::NormedOut(norm);
            }
        }
    }

    /// How many convolutions normalise their input themselves (`Prepared::NormedOut`).
    pub fn normed_convs(&self) -> usize {
        self.prepared
            .iter()
            .filter(|p| matches!(p, Prepared::NormedOut(_)))
            .count()
    }

    /// How many group norms write a convolution's patches (`Prepared::NormToCols`).
    pub fn norms_to_cols(&self) -> usize {
        self.prepared
            .iter()
            .filter(|p| matches!(p, Prepared::NormToCols { .. }))
            .count()
    }

    /// A convolution step's epilogue kernel: bias, residual and group-norm sums, or — after
    /// the fused call (`fused`) — the sums alone, read without writing y back. Nothing to do
    /// launches nothing.
    ///
    /// # Safety
    /// `step` is one of this executor's convolutions, its operands placed.
    unsafe fn conv_epilogue(&self, rt: &Runtime, step: &Step, fused: bool) -> Result<(), GpuError> {
        let Step::Conv {
            shape,
            y,
            bias,
            residual,
            stats,
            ..
        } = step
        else {
            return Ok(());
        };
        let (bias, residual) = if fused {
            (None, None)
        } else {
            (*bias, *residual)
        };
        if bias.is_none() && residual.is_none() && stats.is_none() {
            return Ok(());
        }
        let p = |l: Loc| self.ptr(rt, l);
        let (ho, wo) = shape.out_hw();
        let n = shape.n * shape.o * ho * wo;
        let (b, stride) = bias.map_or((0, 0), |(l, st)| (p(l), st));
        let inner = if shape.nhwc { 1 } else { ho * wo };
        // SAFETY: per the caller's contract, the plan sized y, bias, residual and the sums'
        // scratch for this shape.
        unsafe {
            rt.kernels.elementwise.bias_residual(
                rt.stream(),
                p(*y),
                b,
                residual.map_or(0, p),
                n,
                shape.o * ho * wo,
                stride,
                inner,
                shape.o,
                stats.map(|(l, g)| (p(l), g)),
            )
        }
    }

    /// Which of our thin-convolution kernels can run convolution `step`: its shape fits, no
    /// residual, a bias (if any) one per channel. Group-norm sums stay on the epilogue kernel.
    fn thin_kernel(step: &Step) -> Option<Thin> {
        let Step::Conv {
            shape,
            bias,
            residual: None,
            ..
        } = step
        else {
            return None;
        };
        if !channel_bias(shape, bias) {
            None
        } else if conv_out::fits(shape) {
            Some(Thin::Out)
        } else if conv_in::fits(shape) {
            Some(Thin::In)
        } else {
            None
        }
    }

    /// Runs thin convolution `step` on `kernel`.
    ///
    /// # Safety
    /// `step` is one of this executor's convolutions that `kernel` fits, its operands placed.
    unsafe fn run_thin(
        &self,
        rt: &Runtime,
        stream: &CudaStream,
        step: &Step,
        kernel: Thin,
        rows: usize,
    ) -> Result<(), GpuError> {
        let Step::Conv {
            shape,
            x,
            w,
            y,
            bias,
            ..
        } = step
        else {
            return Err(GpuError::Capture(
                "a thin-convolution kernel for a step that is no convolution".into(),
            ));
        };
        let p = |l: Loc| self.ptr(rt, l);
        let b = bias.map_or(0, |(l, _)| p(l));
        // SAFETY: per the caller's contract; the plan sized x, w, bias and y for `shape`.
        unsafe {
            match kernel {
                Thin::Out => {
                    rt.kernels
                        .conv_out
                        .forward(stream, shape, p(*x), p(*w), b, p(*y), rows)
                }
                Thin::In => rt
                    .kernels
                    .conv_in
                    .forward(stream, shape, p(*x), p(*w), b, p(*y)),
            }
        }
    }

    /// `library` (convolution `step` as prepared for cuDNN or cuBLASLt), or our tensor-core
    /// kernel `kernel` for it, as `opts` and its timing say.
    fn choose_thin(
        &self,
        rt: &mut Runtime,
        step: &Step,
        kernel: Thin,
        library: Prepared,
        opts: Options,
    ) -> Result<Prepared, GpuError> {
        let Step::Conv { shape, bias, .. } = step else {
            return Ok(library);
        };
        let key = MmaKey {
            shape: *shape,
            bias: bias.is_some(),
        };
        let rows = match opts.mma {
            ThinConvs::Never => None,
            ThinConvs::Always { rows } => Some(rows),
            ThinConvs::Timed => match rt.mma_convs.get(&key) {
                Some(d) => d.mma.then_some(d.rows),
                None if !opts.tune => None,
                None => {
                    let d = self.time_thin(rt, step, kernel, &library)?;
                    rt.mma_convs.insert(key, d);
                    d.mma.then_some(d.rows)
                }
            },
        };
        Ok(match rows {
            Some(rows) => Prepared::Thin { kernel, rows },
            None => library,
        })
    }

    /// Times convolution `step` as `library` prepared it (its epilogue included) against our
    /// tensor-core kernel `kernel` (the conv_out one with one and with two rows a warp), on its
    /// real buffers. y is scratch until the step runs.
    fn time_thin(
        &self,
        rt: &mut Runtime,
        step: &Step,
        kernel: Thin,
        library: &Prepared,
    ) -> Result<MmaConv, GpuError> {
        rt.reserve_workspace(TUNE_WORKSPACE_BYTES.max(IM2COL_MAX_BYTES))?;
        let ws = rt.workspace_ptr();
        let stream = rt.stream().clone();
        let rt = &*rt;
        // SAFETY: the step's own operands, placed and sized by the plan; the workspace holds
        // more than any library path asks. Each way runs eagerly once before its capture, so
        // that what it loads lazily is loaded.
        let lib = || unsafe { self.run_conv_prepared(rt, step, library, ws) };
        lib()?;
        let library_ms = time_gpu(&stream, lib)?;
        let rows: &[usize] = match kernel {
            Thin::Out => &conv_out::TILE_ROWS,
            Thin::In => &[1],
        };
        let mut best = (1, f32::INFINITY);
        for &r in rows {
            // SAFETY: as above; `kernel` fits the step (`thin_kernel`).
            let run = || unsafe {
                self.run_thin(rt, &stream, step, kernel, r)?;
                self.conv_epilogue(rt, step, true)
            };
            run()?;
            let ms = time_gpu(&stream, run)?;
            if ms < best.1 {
                best = (r, ms);
            }
        }
        // Ours must win clearly: the timings carry a few percent of noise.
        Ok(MmaConv {
            mma: best.1 < 0.97 * library_ms,
            rows: best.0,
            mma_ms: best.1,
            library_ms,
        })
    }

    /// Convolution `step` as im2col + GEMM when `opts` and its timing say so: the GEMM's plan,
    /// whether the bias and residual ride on it, and the workspace the patches take.
    fn lower_conv(
        &self,
        rt: &mut Runtime,
        conv: &ConvPlan,
        step: &Step,
        opts: Options,
    ) -> Result<Option<(GemmPlan, bool, usize)>, GpuError> {
        let Step::Conv {
            shape,
            bias,
            residual,
            stats,
            ..
        } = step
        else {
            return Ok(None);
        };
        if opts.gemm == ConvAsGemm::Never || !lowerable(shape) {
            return Ok(None);
        }
        let cols_bytes = if pointwise(shape) {
            0
        } else {
            Layout::im2col_bytes(shape)
        };
        let key = GemmKey {
            shape: *shape,
            channel_bias: channel_bias(shape, bias),
            residual: residual.is_some(),
            stats: stats.is_some(),
        };
        let algo = match rt.gemm_convs.get(&key).copied() {
            Some(d) if opts.gemm == ConvAsGemm::Timed => d.algo,
            _ if opts.gemm == ConvAsGemm::Timed && !opts.tune => None,
            _ => {
                let d = self.time_gemm(rt, conv, step, &key, opts.gemm)?;
                if opts.gemm == ConvAsGemm::Timed {
                    rt.gemm_convs.insert(key, d);
                }
                d.algo
            }
        };
        let Some(i) = algo else {
            return Ok(None);
        };
        let mut plan = self.conv_gemm_plan(rt, step, &key)?;
        // Another cuBLASLt may propose a shorter list (engine files refuse other versions, so
        // this is a fallback, not a path): cuDNN then.
        Ok(plan.pick(i).then_some((plan, key.channel_bias, cols_bytes)))
    }

    /// The GEMM of a lowered convolution: patches [n * ho * wo, kh * kw * c] · filterᵀ, with the
    /// channel bias and the residual in its epilogue when `key` says they fit there.
    fn conv_gemm_plan(
        &self,
        rt: &Runtime,
        step: &Step,
        key: &GemmKey,
    ) -> Result<GemmPlan, GpuError> {
        let Step::Conv {
            shape,
            bias,
            residual,
            ..
        } = step
        else {
            return Err(GpuError::Capture(
                "a GEMM plan for a step that is no convolution".into(),
            ));
        };
        let (ho, wo) = shape.out_hw();
        let g = Gemm::linear(shape.n * ho * wo, shape.kh * shape.kw * shape.c, shape.o);
        let b = bias
            .filter(|_| key.channel_bias)
            .map(|(l, _)| self.ptr(rt, l));
        rt.blas
            .plan(g, b, key.channel_bias && residual.is_some(), false)
    }

    /// Times convolution `step` on cuDNN as prepared (its epilogue included) against im2col +
    /// each of cuBLASLt's proposed algorithms on its real buffers, and says which to keep.
    /// `Always` keeps the fastest GEMM. y and the sums are scratch until the step runs.
    fn time_gemm(
        &self,
        rt: &mut Runtime,
        conv: &ConvPlan,
        step: &Step,
        key: &GemmKey,
        mode: ConvAsGemm,
    ) -> Result<GemmConv, GpuError> {
        rt.reserve_workspace(TUNE_WORKSPACE_BYTES.max(IM2COL_MAX_BYTES))?;
        let ws = rt.workspace_ptr();
        let stream = rt.stream().clone();
        let rt = &*rt;
        // SAFETY: the step's own operands, placed and sized by the plan; the workspace holds
        // more than the patches and the cuDNN algorithm ask. Each way runs eagerly once before
        // its capture, so that what it loads lazily is loaded.
        let cudnn = || unsafe { self.run_conv(rt, step, conv, ws, &mut |_| Ok(())) };
        cudnn()?;
        let cudnn_ms = time_gpu(&stream, cudnn)?;
        let mut plan = self.conv_gemm_plan(rt, step, key)?;
        // SAFETY: as above.
        let best = fastest_proposal(&stream, &mut plan, |p| unsafe {
            self.run_conv_gemm(rt, step, p, key.channel_bias, false, ws, &mut |_| Ok(()))
        });
        let gemm_ms = best.map(|(_, ms)| ms);
        // The GEMM must win clearly: the timings carry a few percent of noise.
        let keep = match mode {
            ConvAsGemm::Always => best.is_some(),
            _ => gemm_ms.is_some_and(|ms| ms < 0.97 * cudnn_ms),
        };
        Ok(GemmConv {
            algo: best.filter(|_| keep).map(|(i, _)| i),
            gemm_ms,
            cudnn_ms,
        })
    }

    /// Runs convolution `step` on cuDNN (its fused call when the plan keeps one), then its
    /// epilogue; `lap` marks the boundary.
    ///
    /// # Safety
    /// `step` is one of this executor's convolutions, its operands placed; `ws` holds the
    /// plan's workspace.
    unsafe fn run_conv(
        &self,
        rt: &Runtime,
        step: &Step,
        plan: &ConvPlan,
        ws: Ptr,
        lap: &mut dyn FnMut(&'static str) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        let Step::Conv {
            x,
            w,
            y,
            bias,
            residual,
            ..
        } = step
        else {
            return Ok(());
        };
        let p = |l: Loc| self.ptr(rt, l);
        // SAFETY: per the caller's contract.
        unsafe {
            if let Some(call) = &plan.graph {
                return self.run_graph_call(rt, step, *x, call, ws, lap);
            }
            if let Some(call) = &plan.fused {
                let b = bias.map_or(0, |(l, _)| p(l));
                rt.conv.forward_fused(
                    plan,
                    call,
                    p(*x),
                    p(*w),
                    b,
                    residual.map_or(0, p),
                    p(*y),
                    ws,
                )?;
            } else {
                rt.conv.forward(plan, p(*x), p(*w), p(*y), ws)?;
            }
            lap("conv")?;
            self.conv_epilogue(rt, step, plan.fused.is_some())
        }
    }

    /// Runs convolution `step` on graph-API call `call`, reading `x` (`run_graph`), then what
    /// is left of its epilogue; `lap` marks the boundary.
    ///
    /// # Safety
    /// As for `run_graph`.
    unsafe fn run_graph_call(
        &self,
        rt: &Runtime,
        step: &Step,
        x: Loc,
        call: &GraphCall,
        ws: Ptr,
        lap: &mut dyn FnMut(&'static str) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        // SAFETY: per the caller's contract.
        unsafe {
            self.run_graph(rt, step, x, &call.plan, ws)?;
            lap("conv")?;
            self.conv_epilogue(rt, step, call.graph.key.bias)
        }
    }

    /// Runs convolution `step` on graph-API plan `plan` (the bias too when its graph adds one),
    /// reading input `x`: the step's own, or its pad step's when the plan pads (`PadInput`).
    ///
    /// # Safety
    /// As for `run_conv`; `ws` holds the plan's workspace; x holds the plan's input shape.
    unsafe fn run_graph(
        &self,
        rt: &Runtime,
        step: &Step,
        x: Loc,
        plan: &GraphPlan,
        ws: Ptr,
    ) -> Result<(), GpuError> {
        let Step::Conv { w, y, bias, .. } = step else {
            return Ok(());
        };
        let p = |l: Loc| self.ptr(rt, l);
        let args = GraphArgs {
            x: p(x),
            w: p(*w),
            bias: bias.map_or(0, |(l, _)| p(l)),
            y: p(*y),
            workspace: ws,
        };
        // SAFETY: per the caller's contract; the plan's graph was made for this step's shape.
        unsafe { plan.execute(rt.conv.handle(), &args) }
    }

    /// The graph-API key of convolution `step`: its bias rides on the graph when it is one per
    /// channel and no residual follows (the graph API runs a residual only on engines it
    /// compiles at run time, which lost everywhere).
    fn graph_key(step: &Step) -> Option<GraphConvKey> {
        let Step::Conv {
            shape,
            bias,
            residual,
            stats,
            ..
        } = step
        else {
            return None;
        };
        if !shape.nhwc || shape.groups != 1 {
            return None;
        }
        Some(GraphConvKey {
            shape: *shape,
            bias_in_graph: bias.is_some() && channel_bias(shape, bias) && residual.is_none(),
            residual: residual.is_some(),
            stats: stats.is_some(),
        })
    }

    /// Decides (or replays the decision) whether convolution `step` runs on a graph-API
    /// engine, and keeps that call on `p` when it does; returns the workspace it needs.
    fn choose_graph(
        &self,
        rt: &mut Runtime,
        p: &mut ConvPlan,
        step: &Step,
        opts: Options,
    ) -> Result<usize, GpuError> {
        let Some(key) = Self::graph_key(step) else {
            return Ok(0);
        };
        let choice = match rt.graph_convs.get(&key) {
            Some(d) if opts.graphs == ConvGraphs::Timed => d.choice.clone(),
            _ if opts.graphs == ConvGraphs::Timed && !opts.tune => None,
            _ => {
                let (d, call) = self.time_graph(rt, p, step, &key, opts.graphs)?;
                if opts.graphs == ConvGraphs::Timed {
                    rt.graph_convs.insert(key, d);
                }
                // The timed winner's plan is kept as it is.
                let ws = call.as_ref().map_or(0, |c| c.plan.workspace_bytes);
                p.graph = call;
                return Ok(ws);
            }
        };
        let Some(choice) = choice else {
            return Ok(0);
        };
        let call = key.call(rt, &choice)?;
        let ws = call.plan.workspace_bytes;
        p.graph = Some(call);
        Ok(ws)
    }

    /// Times convolution `step` as prepared on the legacy call (its epilogue included) against
    /// each configuration cuDNN's heuristics propose for its graph (with what is left of the
    /// epilogue), and says which to keep, with the kept configuration's call. `Always` keeps
    /// the first configuration that runs. Runs on the stream outside any capture; y and the
    /// sums are scratch until then.
    fn time_graph(
        &self,
        rt: &mut Runtime,
        p: &ConvPlan,
        step: &Step,
        key: &GraphConvKey,
        mode: ConvGraphs,
    ) -> Result<(GraphConv, Option<GraphCall>), GpuError> {
        let Step::Conv { x, .. } = step else {
            return Err(GpuError::Capture(
                "a graph-API plan for no convolution".into(),
            ));
        };
        // SAFETY: the operands are the step's own (placed, sized by the plan); y and the sums'
        // scratch hold nothing yet; the workspace holds TUNE_WORKSPACE_BYTES.
        let legacy =
            |rt: &Runtime, ws: Ptr| unsafe { self.run_conv(rt, step, p, ws, &mut |_| Ok(())) };
        self.time_graph_against(rt, step, *x, key, mode, &legacy)
    }

    /// `time_graph` for graph `key` reading input `x`, against `baseline` (how the step runs
    /// otherwise, given the workspace).
    fn time_graph_against(
        &self,
        rt: &mut Runtime,
        step: &Step,
        x: Loc,
        key: &GraphConvKey,
        mode: ConvGraphs,
        baseline: &dyn Fn(&Runtime, Ptr) -> Result<(), GpuError>,
    ) -> Result<(GraphConv, Option<GraphCall>), GpuError> {
        // The baseline may be a convolution lowered to im2col + GEMM, its patches in the
        // workspace.
        rt.reserve_workspace(TUNE_WORKSPACE_BYTES.max(IM2COL_MAX_BYTES))?;
        let ws = rt.workspace_ptr();
        let stream = rt.stream().clone();
        let rt = &*rt;
        // Each way runs once eagerly first, so that what it loads lazily is loaded before its
        // capture.
        let legacy = || baseline(rt, ws);
        legacy()?;
        let legacy_ms = time_gpu(&stream, legacy)?;
        let graph = key.graph(rt)?;
        // A graph cuDNN proposes nothing for is as good as no proposal.
        let choices = graph.choices().unwrap_or_default();
        let mut best: Option<(GraphPlan, f32)> = None;
        for choice in choices.into_iter().take(GRAPH_CHOICES_MAX) {
            let Ok(plan) = graph.plan(rt.conv.handle(), &choice) else {
                continue;
            };
            if plan.workspace_bytes > TUNE_WORKSPACE_BYTES {
                continue;
            }
            // SAFETY: the operands are the step's own and x, placed and sized by the plan; y
            // and the sums' scratch hold nothing yet; the workspace holds
            // TUNE_WORKSPACE_BYTES, more than the plan asks (checked above).
            let run = || unsafe {
                self.run_graph(rt, step, x, &plan, ws)?;
                self.conv_epilogue(rt, step, key.bias_in_graph)
            };
            let ms = match run() {
                // A plan cuDNN cannot capture is as good as refused: executors are graphs.
                Ok(()) => time_gpu(&stream, run).unwrap_or(f32::INFINITY),
                Err(_) => f32::INFINITY,
            };
            if ms.is_finite() && best.as_ref().is_none_or(|(_, b)| ms < *b) {
                best = Some((plan, ms));
            }
            if mode == ConvGraphs::Always && best.is_some() {
                break;
            }
        }
        let graph_ms = best.as_ref().map(|(_, ms)| *ms);
        // A configuration must win clearly: the timings carry a few percent of noise.
        let keep = match mode {
            ConvGraphs::Always => best.is_some(),
            _ => graph_ms.is_some_and(|g| g < 0.97 * legacy_ms),
        };
        let plan = best.filter(|_| keep).map(|(plan, _)| plan);
        let decision = GraphConv {
            choice: plan.as_ref().map(|p| p.choice.clone()),
            graph_ms,
            legacy_ms,
        };
        Ok((decision, plan.map(|plan| GraphCall { graph, plan })))
    }

    /// Runs convolution `step` as im2col into `ws` (a pointwise one reads x as it is) + the
    /// GEMM, then what is left of its epilogue; `lap` marks the boundary.
    ///
    /// # Safety
    /// As for `run_conv`; `ws` holds the patches (`Layout::im2col_bytes`).
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_conv_gemm(
        &self,
        rt: &Runtime,
        step: &Step,
        plan: &GemmPlan,
        in_gemm: bool,
        cols_ready: bool,
        ws: Ptr,
        lap: &mut dyn FnMut(&'static str) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        let Step::Conv {
            shape,
            x,
            w,
            y,
            residual,
            ..
        } = step
        else {
            return Ok(());
        };
        let p = |l: Loc| self.ptr(rt, l);
        // SAFETY: per the caller's contract; the plan was made for this shape.
        unsafe {
            let a = if pointwise(shape) {
                p(*x)
            } else {
                if !cols_ready {
                    rt.kernels.layout.im2col(rt.stream(), p(*x), ws, shape)?;
                }
                ws
            };
            let r = if in_gemm { residual.map_or(0, p) } else { 0 };
            rt.blas.gemm(plan, a, p(*w), r, p(*y))?;
            lap("conv")?;
            self.conv_epilogue(rt, step, in_gemm)
        }
    }

    /// Times convolution `step` both ways on its real buffers — the plain call (its tuned
    /// algorithm) and our epilogue, against cuDNN's fused call (each algorithm that takes it)
    /// and the read-only sums — and says which to keep. `Always` keeps any fused call cuDNN
    /// runs. Runs on the stream outside any capture; y and the sums are scratch until then.
    fn time_fusion(
        &self,
        rt: &mut Runtime,
        plan: &ConvPlan,
        step: &Step,
        fuse: FuseConv,
    ) -> Result<Fusion, GpuError> {
        use cudnnConvolutionFwdAlgo_t as A;
        let Step::Conv {
            x,
            w,
            y,
            bias,
            residual,
            ..
        } = step
        else {
            return Err(GpuError::Capture(
                "fusion timing of a step that is no convolution".into(),
            ));
        };
        rt.reserve_workspace(TUNE_WORKSPACE_BYTES)?;
        let ws = rt.workspace_ptr();
        let p = |l: Loc| self.ptr(rt, l);
        let (px, pw, py) = (p(*x), p(*w), p(*y));
        let pb = bias.map_or(0, |(l, _)| p(l));
        let pr = residual.map_or(0, p);
        let stream = rt.stream().clone();
        // SAFETY: the operands are the step's own (placed, sized by the plan); y and the sums'
        // scratch hold nothing yet; the workspace holds TUNE_WORKSPACE_BYTES. Each way runs once
        // eagerly first, so that what it loads lazily is loaded before its capture.
        let plain = || unsafe {
            rt.conv.forward(plan, px, pw, py, ws)?;
            self.conv_epilogue(rt, step, false)
        };
        plain()?;
        let plain_ms = time_gpu(&stream, plain)?;
        let mut best: Option<(Tuned, f32)> = None;
        let mut candidates = vec![(plan.algo, plan.math)];
        for algo in [
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        ] {
            if !candidates.iter().any(|c| c.0 == algo) {
                candidates.push((algo, cudnnMathType_t::CUDNN_TENSOR_OP_MATH));
            }
        }
        for (algo, math) in candidates {
            let Some(call) = rt.conv.fused(plan, algo, math)? else {
                continue;
            };
            if call.workspace_bytes > TUNE_WORKSPACE_BYTES {
                continue;
            }
            rt.conv.set_math(plan, math)?;
            // SAFETY: as above.
            let run = || unsafe {
                rt.conv.forward_fused(plan, &call, px, pw, pb, pr, py, ws)?;
                self.conv_epilogue(rt, step, true)
            };
            // cuDNN refuses an algorithm that cannot fuse with a status, not a fault: try once.
            let ms = match run() {
                // A call cuDNN cannot capture is as good as refused: executors are graphs.
                Ok(()) => time_gpu(&stream, run).unwrap_or(f32::INFINITY),
                Err(_) => f32::INFINITY,
            };
            if ms.is_finite() && best.is_none_or(|(_, b)| ms < b) {
                best = Some((
                    Tuned {
                        algo,
                        math,
                        workspace_bytes: call.workspace_bytes,
                        ms,
                    },
                    ms,
                ));
            }
        }
        rt.conv.set_math(plan, plan.math)?;
        let fused_ms = best.map_or(f32::INFINITY, |(_, ms)| ms);
        // A fused call must win clearly: the timings carry a few percent of noise.
        let keep = match fuse {
            FuseConv::Always => best.is_some(),
            _ => fused_ms < 0.97 * plain_ms,
        };
        Ok(Fusion {
            fused: best.filter(|_| keep).map(|(t, _)| t),
            fused_ms,
            plain_ms,
        })
    }

    /// The device address of an operand.
    fn ptr(&self, rt: &Runtime, loc: Loc) -> Ptr {
        match loc {
            Loc::None => 0,
            Loc::Arena(b, o) => rt.arena_ptr() + (self.offsets[b] + 2 * o) as u64,
            Loc::Weight(w, o) => self.weight_ptrs[w] + (2 * o) as u64,
        }
    }

    /// The graph's inputs and outputs.
    pub fn inputs(&self) -> &[Binding] {
        &self.plan.inputs
    }

    pub fn outputs(&self) -> &[Binding] {
        &self.plan.outputs
    }

    /// Steps, for reports.
    pub fn steps(&self) -> &[Step] {
        &self.plan.steps
    }

    /// Each step's library choice, for profiles: a convolution's cuDNN algorithm (and whether
    /// its bias rides on the fused call); empty for other steps.
    pub fn choices(&self) -> Vec<String> {
        self.prepared
            .iter()
            .map(|p| match p {
                Prepared::Conv(c) => match (&c.graph, &c.fused) {
                    (Some(g), _) => format!(
                        "graph engine {}{}",
                        g.plan.choice.engine,
                        if g.graph.key.bias {
                            ", bias in the graph"
                        } else {
                            ""
                        }
                    ),
                    (None, Some(f)) => format!("{:?} fused", f.algo),
                    (None, None) => format!("{:?}", c.algo),
                },
                Prepared::ConvGemm { in_gemm, .. } => match in_gemm {
                    true => "im2col + cuBLASLt, bias in the GEMM".into(),
                    false => "im2col + cuBLASLt".into(),
                },
                Prepared::Thin {
                    kernel: Thin::Out,
                    rows,
                } => format!("tensor-core kernel to 8 outputs, {rows} rows a warp"),
                Prepared::Thin {
                    kernel: Thin::In, ..
                } => "tensor-core kernel from 3 inputs".into(),
                Prepared::PaddingConv { call, .. } => format!(
                    "graph engine {}, padding {:?} before and {:?} after{}",
                    call.plan.choice.engine,
                    call.graph.key.shape.pad,
                    call.graph.key.shape.post_pad(),
                    if call.graph.key.bias {
                        ", bias in the graph"
                    } else {
                        ""
                    }
                ),
                Prepared::Absorbed => "done by the convolution".into(),
                Prepared::NormStats => "statistics only, normalised by the convolution".into(),
                Prepared::NormedOut(_) => {
                    "tensor-core kernel to 8 outputs, normalising its input".into()
                }
                _ => String::new(),
            })
            .collect()
    }

    /// How many convolutions run on cuDNN's fused bias (+ residual) call, of how many.
    pub fn fused_convs(&self) -> (usize, usize) {
        self.count_convs(
            |p| matches!(p, Prepared::Conv(c) if c.fused.is_some() && c.graph.is_none()),
        )
    }

    /// How many convolutions run on a graph-API engine, of how many.
    pub fn graph_convs(&self) -> (usize, usize) {
        self.count_convs(|p| {
            matches!(p, Prepared::Conv(c) if c.graph.is_some())
                || matches!(p, Prepared::PaddingConv { .. })
        })
    }

    /// How many convolutions pad their input themselves (on a graph-API engine), of how many.
    pub fn padding_convs(&self) -> (usize, usize) {
        self.count_convs(|p| matches!(p, Prepared::PaddingConv { .. }))
    }

    /// How many convolutions run on our thin-convolution tensor-core kernels, of how many.
    pub fn mma_convs(&self) -> (usize, usize) {
        self.count_convs(|p| matches!(p, Prepared::Thin { .. }))
    }

    /// How many convolutions run as im2col + cuBLASLt GEMM, of how many.
    pub fn gemm_convs(&self) -> (usize, usize) {
        self.count_convs(|p| matches!(p, Prepared::ConvGemm { .. }))
    }

    fn count_convs(&self, pick: impl Fn(&Prepared) -> bool) -> (usize, usize) {
        let convs = self.prepared.iter().filter(|p| {
            matches!(
                p,
                Prepared::Conv(_)
                    | Prepared::ConvGemm { .. }
                    | Prepared::Thin { .. }
                    | Prepared::PaddingConv { .. }
                    | Prepared::NormedOut(_)
            )
        });
        convs.fold((0, 0), |(f, n), p| (f + pick(p) as usize, n + 1))
    }

    fn binding<'a>(list: &'a [Binding], name: &str) -> Result<&'a Binding, GpuError> {
        list.iter()
            .find(|b| b.name == name)
            .ok_or_else(|| GpuError::Binding {
                name: name.to_string(),
                reason: format!(
                    "no such input or output (have {})",
                    list.iter()
                        .map(|b| b.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    fn range(&self, b: &Binding) -> std::ops::Range<usize> {
        let Loc::Arena(buf, o) = b.loc else {
            return 0..0;
        };
        let start = self.offsets[buf] / 2 + o;
        start..start + b.shape.iter().product::<usize>()
    }

    /// Copies an input's fp16 data in (asynchronously, on the engine's stream).
    pub fn write_input(&self, rt: &mut Runtime, name: &str, data: &[f16]) -> Result<(), GpuError> {
        let b = Self::binding(&self.plan.inputs, name)?.clone();
        let range = self.range(&b);
        if data.len() != range.len() {
            return Err(GpuError::Binding {
                name: name.to_string(),
                reason: format!("{} values for shape {:?}", data.len(), b.shape),
            });
        }
        let stream = rt.device.stream.clone();
        let arena = rt
            .arena
            .as_mut()
            .ok_or_else(|| GpuError::Capture("no arena".into()))?;
        stream.memcpy_htod(data, &mut arena.slice_mut(range))?;
        Ok(())
    }

    /// Pinned host twins of this executor's inputs and outputs, in binding order (see
    /// `Staging`).
    pub fn staging(&self, rt: &Runtime) -> Result<Staging, GpuError> {
        let ctx = &rt.device.ctx;
        let len = |b: &Binding| b.shape.iter().product::<usize>();
        let mut inputs = Vec::with_capacity(self.plan.inputs.len());
        for b in &self.plan.inputs {
            // SAFETY: page-locked memory for plain fp16 values; every value is written by the
            // caller (input_mut) before an upload reads it, or is zero-filled below. Inputs
            // are write-combined: the CPU only writes them.
            let mut p = unsafe { ctx.alloc_pinned::<f16>(len(b)) }?;
            p.as_mut_slice()?.fill(f16::ZERO);
            inputs.push(p);
        }
        let mut outputs = Vec::with_capacity(self.plan.outputs.len());
        for b in &self.plan.outputs {
            // SAFETY: as above; outputs are cached (flags 0): the CPU reads them.
            let mut p = unsafe { ctx.alloc_pinned_with_flags::<f16>(len(b), 0) }?;
            p.as_mut_slice()?.fill(f16::ZERO);
            outputs.push(p);
        }
        // Our own events: the pinned buffers' built-in ones are only recorded while cudarc
        // tracks events, which graph capture needs off.
        let event = || ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC));
        Ok(Staging {
            inputs,
            outputs,
            uploaded: event()?,
            downloaded: event()?,
        })
    }

    /// Queues the copy of every staged input to the device on the engine's stream; returns at
    /// once (`Staging::input_mut` waits for it before the next write).
    pub fn upload(&self, rt: &mut Runtime, staging: &Staging) -> Result<(), GpuError> {
        let all: Vec<usize> = (0..self.plan.inputs.len()).collect();
        self.upload_inputs(rt, staging, &all)
    }

    /// `upload` for inputs `which` only (binding indices): the others are written on the
    /// device (e.g. by the face crop).
    pub fn upload_inputs(
        &self,
        rt: &mut Runtime,
        staging: &Staging,
        which: &[usize],
    ) -> Result<(), GpuError> {
        let stream = rt.device.stream.clone();
        let chosen = self.plan.inputs.iter().zip(&staging.inputs).enumerate();
        for (_, (b, src)) in chosen.filter(|(i, _)| which.contains(i)) {
            let range = self.range(b);
            let arena = rt
                .arena
                .as_mut()
                .ok_or_else(|| GpuError::Capture("no arena".into()))?;
            stream.memcpy_htod(src, &mut arena.slice_mut(range))?;
        }
        staging.uploaded.record(&stream)?;
        Ok(())
    }

    /// Queues the copy of every output into `staging` behind the work queued so far; returns
    /// at once (`Staging::output` waits for it).
    pub fn download(&self, rt: &Runtime, staging: &mut Staging) -> Result<(), GpuError> {
        let arena = rt
            .arena
            .as_ref()
            .ok_or_else(|| GpuError::Capture("no arena".into()))?;
        for (b, dst) in self.plan.outputs.iter().zip(&mut staging.outputs) {
            rt.stream().memcpy_dtoh(&arena.slice(self.range(b)), dst)?;
        }
        staging.downloaded.record(rt.stream())?;
        Ok(())
    }

    /// The device address of input or output `name` (fp16 values of its binding's shape), for
    /// kernels that fill an input or read an output in place.
    pub fn binding_ptr(&self, rt: &Runtime, name: &str) -> Result<Ptr, GpuError> {
        let b = Self::binding(&self.plan.inputs, name)
            .or_else(|_| Self::binding(&self.plan.outputs, name))?;
        match b.loc {
            Loc::Arena(..) if rt.arena.is_some() => Ok(self.ptr(rt, b.loc)),
            _ => Err(GpuError::Binding {
                name: name.to_string(),
                reason: "not in the arena".into(),
            }),
        }
    }

    /// The address of binding `name` if it holds `[batch, 3, S, S]` (one square image per
    /// frame), with S.
    fn images_ptr(&self, rt: &Runtime, name: &str, batch: usize) -> Result<(Ptr, usize), GpuError> {
        let b = Self::binding(&self.plan.inputs, name)
            .or_else(|_| Self::binding(&self.plan.outputs, name))?;
        match b.shape[..] {
            [n, 3, s, s2] if n == batch && s == s2 => Ok((self.binding_ptr(rt, name)?, s)),
            _ => Err(GpuError::Binding {
                name: name.to_string(),
                reason: format!("{:?} is not {batch} square RGB images", b.shape),
            }),
        }
    }

    /// Crops the face regions `faces` holds (`Faces::upload` on the engine's stream) into this
    /// executor's inputs `reference` and `masked` (the same with the lower half black): the
    /// step before `launch` in camera mode.
    pub fn crop_faces(
        &self,
        rt: &Runtime,
        image: &Image,
        faces: &mut Faces,
        reference: &str,
        masked: &str,
    ) -> Result<(), GpuError> {
        let (r, size) = self.images_ptr(rt, reference, faces.len())?;
        let (m, masked_size) = self.images_ptr(rt, masked, faces.len())?;
        if size != masked_size {
            return Err(GpuError::Binding {
                name: masked.to_string(),
                reason: format!("{masked_size}x{masked_size} beside {size}x{size} {reference}"),
            });
        }
        // SAFETY: both bindings hold [frames.len(), 3, size, size] fp16 in the arena (checked
        // above), on the stream the crop runs on.
        unsafe { faces.crop(image, rt.stream(), size, r, m) }
    }

    /// Blends output `faces_out` ([B, 3, S, S] RGB in [0, 1]) into the regions `faces` holds
    /// (`Faces::upload`), and queues their download (`Faces::region` reads them): the step
    /// after `launch`.
    pub fn blend_faces(
        &self,
        rt: &Runtime,
        image: &Image,
        faces: &mut Faces,
        faces_out: &str,
    ) -> Result<(), GpuError> {
        let (p, size) = self.images_ptr(rt, faces_out, faces.len())?;
        // SAFETY: the output holds the batch's faces at `size` (checked above), on the stream
        // the upload ran on.
        unsafe { faces.blend(image, rt.stream(), p, size) }
    }

    /// Copies an output's fp16 data out (waits for the stream).
    pub fn read_output(&self, rt: &Runtime, name: &str) -> Result<Vec<f16>, GpuError> {
        let b = Self::binding(&self.plan.outputs, name)?;
        let all = 0..b.shape.iter().product();
        self.read_output_range(rt, name, all)
    }

    /// Copies elements `elems` (row-major, in the output's logical shape) of an output out.
    pub fn read_output_range(
        &self,
        rt: &Runtime,
        name: &str,
        elems: std::ops::Range<usize>,
    ) -> Result<Vec<f16>, GpuError> {
        let b = Self::binding(&self.plan.outputs, name)?;
        let whole = self.range(b);
        if elems.start > elems.end || elems.end > whole.len() {
            return Err(GpuError::Binding {
                name: name.to_string(),
                reason: format!("elements {elems:?} of {} ({:?})", whole.len(), b.shape),
            });
        }
        let range = whole.start + elems.start..whole.start + elems.end;
        let mut out = vec![f16::ZERO; range.len()];
        let arena = rt
            .arena
            .as_ref()
            .ok_or_else(|| GpuError::Capture("no arena".into()))?;
        rt.stream().memcpy_dtoh(&arena.slice(range), &mut out)?;
        rt.stream().synchronize()?;
        Ok(out)
    }

    /// Runs once: the captured graph if there is one, else every step eagerly.
    pub fn launch(&self, rt: &Runtime) -> Result<(), GpuError> {
        match &self.graph {
            Some(g) => Ok(g.launch()?),
            None => self.run_steps(rt, None),
        }
    }

    /// Whether a CUDA graph replays this executor.
    pub fn captured(&self) -> bool {
        self.graph.is_some()
    }

    /// Warms up, then captures every step into one CUDA graph.
    pub fn capture(&mut self, rt: &Runtime) -> Result<(), GpuError> {
        self.graph = None;
        self.graph = Some(self.capture_graph(rt)?);
        Ok(())
    }

    /// Warms up, then captures every step into a CUDA graph on the runtime's current scratch
    /// memory, and returns it (the executor's own graph stays as it is).
    pub fn capture_graph(&self, rt: &Runtime) -> Result<CudaGraph, GpuError> {
        self.run_steps(rt, None)?;
        rt.stream().synchronize()?;
        let stream = rt.stream();
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        let ran = self.run_steps(rt, None);
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        ran?;
        let graph =
            graph?.ok_or_else(|| GpuError::Capture("the capture recorded nothing".into()))?;
        graph.upload()?;
        Ok(graph)
    }

    /// Times every step as the GPU runs it inside a CUDA graph (timing events captured between
    /// the steps, so no launch gaps count): (kind, milliseconds) per step, a convolution's
    /// epilogue as its own entry.
    pub fn profile(&self, rt: &Runtime) -> Result<Vec<(&'static str, f32)>, GpuError> {
        let stream = rt.stream();
        let f = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.context().new_event(f)?;
        let mut marks = Vec::new();
        self.run_steps(rt, None)?;
        stream.synchronize()?;
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        let ran =
            record_external(&start, stream).and_then(|_| self.run_steps(rt, Some(&mut marks)));
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        ran?;
        let graph =
            graph?.ok_or_else(|| GpuError::Capture("the capture recorded nothing".into()))?;
        for _ in 0..2 {
            graph.launch()?;
        }
        stream.synchronize()?;
        let mut out = Vec::with_capacity(marks.len());
        let mut prev = &start;
        for (label, ev) in &marks {
            out.push((*label, prev.elapsed_ms(ev)?));
            prev = ev;
        }
        Ok(out)
    }

    /// Runs every step eagerly (or into a capture); with `marks`, records a timing event after
    /// each step — and between a convolution and its epilogue — labelled with its kind.
    pub fn run_steps(
        &self,
        rt: &Runtime,
        mut marks: Option<&mut Vec<(&'static str, CudaEvent)>>,
    ) -> Result<(), GpuError> {
        let s = rt.stream();
        let k = &rt.kernels;
        let ws = rt.workspace_ptr();
        let mut lap = |label: &'static str| -> Result<(), GpuError> {
            if let Some(m) = marks.as_deref_mut() {
                let ev = s
                    .context()
                    .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
                record_external(&ev, s)?;
                m.push((label, ev));
            }
            Ok(())
        };
        for (i, step) in self.plan.steps.iter().enumerate() {
            let p = |l: Loc| self.ptr(rt, l);
            // SAFETY (every launch below): the plan sized each operand for exactly the shapes
            // passed with it, the arena holds every buffer at its placed offset for the step's
            // lifetime, and weights stay uploaded for the runtime's life.
            match (step, &self.prepared[i]) {
                (Step::Conv { .. }, Prepared::Conv(plan)) => {
                    unsafe { self.run_conv(rt, step, plan, ws, &mut lap) }?
                }
                (Step::Conv { .. }, Prepared::ConvGemm { plan, in_gemm }) => {
                    // The norm before it wrote the patches already (`norms_into_cols`).
                    let cols_ready =
                        i > 0 && matches!(self.prepared[i - 1], Prepared::NormToCols { .. });
                    unsafe {
                        self.run_conv_gemm(rt, step, plan, *in_gemm, cols_ready, ws, &mut lap)
                    }?
                }
                (
                    Step::GroupNorm {
                        shape,
                        x,
                        gamma,
                        beta,
                        ..
                    },
                    Prepared::NormToCols { w, k: kernel },
                ) => unsafe {
                    // The workspace is the next step's patch matrix (`norms_into_cols`).
                    k.group_norm.launch_to_cols(
                        s,
                        p(*x),
                        p(*gamma),
                        p(*beta),
                        ws,
                        shape,
                        *w,
                        *kernel,
                    )
                }?,
                (Step::Conv { .. }, Prepared::PaddingConv { call, x }) => {
                    unsafe { self.run_graph_call(rt, step, *x, call, ws, &mut lap) }?
                }
                (Step::Pad { .. }, Prepared::Absorbed) => {}
                (
                    Step::GroupNorm {
                        shape, x, scratch, ..
                    },
                    Prepared::NormStats,
                ) => {
                    // The convolution after it normalises (`norms_into_convs`).
                    unsafe { k.group_norm.launch_stats(s, p(*x), p(*scratch), shape) }?;
                }
                (
                    Step::Conv {
                        shape, w, y, bias, ..
                    },
                    Prepared::NormedOut(norm),
                ) => {
                    let input = conv_out::NormIn {
                        x: p(norm.x),
                        stats: p(norm.scratch) + norm.shape.stats_offset() as u64,
                        gamma: p(norm.gamma),
                        beta: p(norm.beta),
                        groups: norm.shape.groups,
                        silu: norm.shape.silu,
                    };
                    let b = bias.map_or(0, |(l, _)| p(l));
                    // The plan keeps the norm's input and scratch alive through this step
                    // (`NormInput`).
                    unsafe { k.conv_out.forward_normed(s, shape, &input, p(*w), b, p(*y)) }?;
                    lap("conv")?;
                    // The kernel adds the bias; group-norm sums, if any, are left.
                    unsafe { self.conv_epilogue(rt, step, true) }?
                }
                (Step::Conv { .. }, Prepared::Thin { kernel, rows }) => {
                    unsafe { self.run_thin(rt, s, step, *kernel, *rows) }?;
                    lap("conv")?;
                    // The kernel adds the bias; group-norm sums, if any, are left.
                    unsafe { self.conv_epilogue(rt, step, true) }?
                }
                (
                    Step::Gemm {
                        a, b, residual, c, ..
                    },
                    Prepared::Gemm(plan),
                ) => unsafe {
                    rt.blas
                        .gemm(plan, p(*a), p(*b), residual.map_or(0, p), p(*c))
                }?,
                (
                    Step::Attention {
                        q,
                        k: kk,
                        v,
                        o,
                        batch,
                        lq,
                        lk,
                        heads,
                        d,
                        ldq,
                        ldkv,
                        splits,
                        part,
                    },
                    _,
                ) => unsafe {
                    k.attention.flash(
                        s,
                        (p(*q), p(*kk), p(*v), p(*o)),
                        *batch,
                        *lq,
                        *lk,
                        *heads,
                        *d,
                        (*ldq, *ldkv),
                        (*splits, p(*part)),
                    )
                }?,
                (Step::Softmax { x, rows, cols }, _) => {
                    unsafe { k.attention.softmax(s, p(*x), *rows, *cols) }?
                }
                (Step::Pad { .. }, _) => unsafe { self.run_pad(rt, step) }?,
                (
                    Step::GroupNorm {
                        shape,
                        x,
                        gamma,
                        beta,
                        y,
                        scratch,
                    },
                    _,
                ) => unsafe {
                    k.group_norm
                        .launch(s, p(*x), p(*gamma), p(*beta), p(*y), p(*scratch), shape)
                }?,
                (
                    Step::LayerNorm {
                        x,
                        gamma,
                        beta,
                        y,
                        rows,
                        cols,
                        eps,
                    },
                    _,
                ) => unsafe {
                    k.layer_norm
                        .launch(s, p(*x), p(*gamma), p(*beta), p(*y), *rows, *cols, *eps)
                }?,
                (Step::Unary { op, x, y, n }, _) => {
                    unsafe { k.elementwise.unary(s, *op, p(*x), p(*y), *n) }?
                }
                (Step::Add { a, b, y, n }, _) => {
                    unsafe { k.elementwise.add(s, p(*a), p(*b), p(*y), *n) }?
                }
                (
                    Step::Binary {
                        op,
                        a,
                        a_strides,
                        b,
                        b_strides,
                        y,
                        dims,
                    },
                    _,
                ) => unsafe {
                    k.elementwise.binary(
                        s,
                        *op,
                        (p(*a), a_strides),
                        (p(*b), b_strides),
                        p(*y),
                        dims,
                    )
                }?,
                (Step::Geglu { x, y, rows, d }, _) => {
                    unsafe { k.elementwise.geglu(s, p(*x), p(*y), *rows, *d) }?
                }
                (Step::Upsample { x, y, nhwc }, _) => {
                    unsafe { k.elementwise.upsample2x_nhwc(s, p(*x), p(*y), *nhwc) }?
                }
                (
                    Step::Subpixel {
                        x,
                        y,
                        bias,
                        nhwc,
                        stats,
                    },
                    _,
                ) => unsafe {
                    k.elementwise.subpixel(
                        s,
                        p(*x),
                        p(*y),
                        bias.map_or(0, p),
                        *nhwc,
                        stats.map(|(l, g)| (p(l), g)),
                    )
                }?,
                (
                    Step::Permute {
                        x,
                        y,
                        dims,
                        strides,
                    },
                    _,
                ) => unsafe { k.layout.permute(s, p(*x), p(*y), dims, strides) }?,
                (
                    Step::CopyRows {
                        x,
                        y,
                        rows,
                        cols,
                        xs,
                        ys,
                    },
                    _,
                ) => unsafe { k.layout.copy_rows(s, p(*x), p(*y), *rows, *cols, *xs, *ys) }?,
                (
                    Step::GatherRows {
                        x,
                        first,
                        y,
                        batch,
                        t,
                        rows,
                        cols,
                        xs,
                    },
                    _,
                ) => unsafe {
                    k.layout
                        .gather_rows(s, p(*x), p(*first), p(*y), *batch, *t, *rows, *cols, *xs)
                }?,
                (Step::Concat { parts, y, rows, ys }, _) => {
                    let parts: Vec<RowsPart> = parts
                        .iter()
                        .map(|c| RowsPart {
                            x: p(c.x),
                            cols: c.cols,
                            xs: c.xs,
                        })
                        .collect();
                    unsafe { k.layout.concat_rows(s, &parts, p(*y), *rows, *ys) }?
                }
                (step, _) => {
                    return Err(GpuError::Capture(format!(
                        "step {i} ({}) has no prepared call",
                        step.name()
                    )))
                }
            }
            lap(match step {
                Step::Conv { .. } => "conv_epilogue",
                _ => step.name(),
            })?;
        }
        Ok(())
    }

    /// Median milliseconds of `runs` launches after 5 warm-ups, each timed with CUDA events.
    pub fn time_ms(&self, rt: &Runtime, runs: usize) -> Result<f64, GpuError> {
        let s = rt.stream();
        let f = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (a, b) = (s.context().new_event(f)?, s.context().new_event(f)?);
        for _ in 0..5 {
            self.launch(rt)?;
        }
        let mut ms = Vec::with_capacity(runs.max(1));
        for _ in 0..runs.max(1) {
            a.record(s)?;
            self.launch(rt)?;
            b.record(s)?;
            b.synchronize()?;
            ms.push(a.elapsed_ms(&b)? as f64);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    }

    /// Milliseconds a replay of this executor's graph and of `other` (the same executor
    /// captured on a second scratch set, `Runtime::second_scratch`) take per replay when the
    /// two run at once on two streams, `runs` of each after warm-ups; and, as the baseline
    /// from the same call, per replay of the executor's graph back to back on one stream.
    pub fn time_two_streams(
        &self,
        rt: &Runtime,
        other: &CudaGraph,
        runs: usize,
    ) -> Result<(f64, f64), GpuError> {
        let graph = self
            .graph
            .as_ref()
            .ok_or_else(|| GpuError::Capture("two-stream timing needs a captured graph".into()))?;
        let s1 = rt.stream();
        let s2 = s1.fork()?;
        let f = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ev = || s1.context().new_event(f);
        let runs = runs.max(1);
        let launch = |g: &CudaGraph, s: &CudaStream| -> Result<(), GpuError> {
            // SAFETY: the graph is instantiated and uploaded, the stream live; a graph may
            // replay on any stream of its context.
            unsafe { sys::cuGraphLaunch(g.cu_graph_exec(), s.cu_stream()) }.result()?;
            Ok(())
        };
        // One stream, back to back: 2 x runs replays.
        let (a, b) = (ev()?, ev()?);
        for _ in 0..3 {
            launch(graph, s1)?;
        }
        a.record(s1)?;
        for _ in 0..2 * runs {
            launch(graph, s1)?;
        }
        b.record(s1)?;
        b.synchronize()?;
        let one = a.elapsed_ms(&b)? as f64 / (2 * runs) as f64;
        // Two streams: `runs` replays on each, started together.
        let (a, b, done2) = (ev()?, ev()?, ev()?);
        for _ in 0..3 {
            launch(other, &s2)?;
        }
        s2.join(s1)?;
        a.record(s1)?;
        s2.wait(&a)?;
        for _ in 0..runs {
            launch(graph, s1)?;
            launch(other, &s2)?;
        }
        done2.record(&s2)?;
        s1.wait(&done2)?;
        b.record(s1)?;
        b.synchronize()?;
        let two = a.elapsed_ms(&b)? as f64 / (2 * runs) as f64;
        Ok((one, two))
    }

    /// Runs on f32 tensors (tests and checks): converts, uploads, runs, reads back.
    pub fn run_f32(
        &self,
        rt: &mut Runtime,
        inputs: &[(&str, &Tensor)],
    ) -> Result<Vec<(String, Tensor)>, GpuError> {
        for (name, t) in inputs {
            let data: Vec<f16> = t.data.iter().map(|&v| f16::from_f32(v)).collect();
            self.write_input(rt, name, &data)?;
        }
        self.launch(rt)?;
        self.plan
            .outputs
            .iter()
            .map(|b| {
                let data = self.read_output(rt, &b.name)?;
                Ok((
                    b.name.clone(),
                    Tensor::new(b.shape.clone(), data.iter().map(|v| v.to_f32()).collect()),
                ))
            })
            .collect()
    }
}

/// Page-locked host buffers for one executor's inputs and outputs, in binding order: the CPU
/// fills inputs and reads outputs while the GPU works on something else, and the copies run
/// asynchronously at full PCIe speed (pageable copies are ~8x slower and block the caller).
/// Each buffer remembers its last copy: writing an input waits until its last upload is done,
/// reading an output until its last download is.
pub struct Staging {
    inputs: Vec<PinnedHostSlice<f16>>,
    outputs: Vec<PinnedHostSlice<f16>>,
    /// Recorded behind the last upload from `inputs` / download into `outputs`.
    uploaded: CudaEvent,
    downloaded: CudaEvent,
}

impl Staging {
    /// Input `i` to fill, once its previous upload has completed.
    pub fn input_mut(&mut self, i: usize) -> Result<&mut [f16], GpuError> {
        self.uploaded.synchronize()?;
        let n = self.inputs.len();
        let buf = self.inputs.get_mut(i).ok_or_else(|| GpuError::Binding {
            name: format!("input {i}"),
            reason: format!("the executor has {n} inputs"),
        })?;
        Ok(buf.as_mut_slice()?)
    }

    /// Output `i`, once its last download has completed.
    pub fn output(&self, i: usize) -> Result<&[f16], GpuError> {
        self.downloaded.synchronize()?;
        let buf = self.outputs.get(i).ok_or_else(|| GpuError::Binding {
            name: format!("output {i}"),
            reason: format!("the executor has {} outputs", self.outputs.len()),
        })?;
        Ok(buf.as_slice()?)
    }
}
