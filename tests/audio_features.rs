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

/// The streaming front end, fed the sentence in 20 ms packets: with the whole sentence in one
/// window it reproduces the Python prompts; live, one encode per second-long hop as soon as the
/// hop's audio is there, every frame still hears its full 120 ms lookahead, and the prompts stay
/// close to the whole-clip ones (whisper's attention sees less of the future).
#[test]
fn streamed_prompts_match_python_and_live_ones_stay_close() {
    use lipstream_engines::audio::stream::{rows, FeatureStream};
    let audio = golden("audio_16k");
    let cfg: WhisperConfig = config::read(&fixtures().join("tiny/whisper/config.json")).unwrap();
    let w = Weights::open(&fixtures().join("tiny/whisper/model.safetensors")).unwrap();
    let g = whisper::build(&w.root("model.encoder"), &cfg, 1).unwrap();
    let encode = |mel: &Tensor, range| -> lipstream_engines::Result<Tensor> {
        let states = cpu::run(&g, &[("input_features", mel)])?;
        let refs: Vec<&Tensor> = states.iter().map(|(_, t)| t).collect();
        Ok(rows(&stack_states(&refs), range))
    };
    let want = golden("prompts");
    let per = want.numel() / want.shape[0];
    let frames = (0..want.shape[0])
        .take_while(|&i| FeatureStream::needed(i) <= audio.numel())
        .count();
    assert!(frames > 50, "the sentence gives {frames} ready frames");
    let reference = Tensor::new(vec![frames, per], want.data[..frames * per].to_vec());

    let mut whole = FeatureStream::new(10_000);
    for chunk in audio.data.chunks(320) {
        whole.push(chunk);
    }
    assert!(
        !whole.ready(0),
        "the hop is not complete before the stream ends"
    );
    whole.finish();
    let got: Vec<f32> = (0..frames)
        .flat_map(|i| whole.prompt(i, encode).unwrap().expect("ready").data)
        .collect();
    let err = Tensor::new(vec![frames, per], got).rel_l2(&reference);
    println!("streamed prompts, one window ({frames} frames): relative L2 error {err:.2e}");
    assert!(err <= 1e-4, "{err:e}");
    assert_eq!(whole.encodes, 1);

    let mut live = FeatureStream::new(25);
    let mut got = Vec::new();
    let mut next = 0;
    for (i, chunk) in audio.data.chunks(320).enumerate() {
        live.push(chunk);
        if (i + 1) * 320 >= audio.numel() {
            live.finish();
        }
        while next < frames {
            match live.prompt(next, encode).unwrap() {
                Some(p) => got.extend(p.data),
                None => break,
            }
            next += 1;
        }
    }
    assert_eq!(next, frames);
    let err = Tensor::new(vec![frames, per], got).rel_l2(&reference);
    println!(
        "live prompts ({} encodes for {frames} frames): relative L2 error {err:.2e} against the whole-clip ones",
        live.encodes
    );
    assert_eq!(live.encodes, frames.div_ceil(25));
    assert!(err > 1e-6 && err < 0.1, "{err:e}");
}
