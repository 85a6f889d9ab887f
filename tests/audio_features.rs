//! Audio features against their Python originals on a spoken sentence (espeak-ng): Whisper's
//! log-mel (transformers' WhisperFeatureExtractor) and MuseTalk 1.5's per-frame audio prompts
//! (its get_whisper_chunk slicing over the tiny whisper encoder's hidden states).

use std::path::{Path, PathBuf};

use lipstream_engines::audio::mel::{LogMel, FRAMES, N_MELS};
use lipstream_engines::audio::prompt::{frame_counts, frame_prompt, stack_states};
use lipstream_engines::models::config::{self, WhisperConfig};
use lipstream_engines::models::whisper;
use lipstream_engines::weights::{Checkpoint, Weights};
use lipstream_engines::{cpu, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn golden(key: &str) -> Tensor {
    Checkpoint::open(&fixtures().join("audio/audio.safetensors"))
        .unwrap()
        .load(key)
        .unwrap()
}

#[test]
fn log_mel_and_prompts_match_python() {
    let audio = golden("audio_16k");
    let mel = LogMel::new().window(&audio.data);
    assert_eq!(mel.shape, vec![N_MELS, FRAMES]);

    let want = golden("mel_first_400");
    let got: Vec<f32> = (0..N_MELS)
        .flat_map(|b| mel.data[b * FRAMES..b * FRAMES + 400].to_vec())
        .collect();
    let err = Tensor::new(vec![N_MELS, 400], got).rel_l2(&want);
    println!("golden log-mel (first 400 frames): relative L2 error {err:.2e}");
    assert!(err <= 1e-4, "{err:e}");
    let last: Vec<f32> = (0..N_MELS)
        .map(|b| mel.data[b * FRAMES + FRAMES - 1])
        .collect();
    let err = Tensor::new(vec![N_MELS], last).rel_l2(&golden("mel_last"));
    assert!(err <= 1e-4, "last frame: {err:e}");

    let cfg: WhisperConfig = config::read(&fixtures().join("tiny/whisper/config.json")).unwrap();
    let w = Weights::open(&fixtures().join("tiny/whisper/model.safetensors")).unwrap();
    let g = whisper::build(&w.root("model.encoder"), &cfg, 1).unwrap();
    let input = Tensor::new(vec![1, N_MELS, FRAMES], mel.data.clone());
    let states = cpu::run(&g, &[("input_features", &input)]).unwrap();
    let refs: Vec<&Tensor> = states.iter().map(|(_, t)| t).collect();
    let features = stack_states(&refs);
    let (frames, kept) = frame_counts(audio.numel());
    let features = Tensor::new(
        vec![kept, features.shape[1], features.shape[2]],
        features.data[..kept * features.shape[1] * features.shape[2]].to_vec(),
    );
    let want = golden("prompts");
    assert_eq!(want.shape[0], frames, "frame count");
    let got: Vec<f32> = (0..frames)
        .flat_map(|i| frame_prompt(&features, i).data)
        .collect();
    let err = Tensor::new(want.shape.clone(), got).rel_l2(&want);
    println!("golden audio prompts ({frames} frames): relative L2 error {err:.2e}");
    assert!(err <= 1e-4, "{err:e}");
}
