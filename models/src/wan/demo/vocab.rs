//! The demo tokenizer: a small SentencePiece-like Unigram vocabulary in `tokenizer.json`.

use std::path::Path;

use serde_json::json;
use tokenizers::models::unigram::Unigram;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::demo::{build_err, create_dir, write_json};
use crate::error::Error;

/// A SentencePiece-like Unigram vocabulary: the specials, `▁`, characters, `▁`-prefixed
/// letters and a few whole words (cheaper than their spelling, so they win). Unknown characters
/// become `<unk>`. Returns the vocabulary size.
pub(super) fn write_tokenizer(dir: &Path) -> Result<i64, Error> {
    const WORDS: &[&str] = &[
        "a",
        "an",
        "the",
        "of",
        "on",
        "in",
        "at",
        "and",
        "with",
        "cat",
        "dog",
        "walks",
        "runs",
        "grass",
        "beach",
        "forest",
        "city",
        "night",
        "sunset",
        "panda",
        "eating",
        "bamboo",
        "video",
        "realistic",
        "style",
        "cinematic",
        "lighting",
        "blurry",
        "low",
        "quality",
        "camera",
    ];
    let mut vocab: Vec<(String, f64)> =
        vec![("<pad>".into(), 0.0), ("</s>".into(), 0.0), ("<unk>".into(), 0.0)];
    vocab.push(("\u{2581}".into(), -4.0));
    let chars = ('a'..='z').chain('A'..='Z').chain('0'..='9').chain(".,;:!?'\"-()&<>/".chars());
    vocab.extend(chars.map(|c| (c.to_string(), -8.0)));
    vocab.extend(('a'..='z').map(|c| (format!("\u{2581}{c}"), -7.0)));
    vocab.extend(WORDS.iter().map(|w| (format!("\u{2581}{w}"), -3.0)));
    let size = vocab.len() as i64;
    let err = build_err("tokenizer");

    let model = Unigram::from(vocab, Some(2), false).map_err(|e| err(e.to_string()))?;
    let mut tok = Tokenizer::new(model);
    let metaspace = Metaspace::new('\u{2581}', PrependScheme::Always, true);
    tok.with_pre_tokenizer(Some(metaspace.clone()));
    tok.with_decoder(Some(metaspace));
    let post = TemplateProcessing::builder()
        .try_single("$A </s>")
        .and_then(|b| b.try_pair("$A </s> $B </s>"))
        .map_err(|e| err(e.to_string()))?
        .special_tokens(vec![("</s>", 1)])
        .build()
        .map_err(|e| err(e.to_string()))?;
    tok.with_post_processor(Some(post));
    tok.add_special_tokens(&["<pad>", "</s>", "<unk>"].map(|t| AddedToken::from(t, true)));

    create_dir(dir)?;
    let path = dir.join("tokenizer.json");
    tok.save(&path, true).map_err(|e| Error::Write { path, message: e.to_string() })?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 512,
            "pad_token": "<pad>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "clean_up_tokenization_spaces": false,
        }),
    )?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &json!({ "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>" }),
    )?;
    Ok(size)
}
