//! PyTorch checkpoints (`torch.save` since 1.6): a zip with `<name>/data.pkl` (the pickled
//! state_dict, tensors as persistent storage references) and one `<name>/data/<key>` record per
//! storage. MuseTalk's `unet.pth` and MTCNN's `pnet.pt` are this format.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use zip::ZipArchive;

use crate::error::{EngineError, Result};
use crate::tensor::{numel, strides, Tensor};
use crate::weights::pickle::{self, Val};
use crate::weights::{DType, Entry};

/// Where a legacy file keeps one storage's elements.
#[derive(Clone, Copy, Debug)]
pub struct LegacyStorage {
    pub data_start: u64,
    pub numel: usize,
}

/// Magic number at the start of pre-1.6 `torch.save` files (0x1950a86a20f9469cfc6c, little-endian).
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// Indexes a legacy (pre-1.6, non-zip) torch file: five pickles — magic number, protocol
/// version, system info, the object, the storage keys — then each storage as an 8-byte element
/// count and its raw little-endian elements. facenet-pytorch's MTCNN weights are this format.
pub fn legacy_index(
    path: &Path,
    bytes: &[u8],
) -> Result<(BTreeMap<String, Entry>, BTreeMap<String, LegacyStorage>)> {
    let bad = |what: String| EngineError::format(path, what);
    let mut pos = 0;
    let mut next = |what: &str| -> Result<Val> {
        let (v, n) =
            pickle::parse_prefix(&bytes[pos..]).map_err(|e| bad(format!("{what}: {e}")))?;
        pos += n;
        Ok(v)
    };
    match next("magic number")? {
        Val::Long(m) if m == LEGACY_MAGIC => {}
        _ => return Err(bad("not a torch.save file (no magic number)".into())),
    }
    next("protocol version")?;
    next("system info")?;
    let root = next("state dict")?;
    let keys = match next("storage keys")? {
        Val::List(keys) => keys,
        other => return Err(bad(format!("storage key list is {other:?}"))),
    };
    let mut entries = BTreeMap::new();
    flatten(path, "", &root, &mut entries)?;
    let mut storages = BTreeMap::new();
    for key in keys {
        let Val::Str(key) = key else {
            return Err(bad("a storage key is not a string".into()));
        };
        let size = entries
            .values()
            .find(|e| e.storage.as_ref().is_some_and(|s| s.record == key))
            .and_then(|e| e.dtype.size())
            .unwrap_or(4);
        let header = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| bad(format!("storage {key}: truncated")))?;
        let numel = u64::from_le_bytes(header.try_into().unwrap_or([0; 8])) as usize;
        let data_start = pos + 8;
        pos = data_start
            .checked_add(numel.saturating_mul(size))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| {
                bad(format!(
                    "storage {key}: {numel} elements run past the end (truncated?)"
                ))
            })?;
        storages.insert(
            key,
            LegacyStorage {
                data_start: data_start as u64,
                numel,
            },
        );
    }
    for (name, e) in &entries {
        let record = e
            .storage
            .as_ref()
            .map(|s| s.record.as_str())
            .unwrap_or_default();
        if !storages.contains_key(record) {
            return Err(bad(format!(
                "tensor {name} refers to storage {record}, which the file lacks"
            )));
        }
    }
    Ok((entries, storages))
}

/// Gathers a (possibly strided) view out of a whole storage's elements.
fn gather(
    path: &Path,
    key: &str,
    all: &[f32],
    shape: &[usize],
    view: &StorageView,
) -> Result<Vec<f32>> {
    let n = numel(shape);
    let contiguous = strides(shape);
    let truncated = || {
        EngineError::format(
            path,
            format!("{key}: storage holds {} elements, too few", all.len()),
        )
    };
    if view.stride == contiguous || n <= 1 {
        return all
            .get(view.offset..view.offset + n)
            .map(<[f32]>::to_vec)
            .ok_or_else(truncated);
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (mut src, mut rem) = (view.offset, i);
        for (d, cs) in contiguous.iter().enumerate() {
            src += (rem / cs) * view.stride[d];
            rem %= cs;
        }
        out.push(*all.get(src).ok_or_else(truncated)?);
    }
    Ok(out)
}

/// Reads one tensor of a legacy file.
pub fn legacy_load(
    path: &Path,
    bytes: &[u8],
    storage: LegacyStorage,
    key: &str,
    entry: &Entry,
) -> Result<Vec<f32>> {
    let unsupported = || EngineError::UnsupportedDType {
        key: key.into(),
        dtype: entry.dtype.to_string(),
    };
    let size = entry.dtype.size().ok_or_else(unsupported)?;
    let start = storage.data_start as usize;
    let raw = &bytes[start..start + storage.numel * size];
    let all = entry.dtype.decode(raw).ok_or_else(unsupported)?;
    let view = entry
        .storage
        .as_ref()
        .ok_or_else(|| EngineError::MissingWeight { key: key.into() })?;
    gather(path, key, &all, &entry.shape, view)
}

/// Which storage record a tensor views, and how.
#[derive(Clone, Debug)]
pub struct StorageView {
    pub record: String,
    pub offset: usize,
    pub stride: Vec<usize>,
}

/// An opened torch zip checkpoint.
pub struct Archive {
    path: PathBuf,
    zip: ZipArchive<File>,
    /// The archive's top folder, e.g. `unet/` or `archive/`.
    prefix: String,
}

fn dtype_of_storage(kind: &str) -> DType {
    match kind {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        other => DType::Other(other.trim_end_matches("Storage").to_string()),
    }
}

impl Archive {
    pub fn open(path: &Path, file: File) -> Result<Self> {
        let zip = ZipArchive::new(file)
            .map_err(|e| EngineError::format(path, format!("not a readable zip: {e}")))?;
        let pkl = zip
            .file_names()
            .filter_map(|n| n.ok())
            .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
            .map(|n| n.into_owned())
            .ok_or_else(|| {
                EngineError::format(
                    path,
                    "a zip without <name>/data.pkl: not a torch.save checkpoint",
                )
            })?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        Ok(Archive {
            path: path.to_path_buf(),
            zip,
            prefix,
        })
    }

    fn read_record(&mut self, name: &str) -> Result<Vec<u8>> {
        let full = format!("{}{name}", self.prefix);
        let mut f = self
            .zip
            .by_name(&full)
            .map_err(|e| EngineError::format(&self.path, format!("record {full}: {e}")))?;
        let mut out = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut out).map_err(|e| {
            EngineError::format(&self.path, format!("record {full}: {e} (truncated?)"))
        })?;
        Ok(out)
    }

    /// Every tensor of the pickled state_dict (nested dicts are flattened with dots).
    pub fn index(&mut self) -> Result<BTreeMap<String, Entry>> {
        let pkl = self.read_record("data.pkl")?;
        let root = pickle::parse(&pkl)
            .map_err(|e| EngineError::format(&self.path, format!("data.pkl: {e}")))?;
        let mut entries = BTreeMap::new();
        flatten(&self.path, "", &root, &mut entries)?;
        if entries.is_empty() {
            return Err(EngineError::format(
                &self.path,
                "the checkpoint holds no tensors",
            ));
        }
        for e in entries.values_mut() {
            if let Some(s) = &mut e.storage {
                s.record = format!("data/{}", s.record);
            }
        }
        Ok(entries)
    }

    /// Reads one tensor's elements (in logical order) as f32.
    pub fn load(&mut self, key: &str, entry: &Entry) -> Result<Vec<f32>> {
        let view = entry
            .storage
            .as_ref()
            .ok_or_else(|| EngineError::MissingWeight { key: key.into() })?;
        let unsupported = || EngineError::UnsupportedDType {
            key: key.into(),
            dtype: entry.dtype.to_string(),
        };
        let bytes = self.read_record(&view.record)?;
        let all = entry.dtype.decode(&bytes).ok_or_else(unsupported)?;
        gather(&self.path, key, &all, &entry.shape, view)
    }
}

/// Collects every tensor of a pickled state_dict (nested dicts are flattened with dots).
fn flatten(path: &Path, prefix: &str, v: &Val, out: &mut BTreeMap<String, Entry>) -> Result<()> {
    match v {
        Val::Dict(items) => {
            for (k, v) in items {
                let Val::Str(k) = k else { continue };
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(path, &key, v, out)?;
            }
        }
        Val::Tensor {
            storage,
            offset,
            shape,
            stride,
        } => {
            let Val::Storage {
                kind,
                key,
                numel: storage_numel,
            } = storage.as_ref()
            else {
                return Err(EngineError::format(
                    path,
                    format!("tensor {prefix} has no storage"),
                ));
            };
            let dtype = dtype_of_storage(kind);
            let span = shape
                .iter()
                .zip(stride)
                .map(|(d, s)| d.saturating_sub(1) * s)
                .sum::<usize>()
                + 1;
            if numel(shape) > 0 && offset + span > *storage_numel {
                return Err(EngineError::format(
                    path,
                    format!("tensor {prefix} reaches past its storage"),
                ));
            }
            let size = dtype.size().unwrap_or(1) as u64;
            out.insert(
                prefix.to_string(),
                Entry {
                    dtype,
                    shape: shape.clone(),
                    offset: *offset as u64 * size,
                    bytes: numel(shape) as u64 * size,
                    storage: Some(StorageView {
                        record: key.clone(),
                        offset: *offset,
                        stride: stride.clone(),
                    }),
                },
            );
        }
        // Non-tensor entries (metadata, step counters) are not weights.
        _ => {}
    }
    Ok(())
}

/// Writes f32 tensors the way `torch.save(state_dict)` does (an OrderedDict of contiguous
/// tensors, one storage each), so `torch.load` and our reader both take it.
pub fn write(path: &Path, name: &str, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let io = |e: std::io::Error| EngineError::io(path, e);
    let zerr = |e: zip::result::ZipError| EngineError::format(path, e.to_string());
    let file = File::create(path).map_err(io)?;
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    zip.start_file(format!("{name}/data.pkl"), opts)
        .map_err(zerr)?;
    zip.write_all(&state_dict_pickle(tensors)).map_err(io)?;
    zip.start_file(format!("{name}/byteorder"), opts)
        .map_err(zerr)?;
    zip.write_all(b"little").map_err(io)?;
    for (i, t) in tensors.values().enumerate() {
        zip.start_file(format!("{name}/data/{i}"), opts)
            .map_err(zerr)?;
        zip.write_all(&DType::F32.encode(&t.data)).map_err(io)?;
    }
    zip.start_file(format!("{name}/version"), opts)
        .map_err(zerr)?;
    zip.write_all(b"3\n").map_err(io)?;
    zip.finish().map_err(zerr)?;
    Ok(())
}

/// Protocol-2 pickle of `OrderedDict(key -> _rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict()))`.
fn state_dict_pickle(tensors: &BTreeMap<String, Tensor>) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    let global = |p: &mut Vec<u8>, module: &str, name: &str| {
        p.push(b'c');
        p.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    };
    let string = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    };
    let int = |p: &mut Vec<u8>, v: usize| {
        p.push(b'J');
        p.extend_from_slice(&(v as i32).to_le_bytes());
    };
    let tuple = |p: &mut Vec<u8>, vals: &[usize]| {
        p.push(b'(');
        for v in vals {
            p.push(b'J');
            p.extend_from_slice(&(*v as i32).to_le_bytes());
        }
        p.push(b't');
    };
    global(&mut p, "collections", "OrderedDict");
    p.extend_from_slice(b")R(");
    for (i, (key, t)) in tensors.iter().enumerate() {
        string(&mut p, key);
        global(&mut p, "torch._utils", "_rebuild_tensor_v2");
        p.push(b'(');
        // Persistent id: ('storage', torch.FloatStorage, key, 'cpu', numel).
        p.push(b'(');
        string(&mut p, "storage");
        global(&mut p, "torch", "FloatStorage");
        string(&mut p, &i.to_string());
        string(&mut p, "cpu");
        int(&mut p, t.numel());
        p.extend_from_slice(b"tQ");
        int(&mut p, 0);
        tuple(&mut p, &t.shape);
        tuple(&mut p, &strides(&t.shape));
        p.push(0x89); // requires_grad = False
        global(&mut p, "collections", "OrderedDict");
        p.extend_from_slice(b")R");
        p.extend_from_slice(b"tR");
    }
    p.extend_from_slice(b"u.");
    p
}
