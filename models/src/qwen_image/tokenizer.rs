//! The Qwen-Image prompt side: the chat templates of the three pipelines, the Qwen2 tokenizer
//! (read from `tokenizer.json`), the expansion of `<|image_pad|>` to one token per merged vision
//! patch, and the post-processing of the text encoder's last hidden states into `prompt_embeds`.
//!
//! References: diffusers `pipelines/qwenimage/pipeline_qwenimage.py`,
//! `pipeline_qwenimage_edit.py`, `pipeline_qwenimage_edit_plus.py` (`prompt_template_encode`,
//! `prompt_template_encode_start_idx`, `_get_qwen_prompt_embeds`, `_extract_masked_hidden`,
//! `encode_prompt`) and transformers `models/qwen2_vl/processing_qwen2_vl.py`
//! (`replace_image_token`). Text-to-image tokenizes with `tokenizer(txt, max_length=1024 +
//! drop_idx, padding=True, truncation=True)`; the edit pipelines go through the processor
//! (`padding=True`, no truncation), which repeats each `<|image_pad|>` `t·h·w / merge²` times.
//! Batches are right-padded with `<|endoftext|>`. Tokenizing is blocking CPU work.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Component, Error};

/// The pipelines' `tokenizer_max_length`: text-to-image prompts are cut at this many tokens after
/// the template prefix.
pub const TOKENIZER_MAX_LENGTH: usize = 1024;
/// The pipelines' default `max_sequence_length` for `prompt_embeds`.
pub const MAX_SEQUENCE_LENGTH: i64 = 512;
/// The vision placeholder the processor expands.
pub const IMAGE_PAD: &str = "<|image_pad|>";
const PAD_TOKEN: &str = "<|endoftext|>";

const T2I_TEMPLATE: &str = "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n";
const EDIT_SYSTEM: &str = "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), then explain how the user's text instruction should alter or modify the image. Generate a new image that meets the user's requirements while maintaining consistency with the original input where appropriate.<|im_end|>\n<|im_start|>user\n";
const EDIT_TAIL: &str = "<|im_end|>\n<|im_start|>assistant\n";
const VISION_BLOCK: &str = "<|vision_start|><|image_pad|><|vision_end|>";

/// The prompt template of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptTemplate {
    /// `QwenImagePipeline`.
    TextToImage,
    /// `QwenImageEditPipeline`: one vision block before the prompt.
    Edit,
    /// `QwenImageEditPlusPipeline`: `"Picture i: <vision block>"` per input image.
    EditPlus { images: usize },
}

impl PromptTemplate {
    /// `prompt_template_encode_start_idx`: template tokens dropped from the hidden states.
    pub fn drop_idx(self) -> i64 {
        match self {
            PromptTemplate::TextToImage => 34,
            PromptTemplate::Edit | PromptTemplate::EditPlus { .. } => 64,
        }
    }

    /// The templated text for `prompt` (before `<|image_pad|>` expansion).
    pub fn apply(self, prompt: &str) -> String {
        match self {
            PromptTemplate::TextToImage => T2I_TEMPLATE.replacen("{}", prompt, 1),
            PromptTemplate::Edit => format!("{EDIT_SYSTEM}{VISION_BLOCK}{prompt}{EDIT_TAIL}"),
            PromptTemplate::EditPlus { images } => {
                let pictures: String =
                    (1..=images).map(|i| format!("Picture {i}: {VISION_BLOCK}")).collect();
                format!("{EDIT_SYSTEM}{pictures}{prompt}{EDIT_TAIL}")
            }
        }
    }

    /// Whether the pipeline tokenizes through the processor (image tokens expanded, no
    /// truncation) rather than the bare tokenizer.
    fn uses_processor(self) -> bool {
        !matches!(self, PromptTemplate::TextToImage)
    }
}

/// Token ids of a batch, right-padded to the longest row.
#[derive(Debug)]
pub struct TokenBatch {
    /// `[B, L]` int64.
    pub input_ids: Tensor,
    /// `[B, L]` int64, 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// Real tokens per row.
    pub seq_lens: Vec<usize>,
}

/// The Qwen2 byte-level BPE tokenizer with the Qwen-Image pipelines' settings.
pub struct QwenTokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
}

impl std::fmt::Debug for QwenTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenTokenizer").field("pad_id", &self.pad_id).finish_non_exhaustive()
    }
}

impl QwenTokenizer {
    /// Reads `tokenizer.json` (or `<dir>/tokenizer.json`); it must know `<|endoftext|>` (the pad
    /// token) and `<|image_pad|>`.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_owned() };
        let shown = file.display().to_string();
        let mut inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| Error::TokenizerLoad { path: shown.clone(), message: e.to_string() })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::TokenizerLoad { path: shown.clone(), message: e.to_string() })?;
        let pad_id = inner
            .token_to_id(PAD_TOKEN)
            .ok_or(Error::MissingToken { path: shown.clone(), token: PAD_TOKEN })?;
        if inner.token_to_id(IMAGE_PAD).is_none() {
            return Err(Error::MissingToken { path: shown, token: IMAGE_PAD });
        }
        Ok(QwenTokenizer { inner, pad_id })
    }

    /// The id of `token`, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// Token ids of one text, special tokens recognised, nothing added.
    pub fn encode_text(&self, text: &str) -> Result<Vec<i64>, Error> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenize { prompt: text.to_owned(), message: e.to_string() })?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Templates, expands and tokenizes `prompts` as the pipeline does. `image_grids` holds one
    /// `(t, h, w)` per `<|image_pad|>` of the whole batch, in order (the processor's
    /// `image_grid_thw`); `merge` is the processor's `merge_size`.
    pub fn encode(
        &self,
        prompts: &[String],
        template: PromptTemplate,
        image_grids: &[[i64; 3]],
        merge: i64,
    ) -> Result<TokenBatch, Error> {
        if prompts.is_empty() {
            return Err(Error::NoPrompts);
        }
        let texts: Vec<String> = prompts.iter().map(|p| template.apply(p)).collect();
        let texts = if template.uses_processor() {
            expand_image_pads(&texts, image_grids, merge)?
        } else {
            texts
        };
        let mut ids: Vec<Vec<i64>> =
            texts.iter().map(|t| self.encode_text(t)).collect::<Result<_, _>>()?;
        if !template.uses_processor() {
            let max_length = TOKENIZER_MAX_LENGTH + template.drop_idx() as usize;
            ids.iter_mut().for_each(|row| row.truncate(max_length));
        }
        Ok(pad_batch(&ids, i64::from(self.pad_id)))
    }
}

/// The processor's placeholder expansion: the `k`-th `<|image_pad|>` of the batch becomes
/// `t·h·w / merge²` copies for `image_grids[k]`.
pub fn expand_image_pads(
    texts: &[String],
    image_grids: &[[i64; 3]],
    merge: i64,
) -> Result<Vec<String>, Error> {
    let found: usize = texts.iter().map(|t| t.matches(IMAGE_PAD).count()).sum();
    if found != image_grids.len() || merge < 1 {
        return Err(Error::Input {
            component: Component::Encode,
            message: format!(
                "the prompts hold {found} {IMAGE_PAD} tokens but {} image grids were given",
                image_grids.len()
            ),
        });
    }
    let mut grids = image_grids.iter();
    let expanded = texts
        .iter()
        .map(|text| {
            let mut parts = text.split(IMAGE_PAD);
            let mut out = parts.next().unwrap_or_default().to_owned();
            for (part, [t, h, w]) in parts.zip(grids.by_ref()) {
                let n = (t * h * w / (merge * merge)).max(0) as usize;
                out.push_str(&IMAGE_PAD.repeat(n));
                out.push_str(part);
            }
            out
        })
        .collect();
    Ok(expanded)
}

fn pad_batch(ids: &[Vec<i64>], pad_id: i64) -> TokenBatch {
    let seq_lens: Vec<usize> = ids.iter().map(Vec::len).collect();
    let len = seq_lens.iter().copied().max().unwrap_or(0);
    let mut flat_ids = Vec::with_capacity(ids.len() * len);
    let mut flat_mask = Vec::with_capacity(ids.len() * len);
    for row in ids {
        flat_ids.extend_from_slice(row);
        flat_ids.extend(std::iter::repeat_n(pad_id, len - row.len()));
        flat_mask.extend(std::iter::repeat_n(1i64, row.len()));
        flat_mask.extend(std::iter::repeat_n(0i64, len - row.len()));
    }
    let shape = [ids.len() as i64, len as i64];
    TokenBatch {
        input_ids: Tensor::from_slice(&flat_ids).view(shape),
        attention_mask: Tensor::from_slice(&flat_mask).view(shape),
        seq_lens,
    }
}

/// `_get_qwen_prompt_embeds` + `encode_prompt` on the text encoder's last hidden states
/// `[B, L, D]`: each row keeps its unmasked tokens minus the first `drop_idx`, rows are
/// right-padded with zeros to the longest, then cut to `max_len` tokens. The mask (`[B, S]`
/// int64) is `None` when it is all ones, as the pipelines return it.
pub fn prompt_embeds(
    hidden: &Tensor,
    attention_mask: &Tensor,
    drop_idx: i64,
    max_len: i64,
) -> (Tensor, Option<Tensor>) {
    let (batch, dim) = (hidden.size()[0], hidden.size()[2]);
    let rows: Vec<Tensor> = (0..batch)
        .map(|b| {
            let keep = attention_mask.get(b).to_kind(Kind::Bool).nonzero().squeeze_dim(1);
            let valid = hidden.get(b).index_select(0, &keep.to_device(hidden.device()));
            let n = valid.size()[0];
            valid.narrow(0, drop_idx.min(n), (n - drop_idx).max(0))
        })
        .collect();
    let seq = rows.iter().map(|r| r.size()[0]).max().unwrap_or(0);
    let opts = (hidden.kind(), hidden.device());
    let padded: Vec<Tensor> = rows
        .iter()
        .map(|r| {
            Tensor::cat(&[r.shallow_clone(), Tensor::zeros([seq - r.size()[0], dim], opts)], 0)
        })
        .collect();
    let masks: Vec<Tensor> = rows
        .iter()
        .map(|r| {
            let n = r.size()[0];
            let ones = Tensor::ones([n], (Kind::Int64, hidden.device()));
            Tensor::cat(&[ones, Tensor::zeros([seq - n], (Kind::Int64, hidden.device()))], 0)
        })
        .collect();
    let keep = seq.min(max_len);
    let embeds = Tensor::stack(&padded, 0).narrow(1, 0, keep);
    let mask = Tensor::stack(&masks, 0).narrow(1, 0, keep);
    let all_ones = mask.numel() == 0 || mask.min().int64_value(&[]) == 1;
    (embeds, if all_ones { None } else { Some(mask) })
}
