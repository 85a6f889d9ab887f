//! Model configs, read from the upstream JSON files with defaults equal to them.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Reads a JSON config; unknown keys are ignored (upstream files carry many we do not need).
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::Config {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// diffusers `UNet2DConditionModel` as MuseTalk 1.5's `musetalkV15/musetalk.json` configures it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    /// diffusers' legacy name: for this model it is the number of heads in every block.
    pub attention_head_dim: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f32,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub downsample_padding: usize,
    pub use_linear_projection: bool,
    pub sample_size: usize,
}

impl Default for UNetConfig {
    fn default() -> Self {
        UNetConfig {
            in_channels: 8,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            attention_head_dim: 8,
            cross_attention_dim: 384,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [["CrossAttnDownBlock2D"; 3].as_slice(), &["DownBlock2D"]]
                .concat()
                .into_iter()
                .map(String::from)
                .collect(),
            up_block_types: [["UpBlock2D"].as_slice(), &["CrossAttnUpBlock2D"; 3]]
                .concat()
                .into_iter()
                .map(String::from)
                .collect(),
            downsample_padding: 1,
            use_linear_projection: false,
            sample_size: 64,
        }
    }
}

/// diffusers `AutoencoderKL` as `stabilityai/sd-vae-ft-mse/config.json` configures it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f32,
    pub sample_size: usize,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            sample_size: 256,
        }
    }
}

/// transformers `WhisperConfig` as `openai/whisper-tiny/config.json` sets the encoder.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct WhisperConfig {
    pub d_model: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub num_mel_bins: usize,
    pub max_source_positions: usize,
}

impl Default for WhisperConfig {
    fn default() -> Self {
        WhisperConfig {
            d_model: 384,
            encoder_layers: 4,
            encoder_attention_heads: 6,
            encoder_ffn_dim: 1536,
            num_mel_bins: 80,
            max_source_positions: 1500,
        }
    }
}
