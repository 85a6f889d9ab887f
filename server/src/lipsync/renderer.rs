//! The renderer: one thread per model executor that owns the model (CPU reference or CUDA
//! engine), gathers the frames every session submits, and runs them in batches.
//!
//! Sessions never wait on it for frames: `submit` queues a job and returns; the reply callback
//! runs on the renderer thread when the batch is done or the frame is given up. The batching
//! policy is `scheduler::Batcher` (earliest deadline first, largest profile that fits); the time
//! each profile takes is measured at start and then followed as batches run.
//!
//! Whisper windows: on the CPU executor they run on the asking session's own thread (sessions
//! encode in parallel); on the GPU they go through this thread ahead of any frame batch, and the
//! asking session waits for that one window.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use half::{f16, slice::HalfFloatSliceExt};
use lipstream_engines::audio::prompt::STATES;
use lipstream_engines::models::whisper;
use lipstream_engines::{cpu, Graph, Tensor};

use crate::engine::{Executors, Sources, Stage};
use crate::lipsync::slots::{self, Layout, Returns, SessionSlots, Slot};
use crate::metrics::Metrics;
use crate::scheduler::{batch_end, gpu_load, queued_end, BatchTimes, Batcher};
use lipstream_engines::image::{FaceBox, LowerFace, Planes, Region};
use lipstream_gpu::device::StreamTimer;
use lipstream_gpu::kernels::image::{FaceFrame, Faces, Image};

/// Where the model comes from.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// A models folder (`models synth|pull`): the CUDA executor is built (and its convolutions
    /// timed) at start when CUDA is here, else the CPU reference executor runs it.
    Models(PathBuf),
    /// Engine files (`engine build`), one per GPU model: CUDA only.
    Engine(Vec<PathBuf>),
}

/// What to start.
#[derive(Clone, Debug)]
pub struct RendererConfig {
    pub source: ModelSource,
    /// `Stage::Camera` or `Stage::Avatar`.
    pub mode: Stage,
    /// Batch profiles: those to build from a models folder; of an engine file's, those to use
    /// (empty: all it holds).
    pub profiles: Vec<usize>,
    /// Use CUDA when it is here (false: always the CPU executor).
    pub cuda: bool,
    /// The GPU (CUDA ordinal) this renderer runs on.
    pub gpu: usize,
    /// How long a frame may take from submission to its output time: sizes each session's
    /// slots.
    pub frame_budget: Duration,
    /// How long a whisper window may wait for others to run with it (the CUDA whisper thread).
    pub whisper_wait: Duration,
    /// Frames wait for a fuller batch while their deadlines allow (`Batcher::holding`).
    pub hold_batches: bool,
}

/// Why a frame came back without a face.
#[derive(Debug)]
pub enum Missed {
    /// Given up: it could no longer make its deadline.
    Late,
    Failed(String),
}

/// A batch's results.
struct Finished {
    outputs: Vec<Output>,
    /// How long the device spent on it, where the device says (CUDA events around the batch on
    /// its stream): the renderer thread sees a batch end only when it looks, which is late by
    /// however long it waited for other work.
    device_time: Option<Duration>,
    /// The batch was done before `finish` was called (so it ended some time before that).
    done_before: bool,
}

/// What the renderer gives back for a frame.
#[derive(Debug)]
pub enum Output {
    /// The rendered face, [3, 256, 256] RGB in [0, 1], to blend on the CPU.
    Face(Tensor),
    /// The frame's face region (`Slot::set_face`) with the rendered face already blended in
    /// on the GPU, packed like `Region::copy_out`.
    Blended(Region, Vec<u8>),
}

/// The reply to one submitted frame, or why there is none.
pub type Reply = Box<dyn FnOnce(Result<Output, Missed>) + Send>;

/// One frame: its inputs in a slot of its session's ring (see `Renderer::layout`), and where
/// its result goes.
pub struct Job {
    pub slot: Slot,
    pub reply: Reply,
}

enum Request {
    Frame {
        job: Job,
        deadline: Instant,
    },
    Whisper(WhisperJob),
    /// A new session's ring: its used slots go back through `back`.
    Session {
        id: u64,
        back: ringbuf::HeapProd<slots::Buffers>,
    },
    SessionEnded(u64),
}

/// The model's inputs a slot carries, in slot order: all of the mode's, except the crops a
/// GPU cuts itself from the slot's face region (`faces_on_gpu`).
pub fn input_names(mode: Stage, faces_on_gpu: bool) -> &'static [&'static str] {
    match mode {
        Stage::Camera if faces_on_gpu => &["audio_features"],
        Stage::Camera => &["masked", "reference", "audio_features"],
        _ => &["latents", "audio_features"],
    }
}

/// A running renderer; dropping the last handle stops its thread.
pub struct Renderer {
    tx: Sender<Request>,
    pub mode: Stage,
    /// For logs: "CPU reference executor" or "CUDA (GPU 0: ...)".
    pub executor: String,
    pub profiles: Vec<usize>,
    /// Width of the audio prompt's tokens (whisper's d_model).
    pub audio_dim: usize,
    /// Where each input sits in a session's slots.
    pub layout: Layout,
    /// Faces are blended into their frames on the GPU (and in camera mode cropped there too):
    /// slots carry the frame's face region (`Slot::set_face`; in camera mode instead of the
    /// crops), and results come back `Output::Blended`.
    pub faces_on_gpu: bool,
    slots_per_session: usize,
    next_session: AtomicU64,
    cpu_whisper: Option<Arc<Graph>>,
    /// CUDA: whisper's own thread and stream (else windows go through the renderer thread).
    whisper: Option<Sender<WhisperJob>>,
    gauge: Arc<Gauge>,
}

/// How loaded a renderer's GPU is, published by its thread once per window of batches.
struct Gauge {
    born: Instant,
    /// f64 bits: share of the GPU the window's frames need (`scheduler::gpu_load`), share of
    /// frames given up.
    load: AtomicU64,
    late: AtomicU64,
    /// When the window was published (ns since `born`).
    published_ns: AtomicU64,
    sessions: AtomicUsize,
}

/// A window of batches shorter than this is not published (too noisy).
const GAUGE_WINDOW: Duration = Duration::from_secs(1);

impl Gauge {
    fn new() -> Self {
        Gauge {
            born: Instant::now(),
            load: AtomicU64::new(0),
            late: AtomicU64::new(0),
            published_ns: AtomicU64::new(0),
            sessions: AtomicUsize::new(0),
        }
    }

    fn publish(&self, load: f64, late: f64) {
        self.load.store(load.to_bits(), Ordering::Relaxed);
        self.late.store(late.to_bits(), Ordering::Relaxed);
        let ns = self.born.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.published_ns.store(ns, Ordering::Relaxed);
    }
}

/// A session counted on a renderer's GPU, with its slot ring there, until dropped.
pub struct Placed {
    gauge: Arc<Gauge>,
    id: u64,
    tx: Sender<Request>,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.gauge.sessions.fetch_sub(1, Ordering::Relaxed);
        let _ = self.tx.send(Request::SessionEnded(self.id));
    }
}

/// What the renderer thread runs. A batch is started, then finished: on the GPU the next batch
/// is queued behind the running one while the CPU reads the previous one's frames, so the GPU
/// does not wait on the renderer thread between batches.
trait Backend {
    /// Starts `frames.len()` frames (a batch profile), each one slot's values laid out by
    /// `layout`, and returns without waiting for them.
    fn start(&mut self, layout: &Layout, frames: &[&Slot]) -> anyhow::Result<()>;
    /// Waits for the oldest started batch: one output per frame.
    fn finish(&mut self) -> anyhow::Result<Finished>;
    /// Whether faces are blended (camera: and cropped) here (see `Renderer::faces_on_gpu`).
    fn faces_on_gpu(&self) -> bool {
        false
    }
    /// Whether `start` returns before the batch is done (else finish at once).
    fn pipelined(&self) -> bool;
    /// Rows `rows` of the stacked hidden states of one window.
    fn whisper(&mut self, mel: &Tensor, rows: Range<usize>) -> anyhow::Result<Tensor>;
}

struct CpuBackend {
    /// The model's own threads: one core fewer than the machine has, so the sessions' media
    /// workers (decode, face detection, whisper, encode) keep one.
    pool: rayon::ThreadPool,
    graphs: BTreeMap<usize, Graph>,
    names: &'static [&'static str],
    whisper: Arc<Graph>,
    done: VecDeque<anyhow::Result<Finished>>,
}

fn whisper_cpu(graph: &Graph, mel: &Tensor, rows: Range<usize>) -> anyhow::Result<Tensor> {
    let (first, at) = served_rows(&rows)?;
    let first = Tensor::new(vec![1], vec![first as f32]);
    let states = cpu::run(
        graph,
        &[("input_features", mel), (whisper::FIRST_ROW, &first)],
    )?;
    stacked(states, at, rows.len())
}

/// Where window rows `rows` lie in the served encoder's output (`Stage::WhisperRows`: its
/// `SERVED_ROWS` rows from a `first_row` input): that input, and the offset of `rows.start`
/// among the rows it returns. The first row moves back from the window's end so that all the
/// returned rows are the window's.
fn served_rows(rows: &Range<usize>) -> anyhow::Result<(usize, usize)> {
    let total = whisper::POSITIONS;
    if rows.len() > whisper::SERVED_ROWS || rows.end > total {
        bail!(
            "whisper rows {rows:?}: the served encoder returns {} consecutive rows of {total}",
            whisper::SERVED_ROWS
        );
    }
    let first = rows.start.min(total - whisper::SERVED_ROWS);
    Ok((first, rows.start - first))
}

/// `n` rows from row `first` of each of the encoder's hidden states ([1, T, d] each; `first`
/// is 0 when only the wanted rows were read back) -> [n, STATES, d].
fn stacked(mut states: Vec<(String, Tensor)>, first: usize, n: usize) -> anyhow::Result<Tensor> {
    states.sort_by_key(|(n, _)| {
        n.trim_start_matches("hidden_state_")
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    });
    if states.len() != STATES {
        bail!(
            "the whisper encoder gave {} hidden states; MuseTalk's prompt takes {STATES}",
            states.len()
        );
    }
    let d = states[0].1.shape.last().copied().unwrap_or(0);
    let mut data = Vec::with_capacity(n * STATES * d);
    for r in 0..n {
        for (_, t) in &states {
            let at = first + r;
            let row = t
                .data
                .get(at * d..(at + 1) * d)
                .context("whisper hidden state shorter than its window")?;
            data.extend_from_slice(row);
        }
    }
    Ok(Tensor::new(vec![n, STATES, d], data))
}

impl Backend for CpuBackend {
    fn start(&mut self, layout: &Layout, frames: &[&Slot]) -> anyhow::Result<()> {
        let g = self
            .graphs
            .get(&frames.len())
            .with_context(|| format!("no batch profile {}", frames.len()))?;
        let data: Vec<&[f16]> = frames.iter().map(|s| s.data()).collect();
        let inputs = batched(layout, &data)?;
        let named: Vec<(&str, &Tensor)> = self.names.iter().copied().zip(&inputs).collect();
        let result = self
            .pool
            .install(|| cpu::run(g, &named))
            .map_err(anyhow::Error::from)
            .and_then(|mut out| {
                let images = out.remove(0).1;
                split_frames(&images.shape, &images.data, frames.len(), <[f32]>::to_vec)
            })
            .map(|faces| Finished {
                outputs: faces.into_iter().map(Output::Face).collect(),
                device_time: None,
                done_before: false,
            });
        self.done.push_back(result);
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<Finished> {
        self.done.pop_front().context("no batch was started")?
    }

    fn pipelined(&self) -> bool {
        false
    }

    fn whisper(&mut self, mel: &Tensor, rows: Range<usize>) -> anyhow::Result<Tensor> {
        whisper_cpu(&self.whisper, mel, rows)
    }
}

/// A batch's images [B, ...] -> one f32 tensor per frame (`to_f32` converts one frame).
fn split_frames<T>(
    shape: &[usize],
    data: &[T],
    batch: usize,
    to_f32: impl Fn(&[T]) -> Vec<f32>,
) -> anyhow::Result<Vec<Tensor>> {
    if shape.first() != Some(&batch) || data.len() != shape.iter().product::<usize>() {
        bail!("the model gave images {shape:?} for a batch of {batch}");
    }
    let per = data.len() / batch.max(1);
    Ok(data
        .chunks_exact(per.max(1))
        .map(|c| Tensor::new(shape[1..].to_vec(), to_f32(c)))
        .collect())
}

/// Pinned input/output buffers of one batch profile, two sets used in turn.
struct Staged {
    sets: [lipstream_gpu::Staging; 2],
    /// Index of each of the slots' inputs (`names` order) among the executor's inputs.
    inputs: Vec<usize>,
    image: usize,
    image_shape: Vec<usize>,
}

/// The face kernels and their region buffers, one set per staging set.
struct GpuFaces {
    image: Image,
    sets: [Faces; 2],
    /// Camera mode: the model's crops are cut from the regions.
    crop: bool,
}

struct CudaBackend {
    ex: Executors,
    names: &'static [&'static str],
    staging: Vec<f16>,
    staged: BTreeMap<usize, Staged>,
    faces: Option<GpuFaces>,
    /// Per set: events recorded on the stream before the batch's upload and after its
    /// download, for its device time.
    clocks: [StreamTimer; 2],
    /// Which set the next batch uses: consecutive batches never share buffers.
    turn: usize,
    /// Started batches (profile, set), oldest first.
    pending: VecDeque<(usize, usize)>,
}

impl CudaBackend {
    fn new(ex: Executors, mode: Stage) -> anyhow::Result<Self> {
        use lipstream_engines::models::musetalk::CROP;
        let (faces_on_gpu, crop) = (true, mode == Stage::Camera);
        let names = input_names(mode, faces_on_gpu);
        let mut staged = BTreeMap::new();
        for (b, e) in &ex.profiles {
            let index = |list: &[lipstream_gpu::plan::Binding], name: &str| {
                list.iter()
                    .position(|x| x.name == name)
                    .with_context(|| format!("the engine's frame step has no {name}"))
            };
            let inputs = names
                .iter()
                .map(|n| index(e.inputs(), n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let image = index(e.outputs(), "image")?;
            // The face kernels write the crops and read the faces in place: they must be the
            // batch's [B, 3, CROP, CROP].
            let crops = [*b, 3, CROP, CROP];
            if crop {
                for name in ["masked", "reference"] {
                    let shape = &e.inputs()[index(e.inputs(), name)?].shape;
                    if shape[..] != crops[..] {
                        bail!("the engine's {name} is {shape:?}; the face crop makes {crops:?}");
                    }
                }
            }
            if faces_on_gpu && e.outputs()[image].shape[..] != crops[..] {
                bail!(
                    "the engine's image is {:?}; the face blend takes {crops:?}",
                    e.outputs()[image].shape
                );
            }
            staged.insert(
                *b,
                Staged {
                    sets: [e.staging(&ex.rt)?, e.staging(&ex.rt)?],
                    inputs,
                    image,
                    image_shape: e.outputs()[image].shape.clone(),
                },
            );
        }
        let faces = if faces_on_gpu {
            let device = &ex.rt.device;
            Some(GpuFaces {
                image: Image::load(device).context("loading the face kernels")?,
                sets: [Faces::new(device)?, Faces::new(device)?],
                crop,
            })
        } else {
            None
        };
        let clocks = [
            StreamTimer::new(&ex.rt.device)?,
            StreamTimer::new(&ex.rt.device)?,
        ];
        Ok(CudaBackend {
            ex,
            names,
            staging: Vec::new(),
            staged,
            faces,
            clocks,
            turn: 0,
            pending: VecDeque::new(),
        })
    }
}

impl Backend for CudaBackend {
    fn start(&mut self, layout: &Layout, frames: &[&Slot]) -> anyhow::Result<()> {
        let batch = frames.len();
        let Executors { rt, profiles, .. } = &mut self.ex;
        let (_, ex) = profiles
            .iter()
            .find(|(b, _)| *b == batch)
            .with_context(|| format!("no batch profile {batch}"))?;
        let staged = self
            .staged
            .get_mut(&batch)
            .with_context(|| format!("no buffers for batch profile {batch}"))?;
        let set = &mut staged.sets[self.turn];
        let t0 = Instant::now();
        // The sessions' fp16 slots copied into page-locked memory: no conversion here, no
        // pageable upload.
        for (i, (&input, name)) in staged.inputs.iter().zip(self.names).enumerate() {
            let dst = set.input_mut(input)?;
            let per = dst.len() / batch.max(1);
            let range = layout.range(i);
            if range.len() != per {
                bail!("{name} of {} values; the engine takes {per}", range.len());
            }
            for (f, frame) in frames.iter().enumerate() {
                let src = frame
                    .data()
                    .get(range.clone())
                    .with_context(|| format!("a frame without its {name}"))?;
                dst[f * per..(f + 1) * per].copy_from_slice(src);
            }
        }
        let t1 = Instant::now();
        let clock = &self.clocks[self.turn];
        clock.begin(&rt.device)?;
        ex.upload_inputs(rt, set, &staged.inputs)?;
        match &mut self.faces {
            Some(gf) => {
                let faces = frames
                    .iter()
                    .map(|s| {
                        s.face()
                            .map(|(f, pixels)| FaceFrame {
                                region: f.region,
                                pixels,
                                face: f.face,
                                mask: f.mask,
                                strength: f.strength,
                            })
                            .context("a frame without its face region")
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let set = &mut gf.sets[self.turn];
                set.upload(&rt.device.stream, &faces)?;
                if gf.crop {
                    ex.crop_faces(rt, &gf.image, set, "reference", "masked")?;
                }
                ex.launch(rt)?;
                ex.blend_faces(rt, &gf.image, set, "image")?;
            }
            None => {
                ex.launch(rt)?;
                ex.download(rt, set)?;
            }
        }
        clock.end(&rt.device)?;
        tracing::debug!(
            batch,
            fill_ms = (t1 - t0).as_secs_f64() * 1e3,
            queue_ms = t1.elapsed().as_secs_f64() * 1e3,
            "batch started"
        );
        self.pending.push_back((batch, self.turn));
        self.turn ^= 1;
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<Finished> {
        let (batch, set) = self.pending.pop_front().context("no batch was started")?;
        let done_before = self.clocks[set].ended()?;
        let ms = self.clocks[set].wait()?;
        let device_time = Some(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3));
        if let Some(gf) = &self.faces {
            let faces = &gf.sets[set];
            if faces.len() != batch {
                bail!("{} face regions for a batch of {batch}", faces.len());
            }
            let t0 = Instant::now();
            let outputs = (0..batch)
                .map(|i| {
                    let (r, pixels) = faces.region(i)?;
                    Ok(Output::Blended(r, pixels.to_vec()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            tracing::debug!(
                batch,
                device_ms = ms,
                copy_ms = t0.elapsed().as_secs_f64() * 1e3,
                "batch finished (faces blended on the GPU)"
            );
            return Ok(Finished {
                outputs,
                device_time,
                done_before,
            });
        }
        let staged = self
            .staged
            .get(&batch)
            .with_context(|| format!("no buffers for batch profile {batch}"))?;
        let t0 = Instant::now();
        let out = staged.sets[set].output(staged.image)?;
        let t1 = Instant::now();
        // fp16 through the CPU's vector conversions.
        let outputs = split_frames(&staged.image_shape, out, batch, |c| c.to_f32_vec())?
            .into_iter()
            .map(Output::Face)
            .collect();
        tracing::debug!(
            batch,
            device_ms = ms,
            wait_ms = (t1 - t0).as_secs_f64() * 1e3,
            split_ms = t1.elapsed().as_secs_f64() * 1e3,
            "batch finished"
        );
        Ok(Finished {
            outputs,
            device_time,
            done_before,
        })
    }

    fn pipelined(&self) -> bool {
        true
    }

    fn faces_on_gpu(&self) -> bool {
        self.faces.is_some()
    }

    fn whisper(&mut self, mel: &Tensor, rows: Range<usize>) -> anyhow::Result<Tensor> {
        whisper_cuda(&mut self.ex, &mut self.staging, mel, rows)
    }
}

/// One whisper window on the CUDA executor: only the rows the hop reads come back (a dozen of
/// 1500).
fn whisper_cuda(
    ex: &mut Executors,
    staging: &mut Vec<f16>,
    mel: &Tensor,
    rows: Range<usize>,
) -> anyhow::Result<Tensor> {
    let Executors { rt, whisper, .. } = ex;
    let mut out = whisper_batch(rt, whisper, staging, &[(mel, rows)])?;
    out.pop().context("no whisper output")
}

/// Windows `jobs` (mel, rows) through `ex`, whose batch is exactly `jobs.len()`: the rows each
/// asks for, stacked [rows, STATES, d].
fn whisper_batch(
    rt: &mut lipstream_gpu::Runtime,
    ex: &lipstream_gpu::Executor,
    staging: &mut Vec<f16>,
    jobs: &[(&Tensor, Range<usize>)],
) -> anyhow::Result<Vec<Tensor>> {
    staging.clear();
    for (mel, _) in jobs {
        staging.extend(mel.data.iter().map(|&v| f16::from_f32(v)));
    }
    ex.write_input(rt, "input_features", staging)?;
    let placed = jobs
        .iter()
        .map(|(_, rows)| served_rows(rows))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Whole numbers below 2048: exact in fp16.
    let first: Vec<f16> = placed
        .iter()
        .map(|(f, _)| f16::from_f32(*f as f32))
        .collect();
    ex.write_input(rt, whisper::FIRST_ROW, &first)?;
    ex.launch(rt)?;
    let mut out = Vec::with_capacity(jobs.len());
    for (i, ((_, rows), (_, from))) in jobs.iter().zip(&placed).enumerate() {
        let mut states = Vec::new();
        for b in ex.outputs() {
            // [B, SERVED_ROWS, d]: window i's rows, from its offset among them.
            let (t, d) = (b.shape[1], b.shape[2]);
            let at = |r: usize| (i * t + from + r) * d;
            let part = ex.read_output_range(rt, &b.name, at(0)..at(rows.len()))?;
            let data = part.iter().map(|v| v.to_f32()).collect();
            states.push((b.name.clone(), Tensor::new(vec![1, rows.len(), d], data)));
        }
        out.push(stacked(states, 0, rows.len())?);
    }
    Ok(out)
}

/// Whisper windows run together on the CUDA whisper thread (besides one alone). Every count
/// to 6 has its own profile: a launch costs ~0.16 ms on top of ~0.14 ms a window (H100), and
/// 24 sessions gather 2-4 windows a launch, which powers of two alone would split (3 as 2 + 1).
pub(crate) const WHISPER_BATCHES: [usize; 7] = [2, 3, 4, 5, 6, 8, 16];

/// One whisper window to encode, and where the answer goes.
struct WhisperJob {
    mel: Tensor,
    rows: Range<usize>,
    reply: SyncSender<anyhow::Result<Tensor>>,
}

/// `first` and whatever else `rx` has, waiting up to `wait` after `first` for more until there
/// are `most`: sessions' hops fall at unrelated times, and windows that share a launch cost
/// less each.
fn gather<T>(rx: &Receiver<T>, first: T, wait: Duration, most: usize) -> Vec<T> {
    let mut jobs = vec![first];
    jobs.extend(rx.try_iter());
    let until = Instant::now() + wait;
    while jobs.len() < most {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match rx.recv_timeout(left) {
            Ok(job) => {
                jobs.push(job);
                jobs.extend(rx.try_iter());
            }
            Err(_) => break,
        }
    }
    jobs
}

/// Whisper on its own CUDA stream and thread: a session's window runs beside the frame batch
/// in flight instead of waiting behind it (a frame's budget is too short for that wait), and
/// the windows of all sessions that wait together run as one batch.
fn start_whisper_thread(
    src: Sources,
    tuned: lipstream_gpu::Tuning,
    config: &RendererConfig,
    images: BTreeMap<String, Vec<u8>>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Sender<WhisperJob>> {
    let (gpu, wait) = (config.gpu, config.whisper_wait);
    let (tx, rx) = std::sync::mpsc::channel::<WhisperJob>();
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("whisper".into())
        .spawn(move || {
            let built = lipstream_gpu::device::Device::open(gpu)
                .with_context(|| format!("opening GPU {gpu} for whisper"))
                .and_then(|device| {
                    // The frame executor's kernels (an engine file's): nothing to compile.
                    device.use_kernel_images(images);
                    // Batched windows' convolutions were not timed at engine build: they take
                    // cuDNN's default algorithms.
                    crate::engine::executors(
                        device,
                        &src,
                        Stage::WhisperRows,
                        &WHISPER_BATCHES,
                        &tuned,
                        true,
                    )
                });
            let mut ex = match built {
                Ok(ex) => {
                    let _ = ready_tx.send(Ok(()));
                    ex
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut staging = Vec::new();
            let most = WHISPER_BATCHES.iter().copied().max().unwrap_or(1);
            // Ends when the renderer (every sender) is gone.
            while let Ok(first) = rx.recv() {
                let mut jobs = gather(&rx, first, wait, most);
                while !jobs.is_empty() {
                    let Executors {
                        rt,
                        profiles,
                        whisper,
                    } = &mut ex;
                    let (n, runner) = profiles
                        .iter()
                        .filter(|(b, _)| *b <= jobs.len())
                        .max_by_key(|(b, _)| *b)
                        .map_or((1, &*whisper), |(b, e)| (*b, e));
                    let chunk: Vec<WhisperJob> = jobs.drain(..n).collect();
                    let inputs: Vec<(&Tensor, Range<usize>)> =
                        chunk.iter().map(|j| (&j.mel, j.rows.clone())).collect();
                    let t = Instant::now();
                    let result = whisper_batch(rt, runner, &mut staging, &inputs);
                    let took = t.elapsed();
                    metrics.whisper_windows.observe(n as f64);
                    metrics.whisper_seconds.inc_by(took.as_secs_f64());
                    tracing::debug!(windows = n, ms = took.as_secs_f64() * 1e3, "whisper batch");
                    match result {
                        Ok(outs) => {
                            for (job, out) in chunk.into_iter().zip(outs) {
                                let _ = job.reply.send(Ok(out));
                            }
                        }
                        Err(e) => {
                            for job in chunk {
                                let _ = job.reply.send(Err(anyhow::anyhow!("whisper: {e:#}")));
                            }
                        }
                    }
                }
            }
        })
        .context("starting the whisper thread")?;
    ready_rx
        .recv()
        .context("the whisper thread stopped while loading")??;
    Ok(tx)
}

/// What the renderer thread reports once its model is ready.
struct Ready {
    executor: String,
    profiles: Vec<usize>,
    took: BTreeMap<usize, Duration>,
    audio_dim: usize,
    faces_on_gpu: bool,
    whisper: Option<Sender<WhisperJob>>,
}

/// A backend with its description, batch profiles and (CUDA) whisper thread.
type Built = (
    Box<dyn Backend>,
    String,
    Vec<usize>,
    Option<Sender<WhisperJob>>,
);

impl Renderer {
    /// Loads the model, times each batch profile once, and starts the thread. Blocks until the
    /// model is ready (a CUDA build from a models folder times its convolutions first).
    pub fn start(config: RendererConfig, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Self>> {
        if !matches!(config.mode, Stage::Camera | Stage::Avatar) {
            bail!(
                "the renderer runs camera or avatar frames, not {:?}",
                config.mode
            );
        }
        let names = input_names(config.mode, false);
        let use_cuda = match &config.source {
            ModelSource::Engine(_) => true,
            ModelSource::Models(_) => {
                config.cuda && lipstream_gpu::device::executor_choice(true).is_ok()
            }
        };
        // The CPU executor is made here; CUDA objects on the renderer thread that uses them.
        let mut cpu_whisper = None;
        let mut cpu_built: Option<(CpuBackend, String, Vec<usize>)> = None;
        if let (ModelSource::Models(dir), false) = (&config.source, use_cuda) {
            let src =
                Sources::open(dir).with_context(|| format!("models folder {}", dir.display()))?;
            let mut graphs = BTreeMap::new();
            for &b in &config.profiles {
                graphs.insert(b, src.graph(config.mode, b)?);
            }
            let whisper = Arc::new(src.graph(Stage::WhisperRows, 1)?);
            cpu_whisper = Some(whisper.clone());
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(cores.saturating_sub(1).max(1))
                .thread_name(|i| format!("renderer-cpu-{i}"))
                .build()
                .context("starting the renderer's CPU threads")?;
            let backend = CpuBackend {
                pool,
                graphs,
                names,
                whisper,
                done: VecDeque::new(),
            };
            cpu_built = Some((
                backend,
                "CPU reference executor".into(),
                config.profiles.clone(),
            ));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let gauge = Arc::new(Gauge::new());
        let loop_gauge = gauge.clone();
        let device = if use_cuda {
            config.gpu.to_string()
        } else {
            "cpu".to_string()
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let mode = config.mode;
        let frame_budget = config.frame_budget;
        let hold = config.hold_batches;
        std::thread::Builder::new()
            .name("renderer".into())
            .spawn(move || {
                let ready = cpu_built
                    .map(|(b, e, p)| (Box::new(b) as Box<dyn Backend>, e, p, None))
                    .map_or_else(|| cuda_backend(&config, metrics.clone()), Ok)
                    .and_then(|(mut backend, executor, profiles, whisper)| {
                        let audio_dim = audio_dim(backend.as_mut())?;
                        let faces_on_gpu = backend.faces_on_gpu();
                        let layout = layout(mode, audio_dim, faces_on_gpu);
                        let took = time_profiles(backend.as_mut(), &layout, &profiles)?;
                        let ready = Ready {
                            executor,
                            profiles,
                            took,
                            audio_dim,
                            faces_on_gpu,
                            whisper,
                        };
                        Ok((backend, ready))
                    });
                match ready {
                    Ok((backend, ready)) => {
                        let (profiles, took) = (ready.profiles.clone(), ready.took.clone());
                        let layout = layout(mode, ready.audio_dim, ready.faces_on_gpu);
                        let _ = ready_tx.send(Ok(ready));
                        let batcher = Batcher::new(profiles).holding(hold);
                        render_loop(
                            backend, rx, batcher, took, metrics, loop_gauge, device, layout,
                        );
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("starting the renderer thread")?;
        let ready = ready_rx
            .recv()
            .context("the renderer thread stopped while loading")??;
        tracing::info!(
            executor = %ready.executor,
            profiles = ?ready.profiles,
            "lip-sync renderer ready ({} mode{}); batch times {}",
            if mode == Stage::Camera { "camera" } else { "avatar" },
            if ready.faces_on_gpu {
                if mode == Stage::Camera {
                ", faces cropped and blended on the GPU"
            } else {
                ", faces blended on the GPU"
            }
            } else {
                ""
            },
            ready
                .took
                .iter()
                .map(|(b, t)| format!("B={b} {:.1} ms", t.as_secs_f64() * 1000.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(Arc::new(Renderer {
            tx,
            gauge,
            mode,
            executor: ready.executor,
            profiles: ready.profiles,
            audio_dim: ready.audio_dim,
            layout: layout(mode, ready.audio_dim, ready.faces_on_gpu),
            faces_on_gpu: ready.faces_on_gpu,
            slots_per_session: slots::per_session(frame_budget),
            next_session: AtomicU64::new(0),
            cpu_whisper,
            whisper: ready.whisper,
        }))
    }

    /// Counts a new session on this renderer's GPU until the returned guard is dropped, and
    /// gives it its ring of input slots.
    pub fn place_session(&self) -> (Placed, SessionSlots) {
        self.gauge.sessions.fetch_add(1, Ordering::Relaxed);
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (slots, back) = slots::ring(id, &self.layout, self.slots_per_session);
        // Before any of its frames: the channel keeps the order.
        let _ = self.tx.send(Request::Session { id, back });
        let placed = Placed {
            gauge: self.gauge.clone(),
            id,
            tx: self.tx.clone(),
        };
        (placed, slots)
    }

    /// This GPU's load for placement: the share of it its frames need and late frames over the
    /// last window of batches (none for two windows: idle), and the sessions on it.
    pub fn load(&self) -> crate::placement::GpuLoad {
        let g = &self.gauge;
        let published = Duration::from_nanos(g.published_ns.load(Ordering::Relaxed));
        let idle = g.born.elapsed().saturating_sub(published) > 2 * GAUGE_WINDOW;
        let read = |a: &AtomicU64| {
            if idle {
                0.0
            } else {
                f64::from_bits(a.load(Ordering::Relaxed))
            }
        };
        crate::placement::GpuLoad {
            load: read(&g.load),
            late: read(&g.late),
            sessions: g.sessions.load(Ordering::Relaxed),
        }
    }

    /// Queues one frame that must be done by `deadline`; never waits.
    pub fn submit(&self, job: Job, deadline: Instant) {
        if let Err(e) = self.tx.send(Request::Frame { job, deadline }) {
            // The renderer thread is gone (it logged why): the frame goes out unprocessed.
            if let Request::Frame { job, .. } = e.0 {
                (job.reply)(Err(Missed::Failed("the renderer stopped".into())));
            }
        }
    }

    /// Whisper-tiny over one log-mel window [1, 80, 3000]: rows `rows` of the stacked hidden
    /// states [1500, 5, d].
    pub fn encode_audio(&self, mel: &Tensor, rows: Range<usize>) -> anyhow::Result<Tensor> {
        if let Some(g) = &self.cpu_whisper {
            return whisper_cpu(g, mel, rows);
        }
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        let job = WhisperJob {
            mel: mel.clone(),
            rows,
            reply,
        };
        let sent = match &self.whisper {
            Some(w) => w.send(job).is_ok(),
            None => self.tx.send(Request::Whisper(job)).is_ok(),
        };
        if !sent {
            anyhow::bail!("the renderer stopped");
        }
        rx.recv_timeout(Duration::from_secs(5))
            .context("no whisper window from the renderer within 5 s")?
    }
}

/// The CUDA backend: an engine file, or a models folder built (and timed) here.
fn cuda_backend(config: &RendererConfig, metrics: Arc<Metrics>) -> anyhow::Result<Built> {
    let compile = matches!(config.source, ModelSource::Models(_));
    lipstream_gpu::device::executor_choice(compile).map_err(|why| match compile {
        true => anyhow::anyhow!("CUDA is needed: {why}"),
        false => anyhow::anyhow!("CUDA is needed for an engine file: {why}"),
    })?;
    let report = lipstream_gpu::device::report();
    let gpu = report.gpus.get(config.gpu).cloned().with_context(|| {
        format!(
            "no GPU {} here (the driver reports {})",
            config.gpu,
            report.gpus.len()
        )
    })?;
    let (ex, profiles, whisper) = match &config.source {
        ModelSource::Engine(paths) => {
            let loaded = crate::engine::file::load(paths, config.gpu, true, &config.profiles)?;
            if loaded.stage != config.mode {
                bail!(
                    "{} is a {:?} engine; this server runs {:?} mode",
                    loaded.path.display(),
                    loaded.stage,
                    config.mode
                );
            }
            let tuned = crate::engine::file::tuned(&loaded.header)?;
            let images = loaded.executors.rt.device.kernel_images();
            let whisper = start_whisper_thread(loaded.sources, tuned, config, images, metrics)?;
            (loaded.executors, loaded.batches, whisper)
        }
        ModelSource::Models(dir) => {
            let src = Sources::open(dir)?;
            let device = lipstream_gpu::device::Device::open(config.gpu)
                .with_context(|| format!("opening GPU {}", config.gpu))?;
            tracing::info!(
                "building the CUDA executor from {} (timing convolutions; `lipstream engine build` saves this)",
                dir.display()
            );
            let ex = crate::engine::executors(
                device,
                &src,
                config.mode,
                &config.profiles,
                &lipstream_gpu::Tuning::default(),
                true,
            )?;
            let tuned = lipstream_gpu::Tuning::of(&ex.rt);
            let images = ex.rt.device.kernel_images();
            let whisper = start_whisper_thread(src, tuned, config, images, metrics)?;
            (ex, config.profiles.clone(), whisper)
        }
    };
    Ok((
        Box::new(CudaBackend::new(ex, config.mode)?),
        format!("CUDA ({gpu})"),
        profiles,
        Some(whisper),
    ))
}

/// Where each input a slot carries (`input_names`) sits in it (MuseTalk's shapes; the audio
/// prompt is 50 tokens of whisper's width).
pub fn layout(mode: Stage, audio_dim: usize, faces_on_gpu: bool) -> Layout {
    use lipstream_engines::models::musetalk::{CROP, LATENT};
    Layout::new(
        input_names(mode, faces_on_gpu)
            .iter()
            .map(|&name| match name {
                "masked" | "reference" => vec![3, CROP, CROP],
                "latents" => vec![8, LATENT, LATENT],
                _ => vec![50, audio_dim],
            })
            .collect(),
    )
}

/// Stacks the frames' slots into batched f32 tensors, input by input.
fn batched(layout: &Layout, frames: &[&[f16]]) -> anyhow::Result<Vec<Tensor>> {
    (0..layout.shapes.len())
        .map(|i| {
            let range = layout.range(i);
            let mut shape = vec![frames.len()];
            shape.extend_from_slice(&layout.shapes[i]);
            let mut data = vec![0f32; frames.len() * range.len()];
            for (f, frame) in frames.iter().enumerate() {
                let src = frame
                    .get(range.clone())
                    .context("a slot shorter than its layout")?;
                src.convert_to_f32_slice(&mut data[f * range.len()..(f + 1) * range.len()]);
            }
            Ok(Tensor::new(shape, data))
        })
        .collect()
}

/// Runs every profile once (a warm-up that also gives the policy its first batch times) on a
/// blank slot: zeros, and where faces are cropped on the GPU a grey 640x480 frame's face.
fn time_profiles(
    backend: &mut dyn Backend,
    layout: &Layout,
    profiles: &[usize],
) -> anyhow::Result<BTreeMap<usize, Duration>> {
    let mut took = BTreeMap::new();
    let (mut ring, _back) = slots::ring(u64::MAX, layout, 1);
    let mut slot = ring.take().context("a ring without its slot")?;
    if backend.faces_on_gpu() {
        let (w, h) = (640, 480);
        let (y, uv) = (vec![128u8; w * h], vec![128u8; w * h / 4]);
        let frame = Planes {
            width: w,
            height: h,
            y: &y,
            u: &uv,
            v: &uv,
        };
        let face = FaceBox {
            x0: 200.0,
            y0: 120.0,
            x1: 440.0,
            y1: 370.0,
        };
        slot.set_face(&frame, face, LowerFace::DEFAULT, 1.0)
            .map_err(anyhow::Error::msg)?;
    }
    for &b in profiles {
        let frames: Vec<&Slot> = (0..b).map(|_| &slot).collect();
        let t = Instant::now();
        let done = backend
            .start(layout, &frames)
            .and_then(|()| backend.finish())
            .with_context(|| format!("first run of batch profile {b}"))?;
        took.insert(b, done.device_time.unwrap_or(t.elapsed()));
    }
    Ok(took)
}

/// The audio prompt width the model takes, from a whisper run on silence (its warm-up too).
fn audio_dim(backend: &mut dyn Backend) -> anyhow::Result<usize> {
    use lipstream_engines::audio::mel::{FRAMES, N_MELS};
    let mel = Tensor::new(vec![1, N_MELS, FRAMES], vec![-1.5; N_MELS * FRAMES]);
    let states = backend.whisper(&mel, 0..1)?;
    Ok(states.shape[2])
}

/// `a - b` in milliseconds, negative when `a` is earlier.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    a.saturating_duration_since(b).as_secs_f64() * 1e3
        - b.saturating_duration_since(a).as_secs_f64() * 1e3
}

/// A batch started on the backend and not finished yet.
struct Flight {
    replies: Vec<Reply>,
    profile: usize,
    started: Instant,
    /// When it should end (its expected start on the GPU + its measured time).
    ends: Instant,
}

/// The renderer thread: gathers frames, asks the batcher, keeps the backend busy.
struct Loop {
    backend: Box<dyn Backend>,
    batcher: Batcher<Job>,
    took: BatchTimes,
    metrics: Arc<Metrics>,
    failures: u64,
    /// When the last batch ended.
    last_done: Instant,
    /// Time from deciding a batch to its launch (filling its inputs): the next batch is
    /// decided this long before the running one should end, so the GPU never waits for it.
    lead: Duration,
    gauge: Arc<Gauge>,
    window: Window,
    /// This renderer's device in the per-GPU metrics.
    device: crate::metrics::GpuLabel,
    layout: Layout,
    /// Each session's ring, to give used slots back.
    returns: Returns,
    /// Until when the waiting frames wait for a fuller batch (`Tick::hold_until`).
    hold: Option<Instant>,
    /// Holding was asked for (`--hold-batches`); it is on while the GPU is below
    /// `HOLD_BELOW_LOAD` and gave up no frame in the last window.
    hold_wanted: bool,
}

/// The load (`scheduler::gpu_load`) from which the renderer stops holding frames for fuller
/// batches. Below full load holding saves GPU time (an H100 at 16 avatar sessions, load 0.62-0.66:
/// 95 -> 67 % busy, none late); near it, the slack a hold waits out is what frames lack when
/// batches run long (24 sessions, load 0.93-0.99: 1.08 -> 1.94 % late).
const HOLD_BELOW_LOAD: f64 = 0.85;

impl Loop {
    fn take(&mut self, r: Request) {
        match r {
            Request::Frame { job, deadline } => self.batcher.push(job, deadline),
            Request::Whisper(job) => {
                let _ = job.reply.send(self.backend.whisper(&job.mel, job.rows));
            }
            Request::Session { id, back } => self.returns.add(id, back),
            Request::SessionEnded(id) => self.returns.remove(id),
        }
    }

    /// Decides the batch that runs once the GPU is free at `begins` and starts it.
    fn start_next(&mut self, begins: Instant) -> Option<Flight> {
        self.hold = None;
        if self.batcher.is_empty() {
            return None;
        }
        // One line per decision, for reading the policy's choices under real load; what it
        // says of the frames before the tick is only gathered when it is written.
        let before = tracing::enabled!(tracing::Level::TRACE)
            .then(|| (self.batcher.len(), self.batcher.earliest()));
        let tick = {
            let took = &self.took;
            self.batcher.tick(begins, |b| took.safe(b))
        };
        if let Some((waiting, earliest)) = before {
            tracing::trace!(
                waiting,
                slack_ms = earliest.map_or(f64::NAN, |e| signed_ms(e, begins)),
                begins_ms = signed_ms(begins, Instant::now()),
                profile = tick.profile,
                late = tick.late.len(),
                left = self.batcher.len(),
                "batch decided"
            );
        }
        if !tick.late.is_empty() {
            tracing::debug!(
                frames = tick.late.len(),
                waiting = self.batcher.len() + tick.batch.len(),
                "frames given up: they cannot be rendered by their deadline"
            );
        }
        self.window.late += tick.late.len() as u64;
        for job in tick.late {
            self.returns.give_back(job.slot);
            (job.reply)(Err(Missed::Late));
        }
        if tick.profile == 0 {
            self.hold = tick.hold_until;
            return None;
        }
        let frames: Vec<&Slot> = tick.batch.iter().map(|j| &j.slot).collect();
        let started = Instant::now();
        let result = self.backend.start(&self.layout, &frames);
        // The inputs are in the staging buffers (or consumed): the slots go back now.
        let mut replies = Vec::with_capacity(tick.batch.len());
        for job in tick.batch {
            self.returns.give_back(job.slot);
            replies.push(job.reply);
        }
        match result {
            Ok(()) => {
                let launch = started.elapsed();
                self.lead = self.lead.mul_f64(0.8) + launch.mul_f64(0.2);
                Some(Flight {
                    profile: tick.profile,
                    replies,
                    started,
                    ends: begins.max(started) + self.took.expected(tick.profile),
                })
            }
            Err(e) => {
                self.failed(replies, &e);
                None
            }
        }
    }

    /// Waits for `f`'s frames and hands them out; returns when it ended (`batch_end`).
    fn finish(&mut self, f: Flight) -> Instant {
        let called = Instant::now();
        let result = self.backend.finish();
        let done = Instant::now();
        let done_before = matches!(&result, Ok(r) if r.done_before);
        let ended = batch_end(f.ends, called, done, done_before);
        // Its time: what the device measured, else from when it could start (behind the batch
        // before it) to when this thread saw it end. The thread looks only when the batch should
        // be done, so the second can never come out shorter than the time it is meant to
        // correct: after one slow spell the estimate would stay up for good.
        let seen = done.saturating_duration_since(f.started.max(self.last_done));
        let elapsed = match &result {
            Ok(Finished {
                device_time: Some(t),
                ..
            }) => *t,
            _ => seen,
        };
        self.last_done = done;
        tracing::trace!(
            profile = f.profile,
            ms = elapsed.as_secs_f64() * 1e3,
            off_ms = signed_ms(ended, f.ends),
            "batch done"
        );
        self.took.observe(f.profile, elapsed);
        self.metrics.observe_stage("render_batch", elapsed);
        self.metrics.batch_frames.observe(f.profile as f64);
        self.window.busy += elapsed;
        self.window.planned += self.took.first(f.profile);
        self.window.rendered += f.profile as u64;
        let wall = done.saturating_duration_since(self.window.from);
        if wall >= GAUGE_WINDOW {
            let w = std::mem::replace(&mut self.window, Window::new(done));
            let frames = (w.rendered + w.late).max(1) as f64;
            let (busy, late) = (
                (w.busy.as_secs_f64() / wall.as_secs_f64()).min(1.0),
                w.late as f64 / frames,
            );
            let load = self.took.frame_cost().map_or(busy, |c| {
                gpu_load(w.rendered + w.late, c, w.busy, w.planned, wall)
            });
            self.gauge.publish(load, late);
            self.batcher
                .set_holding(self.hold_wanted && load < HOLD_BELOW_LOAD && w.late == 0);
            let m = &self.metrics;
            m.gpu_busy.get_or_create(&self.device).set(busy);
            m.gpu_load.get_or_create(&self.device).set(load);
            m.gpu_late.get_or_create(&self.device).set(late);
            let sessions = self.gauge.sessions.load(Ordering::Relaxed);
            m.gpu_sessions
                .get_or_create(&self.device)
                .set(i64::try_from(sessions).unwrap_or(i64::MAX));
        }
        self.metrics
            .gpu_frames_rendered
            .get_or_create(&self.device)
            .inc_by(f.profile as u64);
        match result.map(|r| r.outputs) {
            Ok(outputs) if outputs.len() == f.replies.len() => {
                for (reply, out) in f.replies.into_iter().zip(outputs) {
                    reply(Ok(out));
                }
            }
            Ok(outputs) => {
                let e = anyhow::anyhow!("{} outputs for {} frames", outputs.len(), f.replies.len());
                self.failed(f.replies, &e);
            }
            Err(e) => self.failed(f.replies, &e),
        }
        ended
    }

    fn failed(&mut self, replies: Vec<Reply>, e: &anyhow::Error) {
        self.failures += 1;
        // Log the first failure and then every 100th: a broken GPU would flood the log.
        if self.failures == 1 || self.failures.is_multiple_of(100) {
            tracing::error!(
                "lip-sync batch of {} failed ({} so far): {e:#}",
                replies.len(),
                self.failures
            );
        }
        for reply in replies {
            reply(Err(Missed::Failed(format!("{e:#}"))));
        }
    }

    fn run(mut self, rx: Receiver<Request>) {
        let mut flight: Option<Flight> = None;
        let mut open = true;
        while open || flight.is_some() {
            // Set when a hold ran out: the batch decided next starts at its end.
            let mut held_out: Option<Instant> = None;
            // Gather: with nothing running, wait for work; with a batch running, until shortly
            // before it should end, while frames of other sessions arrive.
            match &flight {
                None if self.batcher.is_empty() => match rx.recv() {
                    Ok(r) => self.take(r),
                    // Every handle is gone: the server is stopping.
                    Err(_) => open = false,
                },
                None => {
                    // Frames held for a fuller batch: until the hold ends (less the launch
                    // lead), or until another request comes, then decide again.
                    let wake = self.hold.map(|h| h.checked_sub(self.lead).unwrap_or(h));
                    let left = wake
                        .and_then(|w| w.checked_duration_since(Instant::now()))
                        .filter(|d| !d.is_zero());
                    match left {
                        Some(left) => match rx.recv_timeout(left) {
                            Ok(r) => self.take(r),
                            Err(RecvTimeoutError::Timeout) => held_out = self.hold,
                            Err(RecvTimeoutError::Disconnected) => open = false,
                        },
                        None => held_out = self.hold,
                    }
                }
                Some(f) => {
                    let decide_at = f.ends.checked_sub(self.lead).unwrap_or(f.ends);
                    while let Some(left) = decide_at
                        .checked_duration_since(Instant::now())
                        .filter(|d| !d.is_zero())
                    {
                        match rx.recv_timeout(left) {
                            Ok(r) => self.take(r),
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => {
                                open = false;
                                break;
                            }
                        }
                    }
                }
            }
            while let Ok(r) = rx.try_recv() {
                self.take(r);
            }
            // The next batch is queued behind the running one (the GPU goes straight on),
            // then the running one is finished. With none running it starts now, or, at the
            // end of a hold, when the hold ends (its inputs are filled by then).
            let now = Instant::now();
            let begins = flight
                .as_ref()
                .map_or(held_out.map_or(now, |h| h.max(now)), |f| f.ends.max(now));
            let mut next = self.start_next(begins);
            if let Some(f) = flight.take() {
                let ended = self.finish(f);
                // The next batch was queued behind this one on the estimate of its end.
                if let Some(n) = next.as_mut() {
                    n.ends = queued_end(ended, n.started, self.took.expected(n.profile));
                }
            }
            flight = next;
            if !self.backend.pipelined() {
                if let Some(f) = flight.take() {
                    self.finish(f);
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn render_loop(
    backend: Box<dyn Backend>,
    rx: Receiver<Request>,
    batcher: Batcher<Job>,
    took: BTreeMap<usize, Duration>,
    metrics: Arc<Metrics>,
    gauge: Arc<Gauge>,
    device: String,
    layout: Layout,
) {
    let hold_wanted = batcher.is_holding();
    Loop {
        backend,
        batcher,
        took: BatchTimes::new(&took),
        metrics,
        failures: 0,
        last_done: Instant::now(),
        lead: Duration::from_millis(2),
        gauge,
        window: Window::new(Instant::now()),
        device: crate::metrics::GpuLabel { gpu: device },
        layout,
        returns: Returns::default(),
        hold: None,
        hold_wanted,
    }
    .run(rx)
}

/// The renderer's load since the gauge was last published.
struct Window {
    from: Instant,
    busy: Duration,
    /// What its batches took when first measured (`BatchTimes::first`).
    planned: Duration,
    rendered: u64,
    late: u64,
}

impl Window {
    fn new(from: Instant) -> Self {
        Window {
            from,
            busy: Duration::ZERO,
            planned: Duration::ZERO,
            rendered: 0,
            late: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_go_back_to_their_session_whether_frames_render_or_are_given_up() {
        let dir = std::env::temp_dir().join(format!("lipstream-slots-{}", std::process::id()));
        lipstream_engines::presets::synth(
            lipstream_engines::presets::Preset::Tiny,
            1,
            &dir,
            |_| {},
        )
        .unwrap();
        let renderer = Renderer::start(
            RendererConfig {
                source: ModelSource::Models(dir.clone()),
                mode: Stage::Avatar,
                profiles: vec![1, 2],
                cuda: false,
                gpu: 0,
                frame_budget: Duration::from_millis(200),
                whisper_wait: Duration::ZERO,
                hold_batches: false,
            },
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let (placed, mut slots) = renderer.place_session();
        let per = slots::per_session(Duration::from_millis(200));
        assert_eq!(slots.free(), per);
        let (tx, rx) = std::sync::mpsc::channel();
        let submit = |slots: &mut SessionSlots, k: u32, deadline: Instant| {
            let tx = tx.clone();
            let mut slot = slots.take().unwrap();
            let latents = vec![0.1 * k as f32; renderer.layout.range(0).len()];
            slot.write(&renderer.layout, 0, &latents).unwrap();
            renderer.submit(
                Job {
                    slot,
                    reply: Box::new(move |r| {
                        let shape = |o: Output| match o {
                            Output::Face(t) => t.shape,
                            Output::Blended(..) => vec![],
                        };
                        let _ = tx.send((k, r.map(shape).map_err(|m| format!("{m:?}"))));
                    }),
                },
                deadline,
            );
        };
        let later = Instant::now() + Duration::from_secs(30);
        for k in 0..3 {
            submit(&mut slots, k, later);
        }
        assert_eq!(slots.free(), per - 3);
        let mut got: Vec<_> = (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(60)).unwrap())
            .collect();
        got.sort_by_key(|(k, _)| *k);
        for (k, r) in &got {
            assert_eq!(r.as_ref().unwrap(), &vec![3, 256, 256], "frame {k}");
        }
        // Their slots were back before their results.
        assert_eq!(slots.free(), per);

        // A frame that can no longer make its deadline is given up, and its slot comes back.
        submit(&mut slots, 9, Instant::now());
        let (k, r) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!((k, r.unwrap_err()), (9, "Late".to_string()));
        assert_eq!(slots.free(), per);

        // A session that holds every slot has none for its next frame.
        let held: Vec<Slot> = std::iter::from_fn(|| slots.take()).collect();
        assert_eq!((held.len(), slots.free()), (per, 0));
        drop(placed);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn whisper_windows_wait_for_company_only_as_long_as_allowed() {
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 1..4 {
            tx.send(i).unwrap();
        }
        // No wait: what is queued now, nothing more.
        assert_eq!(gather(&rx, 0, Duration::ZERO, 8), vec![0, 1, 2, 3]);
        // A window sent while the first waits joins it; with `most` reached the wait ends
        // at once (not after its 60 s).
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            tx.send(5).unwrap();
            tx
        });
        let t = Instant::now();
        assert_eq!(gather(&rx, 4, Duration::from_secs(60), 2), vec![4, 5]);
        assert!(t.elapsed() < Duration::from_secs(30));
        // Nothing comes: back after the wait, alone.
        let _tx = late.join().unwrap();
        assert_eq!(gather(&rx, 6, Duration::from_millis(20), 8), vec![6]);
    }

    #[test]
    fn whisper_rows_read_back_alone_stack_like_the_whole_states() {
        // Five states [1, 6, 2]: value = 100 * state + 10 * row + channel.
        let whole: Vec<(String, Tensor)> = (0..STATES)
            .map(|s| {
                let data = (0..6)
                    .flat_map(|r| (0..2).map(move |c| (100 * s + 10 * r + c) as f32))
                    .collect();
                (
                    format!("hidden_state_{s}"),
                    Tensor::new(vec![1, 6, 2], data),
                )
            })
            .collect();
        let from_whole = stacked(whole.clone(), 2, 3).unwrap();
        let parts: Vec<(String, Tensor)> = whole
            .iter()
            .rev()
            .map(|(n, t)| {
                (
                    n.clone(),
                    Tensor::new(vec![1, 3, 2], t.data[4..10].to_vec()),
                )
            })
            .collect();
        let from_parts = stacked(parts, 0, 3).unwrap();
        assert_eq!(from_whole, from_parts);
        assert_eq!(from_whole.shape, vec![3, STATES, 2]);
        // Row 2, state 1, channel 1.
        assert_eq!(from_whole.data[2 + 1], 121.0);
    }
}
