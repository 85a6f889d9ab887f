//! Model sets by name, and `models synth`: random-weight checkpoints in the upstream layout.
//!
//! The layout is MuseTalk's `models/` folder:
//! `musetalkV15/{musetalk.json, unet.pth}`, `sd-vae/{config.json, diffusion_pytorch_model.safetensors}`,
//! `whisper/{config.json, model.safetensors}`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use crate::error::{EngineError, Result};
use crate::models::config::{UNetConfig, VaeConfig, WhisperConfig};
use crate::models::{unet, vae, whisper};
use crate::tensor::Tensor;
use crate::weights::{safetensors, torch, DType, Weights};

/// A named model set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The real sizes: MuseTalk 1.5 UNet, sd-vae-ft-mse, whisper-tiny.
    MuseTalk15,
    /// Same structure and pipeline shapes with few channels, for fast tests.
    Tiny,
}

impl std::str::FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "musetalk-1.5" => Ok(Preset::MuseTalk15),
            "tiny" => Ok(Preset::Tiny),
            other => Err(format!(
                "unknown preset {other:?}; choose musetalk-1.5 or tiny"
            )),
        }
    }
}

/// The configs of one model set.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSet {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub whisper: WhisperConfig,
}

impl Preset {
    pub fn configs(self) -> ModelSet {
        match self {
            Preset::MuseTalk15 => ModelSet {
                unet: UNetConfig::default(),
                vae: VaeConfig::default(),
                whisper: WhisperConfig::default(),
            },
            // Keep in step with scripts/reference/make_fixtures.py.
            Preset::Tiny => ModelSet {
                unet: UNetConfig {
                    block_out_channels: vec![16, 32, 32, 32],
                    attention_head_dim: 2,
                    cross_attention_dim: 16,
                    norm_num_groups: 8,
                    sample_size: 32,
                    ..UNetConfig::default()
                },
                vae: VaeConfig {
                    block_out_channels: vec![16, 32, 32, 32],
                    norm_num_groups: 8,
                    ..VaeConfig::default()
                },
                whisper: WhisperConfig {
                    d_model: 16,
                    encoder_attention_heads: 2,
                    encoder_ffn_dim: 32,
                    ..WhisperConfig::default()
                },
            },
        }
    }
}

/// Writes random weights for `preset` under `out`; `progress` hears each file as it is written.
pub fn synth(preset: Preset, seed: u64, out: &Path, mut progress: impl FnMut(&Path)) -> Result<()> {
    let set = preset.configs();
    let mkdir = |d: &Path| std::fs::create_dir_all(d).map_err(|e| EngineError::io(d, e));
    let write_json = |path: &Path, v: serde_json::Value| {
        let text = serde_json::to_string_pretty(&v)
            .map_err(|e| EngineError::format(path, e.to_string()))?;
        std::fs::write(path, text).map_err(|e| EngineError::io(path, e))
    };

    let dir = out.join("musetalkV15");
    mkdir(&dir)?;
    let w = Weights::synth(seed);
    unet::build(&w.root(""), &set.unet, 1, set.unet.sample_size)?;
    let mut cfg =
        serde_json::to_value(&set.unet).map_err(|e| EngineError::format(&dir, e.to_string()))?;
    merge(
        &mut cfg,
        json!({ "_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": false }),
    );
    write_json(&dir.join("musetalk.json"), cfg)?;
    progress(&dir.join("musetalk.json"));
    torch::write(&dir.join("unet.pth"), "unet", &w.into_made())?;
    progress(&dir.join("unet.pth"));

    let dir = out.join("sd-vae");
    mkdir(&dir)?;
    let w = Weights::synth(seed.wrapping_add(1));
    vae::build_encoder(&w.root(""), &set.vae, 1, 64)?;
    vae::build_decoder(&w.root(""), &set.vae, 1, 8)?;
    let mut cfg =
        serde_json::to_value(&set.vae).map_err(|e| EngineError::format(&dir, e.to_string()))?;
    merge(
        &mut cfg,
        json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "down_block_types": vec!["DownEncoderBlock2D"; 4],
            "up_block_types": vec!["UpDecoderBlock2D"; 4],
        }),
    );
    write_json(&dir.join("config.json"), cfg)?;
    progress(&dir.join("config.json"));
    safetensors::write(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &w.into_made(),
        DType::F32,
    )?;
    progress(&dir.join("diffusion_pytorch_model.safetensors"));

    let dir = out.join("whisper");
    mkdir(&dir)?;
    let w = Weights::synth(seed.wrapping_add(2));
    whisper::build(&w.root("model.encoder"), &set.whisper, 1)?;
    let mut cfg =
        serde_json::to_value(&set.whisper).map_err(|e| EngineError::format(&dir, e.to_string()))?;
    merge(
        &mut cfg,
        json!({ "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"] }),
    );
    write_json(&dir.join("config.json"), cfg)?;
    progress(&dir.join("config.json"));
    let made: BTreeMap<String, Tensor> = w.into_made();
    safetensors::write(&dir.join("model.safetensors"), &made, DType::F32)?;
    progress(&dir.join("model.safetensors"));
    Ok(())
}

fn merge(into: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (into.as_object_mut(), extra) {
        a.extend(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::config;

    #[test]
    fn tiny_matches_the_golden_fixture_configs() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny");
        let set = Preset::Tiny.configs();
        let unet: UNetConfig = config::read(&dir.join("musetalkV15/musetalk.json")).unwrap();
        let vae: VaeConfig = config::read(&dir.join("sd-vae/config.json")).unwrap();
        let whisper: WhisperConfig = config::read(&dir.join("whisper/config.json")).unwrap();
        assert_eq!(unet, set.unet);
        assert_eq!(
            vae,
            VaeConfig {
                sample_size: vae.sample_size,
                ..set.vae
            }
        );
        assert_eq!(whisper, set.whisper);
    }
}
