//! UMT5 text encoder and Wan prompt tokenizer parity with transformers / diffusers on a tiny
//! random model and a locally built T5-style `tokenizer.json`.

mod common;

use tch::{Device, Kind, Tensor};
use x2v_models::Error;
use x2v_models::wan::text_encoder::UMT5EncoderModel;
use x2v_models::wan::tokenizer::{T5Tokenizer, prompt_clean};

/// fp32 CPU; relative to max(1, max|reference|).
const TOL: f64 = 1e-4;

struct Prompts {
    prompts: Vec<String>,
    cleaned: Vec<String>,
    ids: Vec<Vec<i64>>,
    seq_lens: Vec<usize>,
}

fn prompts(dir: &std::path::Path) -> Prompts {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("prompts.json")).unwrap()).unwrap();
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
    };
    Prompts {
        prompts: strings("prompts"),
        cleaned: strings("cleaned"),
        ids: v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|i| i.as_i64().unwrap()).collect())
            .collect(),
        seq_lens: v["seq_lens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap() as usize)
            .collect(),
    }
}

#[track_caller]
fn close(what: &str, got: &Tensor, want: &Tensor) {
    common::assert_close(what, got, want, TOL);
}

#[test]
fn prompt_cleaning_matches_diffusers() {
    let dir = common::fixture("umt5");
    let p = prompts(&dir);
    for (raw, want) in p.prompts.iter().zip(&p.cleaned) {
        assert_eq!(&prompt_clean(raw), want, "cleaning {raw:?}");
    }
}

#[test]
fn token_ids_match_transformers() {
    let dir = common::fixture("umt5");
    let p = prompts(&dir);
    let tok = T5Tokenizer::from_file(&dir.join("tokenizer")).unwrap();
    for (raw, want) in p.prompts.iter().zip(&p.ids) {
        let got = tok.encode(raw).unwrap();
        assert_eq!(&got, want, "ids of {raw:?}");
        assert_eq!(got.last(), Some(&1), "</s> ends {raw:?}");
    }
    assert_eq!(p.seq_lens.last(), Some(&512), "the long prompt is truncated to 512");
    let batch = tok.encode_batch(&p.prompts, Device::Cpu).unwrap();
    assert_eq!(batch.seq_lens, p.seq_lens);
    let io = common::tensors(&dir.join("io.safetensors"));
    let n = batch.input_ids.size()[1];
    assert!(batch.input_ids.equal(&io["input_ids"].narrow(1, 0, n)));
    assert!(batch.attention_mask.equal(&io["attention_mask"].narrow(1, 0, n)));
}

#[test]
fn encoder_matches_transformers_on_padded_batch() {
    let dir = common::fixture("umt5");
    let io = common::tensors(&dir.join("io.safetensors"));
    let model =
        UMT5EncoderModel::load(&dir.join("text_encoder"), None, Device::Cpu, Kind::Float).unwrap();
    let got = model.forward(&io["input_ids"], &io["attention_mask"]).unwrap();
    close("last_hidden_state", &got, &io["last_hidden_state"]);
}

#[test]
fn wan_prompt_embeds_match_diffusers_from_both_layouts() {
    let dir = common::fixture("umt5");
    let io = common::tensors(&dir.join("io.safetensors"));
    let p = prompts(&dir);
    let tok = T5Tokenizer::from_file(&dir.join("tokenizer")).unwrap();
    let cfg =
        x2v_models::wan::text_encoder::UMT5Config::from_file(&dir.join("text_encoder/config.json"))
            .unwrap();
    for path in [dir.join("text_encoder"), dir.join("models_t5_umt5-xxl-enc-bf16.pth")] {
        let model =
            UMT5EncoderModel::load(&path, Some(cfg.clone()), Device::Cpu, Kind::Float).unwrap();
        let got = model.prompt_embeds(&tok, &p.prompts).unwrap();
        assert_eq!(got.size(), vec![p.prompts.len() as i64, 512, 64]);
        close(&format!("prompt_embeds ({})", path.display()), &got, &io["prompt_embeds"]);
        for (i, &n) in p.seq_lens.iter().enumerate() {
            let pad = got.get(i as i64).narrow(0, n as i64, 512 - n as i64);
            assert_eq!(pad.abs().sum(Kind::Float).double_value(&[]), 0.0, "rows past {n} are zero");
        }
    }
}

#[test]
fn bad_token_ids_are_named() {
    let dir = common::fixture("umt5");
    let model =
        UMT5EncoderModel::load(&dir.join("text_encoder"), None, Device::Cpu, Kind::Float).unwrap();
    let ids = Tensor::from_slice(&[5i64, 999, 1]).view([1, 3]);
    let err = model.forward(&ids, &ids.ones_like()).unwrap_err();
    assert!(matches!(err, Error::Input { .. }) && err.to_string().contains("[1, 999]"), "{err}");
    let err = model.forward(&ids, &Tensor::ones([1, 2], (Kind::Int64, Device::Cpu))).unwrap_err();
    assert!(err.to_string().contains("[1, 2]"), "{err}");
}
