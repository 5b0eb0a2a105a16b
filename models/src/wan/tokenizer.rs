//! The Wan prompt tokenizer: prompt cleaning plus the UMT5 SentencePiece tokenizer read from a
//! `tokenizer.json` (diffusers repos ship `tokenizer/tokenizer.json` for `google/umt5-xxl`).
//!
//! Reference: diffusers `pipelines/wan/pipeline_wan.py` (`prompt_clean`,
//! `_get_t5_prompt_embeds`): `tokenizer(prompt, padding="max_length", max_length=512,
//! truncation=True, add_special_tokens=True)`; `</s>` (id 1) is appended, the pad id is 0 and no
//! BOS is added. Tokenizing is blocking CPU work: async callers run it on a blocking thread.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::error::Error;

/// Wan's text length: prompts are truncated to this many tokens, `</s>` included.
pub const MAX_LENGTH: usize = 512;

/// Python's `str.isspace` (what `re.sub(r"\s+", ...)` and `str.strip()` use): Unicode
/// whitespace plus the information separators U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// diffusers' `prompt_clean`: `html.unescape` twice, strip, collapse every whitespace run to one
/// space, strip. `ftfy.fix_text` is not applied (diffusers skips it too when ftfy is not
/// installed). Entity decoding covers the HTML5 named references and numeric references
/// terminated by `;`; Python additionally accepts a few legacy forms without `;` (`&amp`).
pub fn prompt_clean(text: &str) -> String {
    let once = html_escape::decode_html_entities(text);
    let twice = html_escape::decode_html_entities(&once);
    let mut out = String::with_capacity(twice.len());
    for word in twice.split(is_py_space).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Token ids of a batch, right-padded with the pad id to the longest prompt.
#[derive(Debug)]
pub struct TokenBatch {
    /// `[B, L]` int64.
    pub input_ids: Tensor,
    /// `[B, L]` int64, 1 for real tokens (`</s>` included), 0 for padding.
    pub attention_mask: Tensor,
    /// Real tokens per prompt (the mask sums).
    pub seq_lens: Vec<usize>,
}

/// A T5-style tokenizer with Wan's settings.
pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl T5Tokenizer {
    /// Reads `tokenizer.json` (or `<dir>/tokenizer.json`) with truncation at [`MAX_LENGTH`].
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        Self::with_max_length(path, MAX_LENGTH)
    }

    pub fn with_max_length(path: &Path, max_length: usize) -> Result<Self, Error> {
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_owned() };
        let shown = file.display().to_string();
        let err = |message: String| Error::TokenizerLoad { path: shown.clone(), message };
        let mut inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| err(e.to_string()))?;
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| err(e.to_string()))?;
        inner.with_padding(None);
        let pad_id = inner
            .token_to_id("<pad>")
            .ok_or(Error::MissingToken { path: shown.clone(), token: "<pad>" })?;
        if inner.token_to_id("</s>").is_none() {
            return Err(Error::MissingToken { path: shown, token: "</s>" });
        }
        Ok(T5Tokenizer { inner, pad_id, max_length })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Cleans and tokenizes one prompt: ids with `</s>` appended, at most `max_length`.
    pub fn encode(&self, prompt: &str) -> Result<Vec<i64>, Error> {
        let cleaned = prompt_clean(prompt);
        let enc = self
            .inner
            .encode(cleaned.as_str(), true)
            .map_err(|e| Error::Tokenize { prompt: prompt.to_owned(), message: e.to_string() })?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Tokenizes prompts into a right-padded batch on `device`.
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        prompts: &[S],
        device: Device,
    ) -> Result<TokenBatch, Error> {
        if prompts.is_empty() {
            return Err(Error::NoPrompts);
        }
        let ids: Vec<Vec<i64>> =
            prompts.iter().map(|p| self.encode(p.as_ref())).collect::<Result<_, _>>()?;
        let seq_lens: Vec<usize> = ids.iter().map(Vec::len).collect();
        let len = seq_lens.iter().copied().max().unwrap_or(0);
        let mut flat_ids = Vec::with_capacity(ids.len() * len);
        let mut flat_mask = Vec::with_capacity(ids.len() * len);
        for row in &ids {
            flat_ids.extend_from_slice(row);
            flat_ids.extend(std::iter::repeat_n(i64::from(self.pad_id), len - row.len()));
            flat_mask.extend(std::iter::repeat_n(1i64, row.len()));
            flat_mask.extend(std::iter::repeat_n(0i64, len - row.len()));
        }
        let shape = [ids.len() as i64, len as i64];
        Ok(TokenBatch {
            input_ids: Tensor::from_slice(&flat_ids).view(shape).to_device(device),
            attention_mask: Tensor::from_slice(&flat_mask)
                .view(shape)
                .to_kind(Kind::Int64)
                .to_device(device),
            seq_lens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_unescapes_twice_and_collapses_whitespace() {
        assert_eq!(prompt_clean("  a\t\tb\n c \u{a0} d  "), "a b c d");
        assert_eq!(prompt_clean("&amp;lt;b&amp;gt; &quot;x&quot; &#39;y&#x27;"), "<b> \"x\" 'y'");
        assert_eq!(prompt_clean("x&nbsp;&nbsp;y"), "x y");
        assert_eq!(prompt_clean("\u{1c}\u{1f}"), "");
        assert_eq!(prompt_clean("猫 &eacute;"), "猫 é");
    }
}
