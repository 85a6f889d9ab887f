//! Convolutions through cuDNN's graph (backend) API: y = conv(x, w) (+ bias), on
//! the engines and knob settings (tile sizes, split-K, ...) cuDNN's heuristics propose, each
//! timed on the real buffers at engine build. The legacy call picks its kernel itself per
//! algorithm, which at one image a batch leaves the big convolutions at half the speed the
//! same kernels reach at 16.
//!
//! A choice is named by its engine's global index and its knob values, so an engine file can
//! rebuild exactly the plan it timed.

use std::ffi::c_void;

use cudarc::cudnn::sys::{
    self, cudnnBackendAttributeName_t as Attr, cudnnBackendAttributeType_t as Ty,
    cudnnBackendDescriptorType_t as Kind,
};

use crate::conv::ConvShape;
use crate::error::GpuError;
use crate::kernels::Ptr;

fn err(what: &str, s: sys::cudnnStatus_t) -> GpuError {
    GpuError::Cudnn(format!("{what}: {s:?}"))
}

fn check(what: &str, s: sys::cudnnStatus_t) -> Result<(), GpuError> {
    if s == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(err(what, s))
    }
}

/// One backend descriptor, destroyed on drop.
struct Desc(sys::cudnnBackendDescriptor_t);

impl Desc {
    fn new(kind: Kind) -> Result<Self, GpuError> {
        let mut d: sys::cudnnBackendDescriptor_t = std::ptr::null_mut();
        // SAFETY: `d` receives a new descriptor owned by the returned value.
        check("cudnnBackendCreateDescriptor", unsafe {
            sys::cudnnBackendCreateDescriptor(kind, &mut d)
        })?;
        Ok(Desc(d))
    }

    fn set<T>(&self, name: Attr, ty: Ty, vals: &[T]) -> Result<(), GpuError> {
        // SAFETY: `vals` holds `len` elements of the type `ty` names (the callers pair them).
        check("cudnnBackendSetAttribute", unsafe {
            sys::cudnnBackendSetAttribute(
                self.0,
                name,
                ty,
                vals.len() as i64,
                vals.as_ptr() as *const c_void,
            )
        })
        .map_err(|e| GpuError::Cudnn(format!("{e} setting {name:?}")))
    }

    fn set_desc(&self, name: Attr, descs: &[&Desc]) -> Result<(), GpuError> {
        let raw: Vec<sys::cudnnBackendDescriptor_t> = descs.iter().map(|d| d.0).collect();
        self.set(name, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw)
    }

    fn finalize(self) -> Result<Self, GpuError> {
        // SAFETY: the descriptor is live; its attributes were set above.
        check("cudnnBackendFinalize", unsafe {
            sys::cudnnBackendFinalize(self.0)
        })?;
        Ok(self)
    }

    fn get_i64(&self, name: Attr) -> Result<i64, GpuError> {
        let (mut v, mut count) = (0i64, 0i64);
        // SAFETY: one INT64 element into `v`.
        check("cudnnBackendGetAttribute", unsafe {
            sys::cudnnBackendGetAttribute(
                self.0,
                name,
                Ty::CUDNN_TYPE_INT64,
                1,
                &mut count,
                &mut v as *mut i64 as *mut c_void,
            )
        })?;
        Ok(v)
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnBackendCreateDescriptor, destroyed once; errors ignored.
        unsafe {
            let _ = sys::cudnnBackendDestroyDescriptor(self.0);
        }
    }
}

const HALF: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_HALF;
const FLOAT: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;

/// A 4-d tensor in NCHW dimension order with channels-last strides.
fn tensor(
    uid: i64,
    [n, c, h, w]: [usize; 4],
    dtype: sys::cudnnDataType_t,
    virt: bool,
) -> Result<Desc, GpuError> {
    let d = Desc::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    let dims = [n as i64, c as i64, h as i64, w as i64];
    let strides = [(h * w * c) as i64, 1, (w * c) as i64, c as i64];
    d.set(
        Attr::CUDNN_ATTR_TENSOR_DATA_TYPE,
        Ty::CUDNN_TYPE_DATA_TYPE,
        &[dtype],
    )?;
    d.set(
        Attr::CUDNN_ATTR_TENSOR_DIMENSIONS,
        Ty::CUDNN_TYPE_INT64,
        &dims,
    )?;
    d.set(
        Attr::CUDNN_ATTR_TENSOR_STRIDES,
        Ty::CUDNN_TYPE_INT64,
        &strides,
    )?;
    d.set(
        Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID,
        Ty::CUDNN_TYPE_INT64,
        &[uid],
    )?;
    d.set(
        Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,
        Ty::CUDNN_TYPE_INT64,
        &[16i64],
    )?;
    d.set(
        Attr::CUDNN_ATTR_TENSOR_IS_VIRTUAL,
        Ty::CUDNN_TYPE_BOOLEAN,
        &[virt],
    )?;
    d.finalize()
}

/// One pointwise operation: y = mode(x[, b]).
fn pointwise(
    mode: sys::cudnnPointwiseMode_t,
    x: &Desc,
    b: Option<&Desc>,
    y: &Desc,
) -> Result<Desc, GpuError> {
    let pw = Desc::new(Kind::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
    pw.set(
        Attr::CUDNN_ATTR_POINTWISE_MODE,
        Ty::CUDNN_TYPE_POINTWISE_MODE,
        &[mode],
    )?;
    pw.set(
        Attr::CUDNN_ATTR_POINTWISE_MATH_PREC,
        Ty::CUDNN_TYPE_DATA_TYPE,
        &[FLOAT],
    )?;
    if mode == sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_SWISH_FWD {
        pw.set(
            Attr::CUDNN_ATTR_POINTWISE_SWISH_BETA,
            Ty::CUDNN_TYPE_FLOAT,
            &[1f32],
        )?;
    }
    let pw = pw.finalize()?;
    let op = Desc::new(Kind::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?;
    op.set_desc(Attr::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw])?;
    op.set_desc(Attr::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, &[x])?;
    if let Some(b) = b {
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, &[b])?;
    }
    op.set_desc(Attr::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &[y])?;
    op.finalize()
}

/// Unique ids of the graph's tensors in the variant pack.
const X: i64 = 1;
const W: i64 = 2;
const BIAS: i64 = 3;
const Y: i64 = 4;

/// One convolution graph: the shape and whether the bias rides on the output. (A residual
/// would too, but only on engines cuDNN compiles at run time, which lost everywhere on an H100:
/// the residual stays on the legacy fused call or our epilogue.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct GraphKey {
    pub shape: ConvShape,
    pub bias: bool,
}

/// An engine and its knob settings: (knob type as cuDNN numbers it, value).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct EngineChoice {
    pub engine: i64,
    pub knobs: Vec<(u32, i64)>,
}

/// The operation graph of one key, kept with the descriptors it refers to.
pub struct ConvGraph {
    pub key: GraphKey,
    graph: Desc,
    _keep: Vec<Desc>,
}

// SAFETY: descriptors are used from the executor's one thread at a time.
unsafe impl Send for ConvGraph {}

/// A convolution's graph and the plan chosen for it, kept together for the plan's life.
pub struct GraphCall {
    pub graph: ConvGraph,
    pub plan: GraphPlan,
}

/// A finalized execution plan.
pub struct GraphPlan {
    pub choice: EngineChoice,
    pub workspace_bytes: usize,
    bias: bool,
    plan: Desc,
}

// SAFETY: as for ConvGraph.
unsafe impl Send for GraphPlan {}

impl ConvGraph {
    pub fn new(handle: sys::cudnnHandle_t, key: GraphKey) -> Result<Self, GpuError> {
        let s = key.shape;
        if !s.nhwc || s.groups != 1 {
            return Err(GpuError::Shape {
                kernel: "conv2d graph",
                reason: format!("needs one group, channels-last: {s:?}"),
            });
        }
        let (ho, wo) = s.out_hw();
        let out = [s.n, s.o, ho, wo];
        let x = tensor(X, [s.n, s.c, s.h, s.w], HALF, false)?;
        let w = tensor(W, [s.o, s.c, s.kh, s.kw], HALF, false)?;
        let y = tensor(Y, out, HALF, false)?;
        let epilogue = key.bias;
        let c = tensor(101, out, FLOAT, true)?;
        let conv = Desc::new(Kind::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
        let two = |a: usize, b: usize| [a as i64, b as i64];
        conv.set(
            Attr::CUDNN_ATTR_CONVOLUTION_COMP_TYPE,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[FLOAT],
        )?;
        conv.set(
            Attr::CUDNN_ATTR_CONVOLUTION_CONV_MODE,
            Ty::CUDNN_TYPE_CONVOLUTION_MODE,
            &[sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION],
        )?;
        conv.set(
            Attr::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS,
            Ty::CUDNN_TYPE_INT64,
            &[2i64],
        )?;
        conv.set(
            Attr::CUDNN_ATTR_CONVOLUTION_DILATIONS,
            Ty::CUDNN_TYPE_INT64,
            &two(1, 1),
        )?;
        conv.set(
            Attr::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,
            Ty::CUDNN_TYPE_INT64,
            &two(s.stride[0], s.stride[1]),
        )?;
        let post = s.post_pad();
        conv.set(
            Attr::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS,
            Ty::CUDNN_TYPE_INT64,
            &two(s.pad[0], s.pad[1]),
        )?;
        conv.set(
            Attr::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS,
            Ty::CUDNN_TYPE_INT64,
            &two(post[0], post[1]),
        )?;
        let conv = conv.finalize()?;
        let op = Desc::new(Kind::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR)?;
        op.set_desc(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
            &[&conv],
        )?;
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, &[&x])?;
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, &[&w])?;
        op.set_desc(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
            &[if epilogue { &c } else { &y }],
        )?;
        op.set(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
            Ty::CUDNN_TYPE_FLOAT,
            &[1f32],
        )?;
        op.set(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
            Ty::CUDNN_TYPE_FLOAT,
            &[0f32],
        )?;
        let mut ops = vec![op.finalize()?];
        let mut keep = vec![x, w, conv];
        if key.bias {
            let b = tensor(BIAS, [1, s.o, 1, 1], HALF, false)?;
            ops.push(pointwise(
                sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_ADD,
                &c,
                Some(&b),
                &y,
            )?);
            keep.push(b);
        }
        let graph = Desc::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        let refs: Vec<&Desc> = ops.iter().collect();
        graph.set_desc(Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS, &refs)?;
        graph.set(
            Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
            Ty::CUDNN_TYPE_HANDLE,
            &[handle],
        )?;
        let graph = graph.finalize()?;
        keep.extend([y, c]);
        keep.extend(ops);
        Ok(ConvGraph {
            key,
            graph,
            _keep: keep,
        })
    }

    /// The engine configurations cuDNN's heuristics propose (modes A, B and fallback, in that
    /// order, without repeats).
    pub fn choices(&self) -> Result<Vec<EngineChoice>, GpuError> {
        use sys::cudnnBackendHeurMode_t as H;
        let mut out: Vec<EngineChoice> = Vec::new();
        for mode in [
            H::CUDNN_HEUR_MODE_A,
            H::CUDNN_HEUR_MODE_B,
            H::CUDNN_HEUR_MODE_FALLBACK,
        ] {
            // A mode this cuDNN does not offer for the graph proposes nothing.
            let Ok(found) = self.heuristic(mode) else {
                continue;
            };
            for c in found {
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }

    fn heuristic(&self, mode: sys::cudnnBackendHeurMode_t) -> Result<Vec<EngineChoice>, GpuError> {
        let heur = Desc::new(Kind::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
        heur.set_desc(Attr::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[&self.graph])?;
        heur.set(
            Attr::CUDNN_ATTR_ENGINEHEUR_MODE,
            Ty::CUDNN_TYPE_HEUR_MODE,
            &[mode],
        )?;
        let heur = heur.finalize()?;
        let cfgs = get_descs(
            &heur,
            Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
            Kind::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR,
            64,
        )?;
        let mut out = Vec::new();
        for cfg in &cfgs {
            let engines = get_descs(
                cfg,
                Attr::CUDNN_ATTR_ENGINECFG_ENGINE,
                Kind::CUDNN_BACKEND_ENGINE_DESCRIPTOR,
                1,
            )?;
            let Some(engine) = engines.first() else {
                continue;
            };
            // Engines that compile their kernel at plan time (cuDNN's runtime fusion) were
            // slower than the precompiled ones on every shape timed on an H100, and cost
            // seconds of build each.
            if runtime_compiled(engine)? {
                continue;
            }
            let index = engine.get_i64(Attr::CUDNN_ATTR_ENGINE_GLOBAL_INDEX)?;
            let knobs = get_descs(
                cfg,
                Attr::CUDNN_ATTR_ENGINECFG_KNOB_CHOICES,
                Kind::CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR,
                32,
            )?;
            let mut values = Vec::with_capacity(knobs.len());
            for k in &knobs {
                let mut ty = 0u32;
                let mut n = 0i64;
                // SAFETY: one KNOB_TYPE element (a 32-bit enum) into `ty`.
                check("cudnnBackendGetAttribute(knob type)", unsafe {
                    sys::cudnnBackendGetAttribute(
                        k.0,
                        Attr::CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE,
                        Ty::CUDNN_TYPE_KNOB_TYPE,
                        1,
                        &mut n,
                        &mut ty as *mut u32 as *mut c_void,
                    )
                })?;
                values.push((ty, k.get_i64(Attr::CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE)?));
            }
            out.push(EngineChoice {
                engine: index,
                knobs: values,
            });
        }
        Ok(out)
    }

    /// An execution plan for `choice`, or an error when that engine does not take this graph.
    pub fn plan(
        &self,
        handle: sys::cudnnHandle_t,
        choice: &EngineChoice,
    ) -> Result<GraphPlan, GpuError> {
        let engine = Desc::new(Kind::CUDNN_BACKEND_ENGINE_DESCRIPTOR)?;
        engine.set_desc(Attr::CUDNN_ATTR_ENGINE_OPERATION_GRAPH, &[&self.graph])?;
        engine.set(
            Attr::CUDNN_ATTR_ENGINE_GLOBAL_INDEX,
            Ty::CUDNN_TYPE_INT64,
            &[choice.engine],
        )?;
        let engine = engine.finalize()?;
        let mut knobs = Vec::with_capacity(choice.knobs.len());
        for &(ty, value) in &choice.knobs {
            let k = Desc::new(Kind::CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR)?;
            // The knob type goes back as the 32-bit number cuDNN gave it.
            k.set(
                Attr::CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE,
                Ty::CUDNN_TYPE_KNOB_TYPE,
                &[ty],
            )?;
            k.set(
                Attr::CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE,
                Ty::CUDNN_TYPE_INT64,
                &[value],
            )?;
            knobs.push(k.finalize()?);
        }
        let cfg = Desc::new(Kind::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR)?;
        cfg.set_desc(Attr::CUDNN_ATTR_ENGINECFG_ENGINE, &[&engine])?;
        if !knobs.is_empty() {
            let refs: Vec<&Desc> = knobs.iter().collect();
            cfg.set_desc(Attr::CUDNN_ATTR_ENGINECFG_KNOB_CHOICES, &refs)?;
        }
        let cfg = cfg.finalize()?;
        let plan = Desc::new(Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
        plan.set(
            Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
            Ty::CUDNN_TYPE_HANDLE,
            &[handle],
        )?;
        plan.set_desc(Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[&cfg])?;
        let plan = plan.finalize()?;
        let ws = plan.get_i64(Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)?;
        Ok(GraphPlan {
            choice: choice.clone(),
            workspace_bytes: ws.max(0) as usize,
            bias: self.key.bias,
            plan,
        })
    }
}

/// Whether `engine` carries cuDNN's runtime-compilation behavior note.
fn runtime_compiled(engine: &Desc) -> Result<bool, GpuError> {
    let mut notes = [0u32; 16];
    let mut n = 0i64;
    // SAFETY: up to 16 BEHAVIOR_NOTE elements (32-bit enums) into `notes`.
    check("cudnnBackendGetAttribute(behavior notes)", unsafe {
        sys::cudnnBackendGetAttribute(
            engine.0,
            Attr::CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE,
            Ty::CUDNN_TYPE_BEHAVIOR_NOTE,
            notes.len() as i64,
            &mut n,
            notes.as_mut_ptr() as *mut c_void,
        )
    })?;
    let runtime = sys::cudnnBackendBehaviorNote_t::CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION as u32;
    Ok(notes[..n.clamp(0, 16) as usize].contains(&runtime))
}

/// Up to `max` descriptors of `kind` that attribute `name` of `d` holds.
fn get_descs(d: &Desc, name: Attr, kind: Kind, max: usize) -> Result<Vec<Desc>, GpuError> {
    let descs: Vec<Desc> = (0..max)
        .map(|_| Desc::new(kind))
        .collect::<Result<_, _>>()?;
    let mut raw: Vec<sys::cudnnBackendDescriptor_t> = descs.iter().map(|d| d.0).collect();
    let mut got = 0i64;
    // SAFETY: `raw` holds `max` created descriptors of the kind the attribute holds.
    check("cudnnBackendGetAttribute(descriptors)", unsafe {
        sys::cudnnBackendGetAttribute(
            d.0,
            name,
            Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            max as i64,
            &mut got,
            raw.as_mut_ptr() as *mut c_void,
        )
    })?;
    let mut descs = descs;
    descs.truncate(got.clamp(0, max as i64) as usize);
    Ok(descs)
}

/// The device addresses of one graph convolution's operands.
#[derive(Clone, Copy, Debug)]
pub struct GraphArgs {
    pub x: Ptr,
    pub w: Ptr,
    /// Ignored unless the graph adds the bias.
    pub bias: Ptr,
    pub y: Ptr,
    pub workspace: Ptr,
}

impl GraphPlan {
    /// Runs the plan on `handle`'s stream.
    ///
    /// # Safety
    /// Every address the graph uses holds its operand's shape; the workspace
    /// `workspace_bytes`.
    pub unsafe fn execute(
        &self,
        handle: sys::cudnnHandle_t,
        a: &GraphArgs,
    ) -> Result<(), GpuError> {
        let mut uids = vec![X, W, Y];
        let mut ptrs = vec![a.x, a.w, a.y];
        if self.bias {
            uids.push(BIAS);
            ptrs.push(a.bias);
        }
        let ptrs: Vec<*mut c_void> = ptrs.iter().map(|&p| p as *mut c_void).collect();
        let pack = Desc::new(Kind::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS,
            Ty::CUDNN_TYPE_INT64,
            &uids,
        )?;
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
            Ty::CUDNN_TYPE_VOID_PTR,
            &ptrs,
        )?;
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
            Ty::CUDNN_TYPE_VOID_PTR,
            &[a.workspace as *mut c_void],
        )?;
        let pack = pack.finalize()?;
        // SAFETY: per the caller's contract.
        check("cudnnBackendExecute", unsafe {
            sys::cudnnBackendExecute(handle, self.plan.0, pack.0)
        })
    }
}
