//! The engines crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong building graphs, loading weights or running them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// An op got inputs whose shapes it cannot combine (a model-building bug or a wrong config).
    #[error("node {node} ({op}): {reason}")]
    Shape {
        node: String,
        op: &'static str,
        reason: String,
    },
    /// The checkpoint lacks a key the model needs.
    #[error("weight {key} is missing from the checkpoint")]
    MissingWeight { key: String },
    /// The checkpoint has the key with another shape (usually another model size or config).
    #[error("weight {key} has shape {got:?}, the model expects {expected:?}")]
    WeightShape {
        key: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// The checkpoint has keys the model does not use (another architecture or config).
    #[error("the checkpoint has {count} weights the model does not use, e.g. {first}")]
    UnexpectedWeights { count: usize, first: String },
    /// A weight's element type is not one we read.
    #[error("weight {key} has element type {dtype}; lipstream reads f32, f16 and bf16")]
    UnsupportedDType { key: String, dtype: String },
    /// A file is truncated, corrupt or not the format its name says.
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A model config file is unreadable or describes something we do not build.
    #[error("config {}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    /// A run was given an input of the wrong name or shape.
    #[error("input {name}: expected shape {expected:?}, got {got:?}")]
    Input {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A picture given to make an avatar from shows no face the detector trusts.
    #[error(
        "avatar frame {frame} (at {seconds:.2} s): no face found (MTCNN score >= 0.9); every frame needs the face in view"
    )]
    NoFace { frame: usize, seconds: f64 },
    /// A model run on another executor (the CUDA engine) failed.
    #[error("executor: {0}")]
    Executor(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        EngineError::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
}
