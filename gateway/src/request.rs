//! Request bodies as the clients send them: JSON objects or multipart forms (text parts, bracketed
//! keys such as `input_reference[image_url]`, file parts, repeated `image[]`), read into one
//! [`Form`] that validation reads typed values from. Values are accepted leniently where the
//! clients differ (numbers as strings in multipart, `null` for unset fields in JSON).

use axum::body::Bytes;
use axum::extract::Multipart;
use axum::http::HeaderMap;
use base64::Engine;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// An uploaded file.
#[derive(Debug, Clone)]
pub struct Upload {
    /// Field name without a trailing `[]`.
    pub field: String,
    pub bytes: Bytes,
    /// Media type sniffed from the bytes (never trusted from the part header).
    pub media_type: Option<&'static str>,
}

/// A parsed request body.
#[derive(Debug, Default)]
pub struct Form {
    pub fields: Map<String, Value>,
    pub uploads: Vec<Upload>,
    /// Multipart `key[][sub]` values while the body is read: key → sub → values in order.
    lists: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Vec<String>>>,
}

/// The media type of well-known image and video formats, from magic bytes.
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => Some("image/png"),
        [0xFF, 0xD8, 0xFF, ..] => Some("image/jpeg"),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some("image/webp"),
        [b'G', b'I', b'F', b'8', ..] => Some("image/gif"),
        [_, _, _, _, b'f', b't', b'y', b'p', ..] => Some("video/mp4"),
        _ => None,
    }
}

impl Form {
    /// Reads a JSON object body. An empty body is an empty form.
    pub fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Form::default());
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(fields)) => Ok(Form { fields, ..Form::default() }),
            Ok(other) => Err(ApiError::invalid(
                "body",
                format!("The request body must be a JSON object; got {}.", kind_of(&other)),
            )),
            Err(e) => {
                Err(ApiError::invalid("body", format!("The request body is not valid JSON: {e}.")))
            }
        }
    }

    /// Reads a multipart form.
    pub async fn from_multipart(mut mp: Multipart) -> Result<Self, ApiError> {
        let mut form = Form::default();
        let bad = |e: axum::extract::multipart::MultipartError| {
            let status = e.status();
            ApiError::invalid("body", format!("Malformed multipart body: {}.", e.body_text()))
                .status(status)
        };
        while let Some(field) = mp.next_field().await.map_err(bad)? {
            let name = field.name().unwrap_or_default().to_owned();
            let is_file = field.file_name().is_some();
            let bytes = field.bytes().await.map_err(bad)?;
            if is_file {
                let field = name.strip_suffix("[]").unwrap_or(&name).to_owned();
                form.uploads.push(Upload { field, media_type: sniff(&bytes), bytes });
            } else {
                let text = String::from_utf8(bytes.to_vec()).map_err(|_| {
                    ApiError::invalid(&name, format!("Form field `{name}` is not UTF-8 text."))
                })?;
                form.insert_text(name, text);
            }
        }
        form.finish_lists()?;
        Ok(form)
    }

    /// A multipart text field. `key[][sub]` parts are how the OpenAI clients send a list of
    /// objects in a form: they are collected per `sub`, in order, and [`Form::finish_lists`]
    /// zips them into the list `key`. Any other name is one field, the last value winning.
    fn insert_text(&mut self, name: String, text: String) {
        let list_part = name
            .strip_suffix(']')
            .and_then(|n| n.split_once("[]["))
            .filter(|(k, s)| !k.is_empty() && !s.is_empty() && !s.contains(['[', ']']));
        match list_part {
            Some((key, sub)) => {
                let subs = self.lists.entry(key.to_owned()).or_default();
                subs.entry(sub.to_owned()).or_default().push(text);
            }
            None => {
                self.fields.insert(name, Value::String(text));
            }
        }
    }

    /// Builds the lists of objects of `key[][sub]` parts: object `i` takes the `i`-th value of
    /// every `sub`. The clients send all values of one `sub` before the next, so an object
    /// without some field cannot be placed: every object must then carry the same fields.
    fn finish_lists(&mut self) -> Result<(), ApiError> {
        for (key, subs) in std::mem::take(&mut self.lists) {
            let n = subs.values().map(Vec::len).max().unwrap_or(0);
            if let Some((sub, _)) = subs.iter().find(|(_, v)| v.len() != n) {
                return Err(ApiError::invalid(
                    &key,
                    format!(
                        "In a multipart body every `{key}` item needs the same fields (`{sub}` is \
                         given for some items only); give each item every field, or send `{key}` \
                         as one part of JSON text."
                    ),
                ));
            }
            let items = (0..n)
                .map(|i| {
                    Value::Object(
                        subs.iter()
                            .map(|(sub, v)| (sub.clone(), Value::String(v[i].clone())))
                            .collect(),
                    )
                })
                .collect();
            self.fields.insert(key, Value::Array(items));
        }
        Ok(())
    }

    /// Reads JSON or multipart by `Content-Type` (JSON when absent).
    pub async fn read(headers: &HeaderMap, req: axum::extract::Request) -> Result<Self, ApiError> {
        let ct = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ct.starts_with("multipart/form-data") {
            let mp = <Multipart as axum::extract::FromRequest<()>>::from_request(req, &())
                .await
                .map_err(|e| {
                    ApiError::invalid(
                        "body",
                        format!("Malformed multipart request: {}.", e.body_text()),
                    )
                })?;
            Form::from_multipart(mp).await
        } else if ct.is_empty() || ct.starts_with("application/json") || ct.ends_with("+json") {
            let body = axum::body::to_bytes(req.into_body(), usize::MAX).await.map_err(|e| {
                ApiError::invalid("body", format!("Could not read the request body: {e}."))
                    .status(axum::http::StatusCode::PAYLOAD_TOO_LARGE)
            })?;
            Form::from_json(&body)
        } else {
            Err(ApiError::invalid(
                "Content-Type",
                format!(
                    "Content-Type must be application/json or multipart/form-data; got `{ct}`."
                ),
            )
            .status(axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE))
        }
    }

    fn value(&self, key: &str) -> Option<&Value> {
        self.fields.get(key).filter(|v| !v.is_null())
    }

    pub fn has(&self, key: &str) -> bool {
        self.value(key).is_some()
    }

    pub fn str(&self, key: &str) -> Result<Option<String>, ApiError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(ApiError::invalid(
                key,
                format!("`{key}` must be a string; got {}.", kind_of(other)),
            )),
        }
    }

    /// A number, or its text; `what` (the bounds, for the message) is only made on failure.
    fn number(&self, key: &str, what: impl Fn() -> String) -> Result<Option<f64>, ApiError> {
        let err = |given: String| {
            ApiError::invalid(key, format!("`{key}` must be {}; got {given}.", what()))
        };
        match self.value(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_f64().map(Some).ok_or_else(|| err(n.to_string())),
            Some(Value::String(s)) => {
                s.trim().parse::<f64>().map(Some).map_err(|_| err(format!("\"{s}\"")))
            }
            Some(other) => Err(err(kind_of(other).into())),
        }
    }

    /// An integer within `min..=max`.
    pub fn int(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        let what = || format!("an integer from {min} to {max}");
        let Some(v) = self.number(key, what)? else { return Ok(None) };
        check_int(key, v, min, max, what).map(Some)
    }

    /// An integer of at least `min`, whose upper bound depends on the served model (checked once
    /// the model is known, with [`check_int`]).
    pub fn int_from(&self, key: &str, min: u64) -> Result<Option<u64>, ApiError> {
        let what = || format!("an integer of at least {min}");
        let Some(v) = self.number(key, what)? else { return Ok(None) };
        check_int(key, v, min, u64::MAX, what).map(Some)
    }

    /// A finite number within `min..=max`.
    pub fn float(&self, key: &str, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
        let what = || format!("a number from {min} to {max}");
        let Some(v) = self.number(key, what)? else { return Ok(None) };
        if !v.is_finite() || v < min || v > max {
            return Err(ApiError::invalid(key, format!("`{key}` must be {}; got {v}.", what())));
        }
        Ok(Some(v))
    }

    /// A JSON value as sent (in multipart, a part's text parsed as JSON).
    pub fn json(&self, key: &str) -> Result<Option<Value>, ApiError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::String(s)) => serde_json::from_str(s)
                .map(Some)
                .map_err(|e| ApiError::invalid(key, format!("`{key}` must be JSON; {e}."))),
            Some(v) => Ok(Some(v.clone())),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s == "true" || s == "false" => Ok(Some(s == "true")),
            Some(other) => {
                Err(ApiError::invalid(key, format!("`{key}` must be true or false; got {other}.")))
            }
        }
    }

    /// One of the values of `T` (case-sensitive).
    pub fn choice<T: Choice>(&self, key: &str) -> Result<Option<T>, ApiError> {
        self.str(key)?.map(|v| choice(key, &v)).transpose()
    }

    /// A nested object field, from JSON (`{"a": {"b": 1}}`) or multipart brackets (`a[b]=1`).
    pub fn nested(&self, key: &str, sub: &str) -> Result<Option<String>, ApiError> {
        if let Some(Value::Object(m)) = self.value(key) {
            return match m.get(sub) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(ApiError::invalid(
                    key,
                    format!("`{key}.{sub}` must be a string; got {}.", kind_of(other)),
                )),
            };
        }
        self.str(&format!("{key}[{sub}]"))
    }

    pub fn uploads(&self, field: &str) -> impl Iterator<Item = &Upload> {
        self.uploads.iter().filter(move |u| u.field == field)
    }
}

/// `v` as an integer within `min..=max` (`what` names the bounds in the message).
pub fn check_int(
    key: &str,
    v: f64,
    min: u64,
    max: u64,
    what: impl Fn() -> String,
) -> Result<u64, ApiError> {
    if v.fract() != 0.0 || v < min as f64 || v > max as f64 {
        return Err(ApiError::invalid(key, format!("`{key}` must be {}; got {v}.", what())));
    }
    Ok(v as u64)
}

/// A field with a closed set of values: each as the client spells it, and the value it reads as.
pub trait Choice: Copy + PartialEq + 'static {
    const ALL: &'static [(&'static str, Self)];

    fn as_str(self) -> &'static str {
        Self::ALL.iter().find(|(_, v)| *v == self).map_or("", |(name, _)| name)
    }

    /// The schema: a string, one of the names in [`Choice::ALL`].
    fn string_schema(description: &str) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(description))
            .enum_values(Some(Self::ALL.iter().map(|(name, _)| *name)))
            .into()
    }
}

/// Declares a [`Choice`] enum from one table of variants and their names, with its schema.
macro_rules! choice_enum {
    ($(#[doc = $doc:literal])* $name:ident { $($(#[doc = $vdoc:literal])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[doc = $vdoc])* $variant),+
        }

        impl $crate::request::Choice for $name {
            const ALL: &'static [(&'static str, Self)] = &[$(($text, $name::$variant)),+];
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                <Self as $crate::request::Choice>::string_schema(concat!($($doc),*).trim())
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}
pub(crate) use choice_enum;

/// `v` as one of the values of `T` (case-sensitive).
pub fn choice<T: Choice>(key: &str, v: &str) -> Result<T, ApiError> {
    match T::ALL.iter().find(|(name, _)| *name == v) {
        Some((_, value)) => Ok(*value),
        None => {
            let allowed = T::ALL.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ");
            Err(ApiError::invalid(key, format!("`{key}` must be one of {allowed}; got \"{v}\".")))
        }
    }
}

/// Decodes a `data:<type>;base64,<payload>` URL.
pub fn decode_data_url(param: &str, url: &str) -> Result<Upload, ApiError> {
    let payload = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
        .map(|(_, b64)| b64)
        .ok_or_else(|| {
            ApiError::invalid(
                param,
                "Only base64 `data:` URLs are accepted here (x2v does not fetch remote URLs).",
            )
        })?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(payload.trim()).map_err(|e| {
        ApiError::invalid(param, format!("The data URL's base64 payload is invalid: {e}."))
    })?;
    let bytes = Bytes::from(bytes);
    Ok(Upload { field: param.to_owned(), media_type: sniff(&bytes), bytes })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_by_content_not_name() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Some("image/png"));
        assert_eq!(sniff(b"\xff\xd8\xff\xe0"), Some("image/jpeg"));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(sniff(b"\0\0\0\x18ftypmp42"), Some("video/mp4"));
        assert_eq!(sniff(b"hello"), None);
    }

    #[test]
    fn lenient_numbers_and_explicit_nulls() {
        let f = Form::from_json(br#"{"n": null, "seconds": "8", "steps": 4, "g": "x", "neg": -1}"#)
            .unwrap();
        assert_eq!(f.int("n", 1, 10).unwrap(), None);
        assert_eq!(f.int("seconds", 1, 12).unwrap(), Some(8));
        assert_eq!(f.int("steps", 1, 100).unwrap(), Some(4));
        let e = f.float("g", 0.0, 30.0).unwrap_err();
        assert!(
            e.message.contains("a number from 0 to 30") && e.message.contains("\"x\""),
            "{}",
            e.message
        );
        assert!(f.int("neg", 0, 5).unwrap_err().message.contains("got -1"));
    }

    #[test]
    fn bracketed_and_nested_keys_read_the_same() {
        let json = Form::from_json(br#"{"input_reference": {"image_url": "data:x"}}"#).unwrap();
        assert_eq!(json.nested("input_reference", "image_url").unwrap().as_deref(), Some("data:x"));
        let mut mp = Form::default();
        mp.fields.insert("input_reference[image_url]".into(), Value::String("data:y".into()));
        assert_eq!(mp.nested("input_reference", "image_url").unwrap().as_deref(), Some("data:y"));
    }

    #[test]
    fn multipart_lists_of_objects_are_rebuilt_in_order() {
        // What the openai clients send for `lora=[{name: a, scale: 0.5}, {name: b, scale: 2}]` in
        // a multipart body: every name, then every scale.
        let mut mp = Form::default();
        for (k, v) in [
            ("lora[][name]", "a"),
            ("lora[][name]", "b"),
            ("lora[][scale]", "0.5"),
            ("lora[][scale]", "2"),
            ("prompt", "x"),
        ] {
            mp.insert_text(k.into(), v.into());
        }
        mp.finish_lists().unwrap();
        assert_eq!(
            mp.json("lora").unwrap().unwrap(),
            serde_json::json!([{"name": "a", "scale": "0.5"}, {"name": "b", "scale": "2"}])
        );
        assert_eq!(mp.str("prompt").unwrap().as_deref(), Some("x"));
        // A field only some items have cannot be placed: refused, naming the list.
        let mut partial = Form::default();
        for (k, v) in [("lora[][name]", "a"), ("lora[][name]", "b"), ("lora[][scale]", "2")] {
            partial.insert_text(k.into(), v.into());
        }
        let e = partial.finish_lists().unwrap_err();
        assert_eq!(e.param.as_deref(), Some("lora"));
        assert!(e.message.contains("`scale`"), "{}", e.message);
        // The same list as JSON text in one part reads as JSON.
        let mut text = Form::default();
        text.insert_text("lora".into(), r#"[{"name": "a"}]"#.into());
        assert_eq!(text.json("lora").unwrap().unwrap(), serde_json::json!([{"name": "a"}]));
        text.insert_text("bad".into(), "[{".into());
        assert_eq!(text.json("bad").unwrap_err().param.as_deref(), Some("bad"));
    }

    #[test]
    fn non_object_json_is_refused() {
        assert!(Form::from_json(b"[1]").unwrap_err().message.contains("an array"));
        assert!(Form::from_json(b"{").is_err());
        assert!(Form::from_json(b"").unwrap().fields.is_empty());
    }
}
