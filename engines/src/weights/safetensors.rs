//! `.safetensors`: an 8-byte header length, a JSON header, then raw little-endian tensor bytes.
//!
//! Read by positioned reads, one tensor at a time: a multi-GB checkpoint is never resident at
//! once, and no `unsafe` mmap is needed (this crate forbids `unsafe`). The format is small enough
//! that our ~80 lines beat pulling the `safetensors` crate, whose reader wants the whole buffer.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::weights::{DType, Entry};

/// Refuses headers larger than this: a corrupt length would otherwise allocate gigabytes.
const HEADER_MAX_BYTES: u64 = 100 << 20;

/// The JSON header, the file's length and where the tensor data starts.
fn read_header(path: &Path, file: &File) -> Result<(Value, u64, u64)> {
    let len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0)
        .map_err(|_| EngineError::format(path, "shorter than a safetensors header"))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > HEADER_MAX_BYTES || 8 + header_len > len {
        return Err(EngineError::format(
            path,
            format!("header length {header_len} does not fit the {len}-byte file"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| EngineError::io(path, e))?;
    let json: Value = serde_json::from_slice(&header)
        .map_err(|e| EngineError::format(path, format!("header is not JSON: {e}")))?;
    Ok((json, len, 8 + header_len))
}

/// Reads the header: every tensor's dtype, shape and absolute byte range.
pub fn read_index(path: &Path, file: &File) -> Result<BTreeMap<String, Entry>> {
    let (json, len, data_start) = read_header(path, file)?;
    let obj = json
        .as_object()
        .ok_or_else(|| EngineError::format(path, "header is not a JSON object"))?;
    let mut entries = BTreeMap::new();
    for (key, v) in obj {
        if key == "__metadata__" {
            continue;
        }
        let bad = |what: &str| EngineError::format(path, format!("tensor {key}: {what}"));
        let dtype_name = v["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
        let dtype = match dtype_name {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            other => DType::Other(other.to_string()),
        };
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of sizes"))?;
        let offsets = v["data_offsets"]
            .as_array()
            .ok_or_else(|| bad("no data_offsets"))?;
        let (begin, end) = match (
            offsets.first().and_then(Value::as_u64),
            offsets.get(1).and_then(Value::as_u64),
        ) {
            (Some(b), Some(e)) if b <= e => (b, e),
            _ => return Err(bad("data_offsets is not [begin, end]")),
        };
        let numel: usize = shape.iter().product();
        if let Some(size) = dtype.size().or((dtype_name == "U8").then_some(1)) {
            if (end - begin) as usize != numel * size {
                return Err(bad(&format!(
                    "{} bytes for shape {shape:?} of {dtype_name}",
                    end - begin
                )));
            }
        }
        if data_start + end > len {
            return Err(bad(&format!(
                "data runs past the end of the file ({len} bytes): truncated?"
            )));
        }
        entries.insert(
            key.clone(),
            Entry {
                dtype,
                shape,
                offset: data_start + begin,
                bytes: end - begin,
                storage: None,
            },
        );
    }
    Ok(entries)
}

/// Writes f32 tensors as a `.safetensors` file (keys sorted, as the reference writer does).
pub fn write(path: &Path, tensors: &BTreeMap<String, crate::Tensor>, dtype: DType) -> Result<()> {
    write_with_metadata(path, tensors, dtype, &BTreeMap::new())
}

/// The header's `__metadata__` (string to string), empty when there is none.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let (json, _, _) = read_header(path, &file)?;
    let Some(meta) = json.get("__metadata__") else {
        return Ok(BTreeMap::new());
    };
    serde_json::from_value(meta.clone())
        .map_err(|e| EngineError::format(path, format!("__metadata__ is not a string map: {e}")))
}

/// Like `write`, with a `__metadata__` map in the header.
pub fn write_with_metadata(
    path: &Path,
    tensors: &BTreeMap<String, crate::Tensor>,
    dtype: DType,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_with_blobs(path, tensors, dtype, metadata, &BTreeMap::new())
}

/// Raw bytes stored as a `U8` tensor: 1-d for byte strings (compiled kernels), or with a shape
/// (8-bit pictures, [N, H, W, 3]).
#[derive(Clone, Debug, PartialEq)]
pub struct Blob {
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl From<Vec<u8>> for Blob {
    fn from(bytes: Vec<u8>) -> Self {
        Blob {
            shape: vec![bytes.len()],
            bytes,
        }
    }
}

/// Like `write_with_metadata`, plus blobs stored as `U8` tensors after the tensors (compiled
/// kernels in an engine file, pictures in an avatar bundle); `Checkpoint::bytes` reads one back.
pub fn write_with_blobs(
    path: &Path,
    tensors: &BTreeMap<String, crate::Tensor>,
    dtype: DType,
    metadata: &BTreeMap<String, String>,
    blobs: &BTreeMap<String, Blob>,
) -> Result<()> {
    if let Some(key) = blobs.keys().find(|k| tensors.contains_key(*k)) {
        return Err(EngineError::format(
            path,
            format!("{key} is both a tensor and a blob"),
        ));
    }
    if let Some((key, b)) = blobs
        .iter()
        .find(|(_, b)| b.shape.iter().product::<usize>() != b.bytes.len())
    {
        return Err(EngineError::format(
            path,
            format!(
                "{key}: {} bytes are no {:?} U8 tensor",
                b.bytes.len(),
                b.shape
            ),
        ));
    }
    let size = dtype
        .size()
        .filter(|_| matches!(dtype, DType::F32 | DType::F16 | DType::BF16))
        .ok_or_else(|| {
            EngineError::format(path, "safetensors files are written as F32, F16 or BF16")
        })?;
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0usize;
    for (key, t) in tensors {
        let end = offset + t.numel() * size;
        header.insert(
            key.clone(),
            serde_json::json!({ "dtype": dtype.safetensors_name(), "shape": t.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    for (key, b) in blobs {
        let end = offset + b.bytes.len();
        header.insert(
            key.clone(),
            serde_json::json!({ "dtype": "U8", "shape": b.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| EngineError::format(path, e.to_string()))?;
    // Pad so the data starts 8-byte aligned, as the reference writer does.
    while (json.len() + 8) % 8 != 0 {
        json.push(b' ');
    }
    let mut f = std::io::BufWriter::new(File::create(path).map_err(|e| EngineError::io(path, e))?);
    let io = |e| EngineError::io(path, e);
    f.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(&json).map_err(io)?;
    for t in tensors.values() {
        f.write_all(&dtype.encode(&t.data)).map_err(io)?;
    }
    for b in blobs.values() {
        f.write_all(&b.bytes).map_err(io)?;
    }
    f.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Checkpoint;
    use crate::Tensor;

    #[test]
    fn every_float_type_round_trips() {
        let dir = std::env::temp_dir().join(format!("lipstream-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Values every type holds exactly.
        let t = Tensor::new(vec![2, 3], vec![1.0, -2.5, 0.375, 1024.0, -0.0078125, 3.0]);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let path = dir.join(format!("{dtype}.safetensors"));
            write(
                &path,
                &BTreeMap::from([("w".to_string(), t.clone())]),
                dtype.clone(),
            )
            .unwrap();
            let c = Checkpoint::open(&path).unwrap();
            assert_eq!(c.entry("w").unwrap().dtype, dtype);
            assert_eq!(c.load("w").unwrap(), t, "{dtype}");
        }
        let path = dir.join("meta.safetensors");
        let meta = BTreeMap::from([("engine".to_string(), "{\"a\": 1}".to_string())]);
        write_with_metadata(
            &path,
            &BTreeMap::from([("w".to_string(), t.clone())]),
            DType::F16,
            &meta,
        )
        .unwrap();
        assert_eq!(read_metadata(&path).unwrap(), meta);
        assert_eq!(Checkpoint::open(&path).unwrap().load("w").unwrap(), t);

        // Blobs come back byte for byte; they are not weights, and weights are not blobs.
        let path = dir.join("blobs.safetensors");
        let blob = vec![0x7f, b'E', b'L', b'F', 0, 255, 3];
        write_with_blobs(
            &path,
            &BTreeMap::from([("w".to_string(), t.clone())]),
            DType::F16,
            &meta,
            &BTreeMap::from([
                ("k".to_string(), Blob::from(blob.clone())),
                (
                    "pictures".to_string(),
                    Blob {
                        shape: vec![1, 2, 2, 3],
                        bytes: (0..12).collect(),
                    },
                ),
            ]),
        )
        .unwrap();
        let c = Checkpoint::open(&path).unwrap();
        assert_eq!(c.bytes("k").unwrap(), blob);
        assert_eq!(c.bytes("pictures").unwrap(), (0..12).collect::<Vec<u8>>());
        assert_eq!(c.entry("pictures").unwrap().shape, vec![1, 2, 2, 3]);
        let wrong = Blob {
            shape: vec![2, 2],
            bytes: vec![1, 2, 3],
        };
        let err = write_with_blobs(
            &dir.join("wrong.safetensors"),
            &BTreeMap::new(),
            DType::F32,
            &meta,
            &BTreeMap::from([("p".to_string(), wrong)]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("3 bytes are no [2, 2]"), "{err}");
        assert_eq!(c.load("w").unwrap(), t);
        assert!(c.load("k").is_err());
        assert!(c.bytes("w").unwrap_err().to_string().contains("U8"));
        assert!(c.bytes("nothing").is_err());
        assert!(read_metadata(&dir.join("F32.safetensors"))
            .unwrap()
            .is_empty());
    }
}
