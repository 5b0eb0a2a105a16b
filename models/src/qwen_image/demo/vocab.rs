//! The demo tokenizer: the Qwen2 pipeline (NFC, the Qwen2 split regex, byte-level BPE without a
//! prefix space) over the 256 byte symbols and the merges that spell a few hundred common words,
//! followed by the added tokens of the published Qwen2.5-VL tokenizer (same names, order and
//! special flags, numbered right after the BPE vocabulary). Every byte is a symbol, so any UTF-8
//! text tokenizes.

use std::collections::HashSet;
use std::path::Path;

use serde_json::{Map, Value, json};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::demo::{build_err, create_dir, write_json, write_text};
use crate::error::Error;

/// transformers' `Qwen2Tokenizer` pre-tokenizer regex.
const PRETOKENIZE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Added tokens of the published Qwen2.5-VL tokenizer, in id order, with their `special` flag.
const ADDED_TOKENS: [(&str, bool); 22] = [
    ("<|endoftext|>", true),
    ("<|im_start|>", true),
    ("<|im_end|>", true),
    ("<|object_ref_start|>", true),
    ("<|object_ref_end|>", true),
    ("<|box_start|>", true),
    ("<|box_end|>", true),
    ("<|quad_start|>", true),
    ("<|quad_end|>", true),
    ("<|vision_start|>", true),
    ("<|vision_end|>", true),
    ("<|vision_pad|>", true),
    ("<|image_pad|>", true),
    ("<|video_pad|>", true),
    ("<tool_call>", false),
    ("</tool_call>", false),
    ("<|fim_prefix|>", false),
    ("<|fim_middle|>", false),
    ("<|fim_suffix|>", false),
    ("<|fim_pad|>", false),
    ("<|repo_name|>", false),
    ("<|file_sep|>", false),
];

/// Words spelt by merges, each with and without a leading space: the prompt templates' words and
/// some common in prompts (whitespace-separated).
const WORDS: &str = "\
    system user assistant Describe the image by detailing color shape size texture \
    quantity text spatial relationships of objects and background key features input \
    then explain how instruction should alter or modify Generate new that meets \
    requirements while maintaining consistency with original where appropriate Picture a \
    an on in at is cat dog fox walks runs grass sky sea lake boat red blue green purple \
    small big make add change photo realistic style sunset city night forest";

/// The ids of the tokens the model configs name.
pub(super) struct DemoVocab {
    /// Rows of the embedding: the BPE vocabulary plus the added tokens.
    pub size: i64,
    bpe: i64,
}

impl DemoVocab {
    /// The id of added token `name`.
    pub fn id(&self, name: &str) -> i64 {
        let i = ADDED_TOKENS.iter().position(|(t, _)| *t == name).expect("an added token");
        self.bpe + i as i64
    }
}

/// GPT-2's byte-to-symbol table: printable Latin-1 bytes stand for themselves, the others for the
/// code points from U+0100 on, in byte order.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let mut next = 0x100;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("a Latin-1 code point")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("a code point below U+0200")
            }
        })
        .collect()
}

/// The BPE vocabulary (byte symbols first, then each merge's result) and the merges, in rank
/// order: every word of [`WORDS`] spelt left to right, after a space (`Ġ`) and alone.
fn bpe() -> (Vec<String>, Vec<(String, String)>) {
    let symbols = byte_symbols();
    let mut tokens: Vec<String> = symbols.iter().map(char::to_string).collect();
    let mut known: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges = Vec::new();
    let mut seen = HashSet::new();
    for word in WORDS.split_whitespace() {
        for text in [format!(" {word}"), word.to_owned()] {
            let pieces: Vec<String> =
                text.bytes().map(|b| symbols[usize::from(b)].to_string()).collect();
            let mut left = pieces[0].clone();
            for right in &pieces[1..] {
                let merged = format!("{left}{right}");
                if seen.insert((left.clone(), right.clone())) {
                    merges.push((left.clone(), right.clone()));
                }
                if known.insert(merged.clone()) {
                    tokens.push(merged.clone());
                }
                left = merged;
            }
        }
    }
    (tokens, merges)
}

/// Writes `tokenizer.json` (with `vocab.json`, `merges.txt` and `tokenizer_config.json`, the
/// published file set) into `dir`.
pub(super) fn write_tokenizer(dir: &Path) -> Result<DemoVocab, Error> {
    let err = build_err("tokenizer");
    let (tokens, merges) = bpe();
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges.clone())
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(NFC));
    let split = Split::new(
        SplitPattern::Regex(PRETOKENIZE_REGEX.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| err(e.to_string()))?;
    let byte_level = ByteLevel::new(false, true, false);
    tok.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let added: Vec<AddedToken> = ADDED_TOKENS
        .iter()
        .map(|(name, special)| AddedToken::from(*name, *special).normalized(false))
        .collect();
    tok.add_tokens(&added);

    create_dir(dir)?;
    let path = dir.join("tokenizer.json");
    tok.save(&path, true).map_err(|e| Error::Write { path, message: e.to_string() })?;
    let vocab_json: Map<String, Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    write_text(
        &dir.join("vocab.json"),
        &(serde_json::to_string(&vocab_json).expect("JSON values serialise") + "\n"),
    )?;
    let lines: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
    write_text(&dir.join("merges.txt"), &format!("#version: 0.2\n{}\n", lines.join("\n")))?;
    let extra: Vec<&str> =
        ADDED_TOKENS[1..14].iter().filter(|(_, s)| *s).map(|(name, _)| *name).collect();
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "add_prefix_space": null,
            "backend": "tokenizers",
            "bos_token": null,
            "clean_up_tokenization_spaces": false,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "extra_special_tokens": extra,
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": false,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": null,
        }),
    )?;
    let bpe = tokens.len() as i64;
    Ok(DemoVocab { size: bpe + ADDED_TOKENS.len() as i64, bpe })
}
