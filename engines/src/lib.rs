//! lipstream-engines: the model side of lipstream — the op set and static graph IR, the MuseTalk
//! UNet / SD-VAE / whisper-tiny graphs, weight loaders for `.safetensors` and PyTorch `.pth`, and
//! the CPU reference executor.
//!
//! It never depends on `lipstream-gpu`: the GPU crate executes this crate's IR.
#![forbid(unsafe_code)]
// Graph builders mirror PyTorch module constructors (channels, kernel, stride, padding...).
#![allow(clippy::too_many_arguments)]

pub mod audio;
pub mod avatar;
pub mod cpu;
pub mod error;
pub mod face;
pub mod graph;
pub mod image;
pub mod models;
pub mod presets;
pub mod tensor;
pub mod weights;

pub use error::{EngineError, Result};
pub use graph::{Graph, Op, ValueId};
pub use tensor::Tensor;
