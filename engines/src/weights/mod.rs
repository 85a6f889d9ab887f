//! Checkpoints: `.safetensors` and PyTorch `.pth/.pt/.bin`, read tensor by tensor into f32, and the
//! key-checked view model builders take weights through.
//!
//! A model asks for `prefix.name` with the shape it expects; a missing key or a different shape is
//! an error naming the key (and both shapes). After building, any key the model did not take is
//! reported too, so a checkpoint of another architecture never half-loads.

pub mod pickle;
pub mod safetensors;
pub mod torch;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};
use crate::tensor::Tensor;

/// Element types found in checkpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    /// Anything else (ints, bools): listed, but not loadable as a weight.
    Other(String),
}

impl DType {
    pub fn size(&self) -> Option<usize> {
        match self {
            DType::F32 => Some(4),
            DType::F16 | DType::BF16 => Some(2),
            DType::F64 => Some(8),
            DType::Other(_) => None,
        }
    }

    pub fn safetensors_name(&self) -> &str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
            DType::Other(s) => s,
        }
    }

    /// Little-endian bytes of `data` in this type.
    pub fn encode(&self, data: &[f32]) -> Vec<u8> {
        match self {
            DType::F16 => data
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            DType::BF16 => data
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            DType::F64 => data
                .iter()
                .flat_map(|v| f64::from(*v).to_le_bytes())
                .collect(),
            _ => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    fn decode(&self, bytes: &[u8]) -> Option<Vec<f32>> {
        Some(match self {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::F64 => bytes
                .chunks_exact(8)
                .map(|b| {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
            DType::Other(_) => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// Where one tensor's bytes are.
#[derive(Clone, Debug)]
pub struct Entry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte offset in the file (safetensors) or in the storage record (torch).
    pub offset: u64,
    pub bytes: u64,
    /// torch: the storage record and the view's element strides.
    pub storage: Option<torch::StorageView>,
}

enum Source {
    Safetensors(File),
    Torch(torch::Archive),
    /// Pre-1.6 torch files are small in practice (MTCNN): held whole.
    TorchLegacy {
        bytes: Vec<u8>,
        storages: BTreeMap<String, torch::LegacyStorage>,
    },
}

/// Legacy torch files larger than this are refused rather than read into memory.
const LEGACY_MAX_BYTES: u64 = 1 << 30;

/// An opened checkpoint: the index of its tensors, loaded on demand.
pub struct Checkpoint {
    path: PathBuf,
    entries: BTreeMap<String, Entry>,
    source: RefCell<Source>,
}

impl Checkpoint {
    /// Opens by content, not by extension: a zip is a torch checkpoint, anything else safetensors.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let mut magic = [0u8; 4];
        let is_zip = file.read_exact_at(&mut magic, 0).is_ok() && magic == *b"PK\x03\x04";
        let (entries, source) = if is_zip {
            let mut archive = torch::Archive::open(path, file)?;
            (archive.index()?, Source::Torch(archive))
        } else if path
            .extension()
            .is_some_and(|e| e == "pth" || e == "pt" || e == "bin")
        {
            let len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
            if len > LEGACY_MAX_BYTES {
                return Err(EngineError::format(
                    path,
                    "a legacy (pre-1.6) torch file over 1 GiB; re-save it with a current torch.save",
                ));
            }
            let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
            if bytes.first() != Some(&0x80) {
                return Err(EngineError::format(
                    path,
                    "not a zip archive (torch >= 1.6) nor a pickle (older torch.save): not a PyTorch checkpoint",
                ));
            }
            let (entries, storages) = torch::legacy_index(path, &bytes)?;
            (entries, Source::TorchLegacy { bytes, storages })
        } else {
            (
                safetensors::read_index(path, &file)?,
                Source::Safetensors(file),
            )
        };
        Ok(Checkpoint {
            path: path.to_path_buf(),
            entries,
            source: RefCell::new(source),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Reads one `U8` entry of a safetensors file as bytes (see `safetensors::write_with_blobs`).
    pub fn bytes(&self, key: &str) -> Result<Vec<u8>> {
        let entry = self
            .entries
            .get(key)
            .ok_or_else(|| EngineError::MissingWeight { key: key.into() })?;
        let Source::Safetensors(file) = &*self.source.borrow() else {
            return Err(EngineError::format(
                &self.path,
                "byte entries live in safetensors files",
            ));
        };
        if entry.dtype != DType::Other("U8".into()) {
            return Err(EngineError::UnsupportedDType {
                key: key.into(),
                dtype: format!("{} (expected U8 bytes)", entry.dtype),
            });
        }
        let mut bytes = vec![0u8; entry.bytes as usize];
        file.read_exact_at(&mut bytes, entry.offset)
            .map_err(|e| EngineError::io(&self.path, e))?;
        Ok(bytes)
    }

    /// Reads one tensor as f32.
    pub fn load(&self, key: &str) -> Result<Tensor> {
        let entry = self
            .entries
            .get(key)
            .ok_or_else(|| EngineError::MissingWeight { key: key.into() })?;
        let unsupported = || EngineError::UnsupportedDType {
            key: key.into(),
            dtype: entry.dtype.to_string(),
        };
        entry.dtype.size().ok_or_else(unsupported)?;
        let data = match &mut *self.source.borrow_mut() {
            Source::Safetensors(file) => {
                let mut bytes = vec![0u8; entry.bytes as usize];
                file.read_exact_at(&mut bytes, entry.offset)
                    .map_err(|e| EngineError::io(&self.path, e))?;
                entry.dtype.decode(&bytes).ok_or_else(unsupported)?
            }
            Source::Torch(archive) => archive.load(key, entry)?,
            Source::TorchLegacy { bytes, storages } => {
                let record = entry
                    .storage
                    .as_ref()
                    .map(|s| s.record.as_str())
                    .unwrap_or_default();
                let storage = storages
                    .get(record)
                    .copied()
                    .ok_or_else(|| EngineError::MissingWeight { key: key.into() })?;
                torch::legacy_load(&self.path, bytes, storage, key, entry)?
            }
        };
        Ok(Tensor::new(entry.shape.clone(), data))
    }
}

enum Store {
    File(Checkpoint),
    /// Every tensor read up front: for small models built many times (MTCNN at each size).
    Memory(BTreeMap<String, Tensor>),
    /// Random weights made on request, recorded so they can be written out as a checkpoint.
    Synth(Box<SynthStore>),
}

struct SynthStore {
    rng: RefCell<rand::rngs::StdRng>,
    made: RefCell<BTreeMap<String, Tensor>>,
}

/// The weights a model is built from, with every access checked and recorded.
pub struct Weights {
    store: Store,
    used: RefCell<BTreeSet<String>>,
}

impl Weights {
    pub fn new(checkpoint: Checkpoint) -> Self {
        Weights {
            store: Store::File(checkpoint),
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// Random weights, deterministic for a seed: whatever the model asks for is made with a
    /// scale that keeps activations in range (fan-in scaled weights, norms near 1).
    pub fn synth(seed: u64) -> Self {
        use rand::SeedableRng;
        let store = Store::Synth(Box::new(SynthStore {
            rng: RefCell::new(rand::rngs::StdRng::seed_from_u64(seed)),
            made: RefCell::new(BTreeMap::new()),
        }));
        Weights {
            store,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// The tensors made so far by a synth store (empty for a file store).
    pub fn into_made(self) -> BTreeMap<String, Tensor> {
        match self.store {
            Store::Synth(synth) => synth.made.into_inner(),
            Store::File(_) | Store::Memory(_) => BTreeMap::new(),
        }
    }

    /// Reads every tensor of a checkpoint into memory now.
    pub fn load_all(path: &Path) -> Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let tensors = checkpoint
            .keys()
            .map(|k| Ok((k.clone(), checkpoint.load(k)?)))
            .collect::<Result<_>>()?;
        Ok(Weights {
            store: Store::Memory(tensors),
            used: RefCell::new(BTreeSet::new()),
        })
    }

    fn checkpoint(&self) -> Option<&Checkpoint> {
        match &self.store {
            Store::File(c) => Some(c),
            Store::Memory(_) | Store::Synth(_) => None,
        }
    }

    fn keys(&self) -> Vec<String> {
        match &self.store {
            Store::File(c) => c.keys().cloned().collect(),
            Store::Memory(m) => m.keys().cloned().collect(),
            Store::Synth(_) => Vec::new(),
        }
    }

    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self::new(Checkpoint::open(path)?))
    }

    /// A view under `prefix` (e.g. `model.encoder.`).
    pub fn root(&self, prefix: &str) -> Vb<'_> {
        Vb {
            weights: self,
            prefix: prefix.trim_end_matches('.').to_string(),
        }
    }

    /// Tensors already in memory (e.g. read from an engine file).
    pub fn from_tensors(tensors: BTreeMap<String, Tensor>) -> Self {
        Weights {
            store: Store::Memory(tensors),
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// Every tensor a model has taken so far, loaded again: what an engine file must carry.
    pub fn used_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let used = self.used.borrow();
        used.iter()
            .map(|key| {
                let t = match &self.store {
                    Store::File(c) => c.load(key)?,
                    Store::Memory(m) => m
                        .get(key)
                        .cloned()
                        .ok_or_else(|| EngineError::MissingWeight { key: key.clone() })?,
                    Store::Synth(s) => s
                        .made
                        .borrow()
                        .get(key)
                        .cloned()
                        .ok_or_else(|| EngineError::MissingWeight { key: key.clone() })?,
                };
                Ok((key.clone(), t))
            })
            .collect()
    }

    /// Errors if the checkpoint holds keys no model part took (under `prefix`).
    pub fn finish(&self, prefix: &str) -> Result<()> {
        let used = self.used.borrow();
        let keys = self.keys();
        let unused: Vec<&String> = keys
            .iter()
            .filter(|k| k.starts_with(prefix) && !used.contains(*k))
            .collect();
        match unused.first() {
            None => Ok(()),
            Some(first) => Err(EngineError::UnexpectedWeights {
                count: unused.len(),
                first: (*first).clone(),
            }),
        }
    }
}

/// One random weight, scaled by what the key names: norms near 1, biases small, PReLU slopes
/// near 0.25, everything else N(0, 1/fan_in).
fn random_weight(key: &str, shape: &[usize], rng: &mut rand::rngs::StdRng) -> Tensor {
    use rand::Rng;
    let n: usize = shape.iter().product();
    let mut normal = || {
        // Box-Muller: two uniforms make one standard normal.
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random::<f64>());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    };
    let leaf = key.rsplit('.').nth(1).unwrap_or("");
    let is_bias = key.ends_with(".bias");
    let data: Vec<f32> =
        if shape.len() == 1 && !is_bias && (leaf.contains("norm") || leaf.starts_with("ln")) {
            (0..n).map(|_| 1.0 + 0.1 * normal()).collect()
        } else if leaf.starts_with("prelu") {
            (0..n).map(|_| 0.25 + 0.05 * normal()).collect()
        } else if is_bias || shape.len() == 1 {
            (0..n).map(|_| 0.05 * normal()).collect()
        } else {
            let fan_in = (n / shape[0].max(1)).max(1) as f32;
            let std = fan_in.sqrt().recip();
            (0..n).map(|_| std * normal()).collect()
        };
    Tensor::new(shape.to_vec(), data)
}

/// A prefix into `Weights`, mirroring the checkpoint's key hierarchy (`vb.pp("down_blocks.0")`).
#[derive(Clone)]
pub struct Vb<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl<'a> Vb<'a> {
    /// The view one level down.
    pub fn pp(&self, name: impl std::fmt::Display) -> Vb<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Vb {
            weights: self.weights,
            prefix,
        }
    }

    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights
            .checkpoint()
            .is_some_and(|c| c.entry(&self.key(name)).is_some())
    }

    /// Loads `prefix.name`, which must have shape `expected`.
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let key = self.key(name);
        let t = match &self.weights.store {
            Store::File(checkpoint) => {
                let entry = checkpoint
                    .entry(&key)
                    .ok_or_else(|| EngineError::MissingWeight { key: key.clone() })?;
                if entry.shape != expected {
                    return Err(EngineError::WeightShape {
                        key,
                        expected: expected.to_vec(),
                        got: entry.shape.clone(),
                    });
                }
                checkpoint.load(&key)?
            }
            Store::Memory(m) => {
                let t = m
                    .get(&key)
                    .ok_or_else(|| EngineError::MissingWeight { key: key.clone() })?;
                if t.shape != expected {
                    return Err(EngineError::WeightShape {
                        key,
                        expected: expected.to_vec(),
                        got: t.shape.clone(),
                    });
                }
                t.clone()
            }
            Store::Synth(synth) => {
                // A key asked for again (a second graph of the same model) gets the same values.
                if let Some(t) = synth.made.borrow().get(&key) {
                    if t.shape != expected {
                        return Err(EngineError::WeightShape {
                            key,
                            expected: expected.to_vec(),
                            got: t.shape.clone(),
                        });
                    }
                    return Ok(t.clone());
                }
                let t = random_weight(&key, expected, &mut synth.rng.borrow_mut());
                synth.made.borrow_mut().insert(key.clone(), t.clone());
                t
            }
        };
        self.weights.used.borrow_mut().insert(key);
        Ok(t)
    }

    /// Like `get`, trying each alias in turn (old and new diffusers names of the same weight).
    pub fn get_any(&self, names: &[&str], expected: &[usize]) -> Result<Tensor> {
        let found = names.iter().find(|n| self.contains(n)).unwrap_or(&names[0]);
        self.get(found, expected)
    }
}
