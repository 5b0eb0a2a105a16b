//! Conversion between the Redis job hash and [`JobRecord`]. Replies are read where they lie: the
//! fields borrow the reply's bytes, and only what the record keeps is copied (a status poll reads
//! one hash of some twenty fields, so this is most of its work in the gateway).

use std::collections::HashMap;

use redis::Value;

use crate::error::QueueError;
use crate::record::{JobError, JobRecord, JobStatus, OutputRef};
use crate::spec::{Ranks, Resource, Stage};

/// The field/value pairs of a hash reply: `[field, value, ...]` (RESP2) or a map (RESP3).
pub fn hash_fields(reply: &Value) -> Result<Vec<(&str, &str)>, QueueError> {
    match reply {
        Value::Nil => Ok(Vec::new()),
        Value::Array(items) => pairs(items),
        Value::Map(entries) => entries.iter().map(|(k, v)| Ok((text(k)?, text(v)?))).collect(),
        other => Err(corrupt("", format!("expected a hash, got {other:?}"))),
    }
}

/// `[field, value, ...]` as pairs.
pub fn pairs(items: &[Value]) -> Result<Vec<(&str, &str)>, QueueError> {
    items.chunks_exact(2).map(|pair| Ok((text(&pair[0])?, text(&pair[1])?))).collect()
}

fn text(v: &Value) -> Result<&str, QueueError> {
    match v {
        Value::BulkString(bytes) => std::str::from_utf8(bytes)
            .map_err(|e| corrupt("", format!("a hash field is not UTF-8: {e}"))),
        Value::SimpleString(s) => Ok(s),
        other => Err(corrupt("", format!("expected text in a hash, got {other:?}"))),
    }
}

fn corrupt(id: &str, message: String) -> QueueError {
    QueueError::Corrupt { id: id.to_owned(), message }
}

/// Whether the hash marks its job deleted (a tombstone kept until its TTL).
pub fn is_deleted(fields: &[(&str, &str)]) -> bool {
    fields.iter().any(|(k, v)| *k == "deleted" && *v == "1")
}

/// The job hash's fields the record is made of; absent fields read as empty.
#[derive(Default)]
struct Fields<'a> {
    id: &'a str,
    resource: &'a str,
    spec: &'a str,
    status: &'a str,
    stage: &'a str,
    progress: &'a str,
    step: &'a str,
    total: &'a str,
    finished: &'a str,
    outputs: &'a str,
    trace: &'a str,
    err_code: &'a str,
    err_kind: &'a str,
    err_msg: &'a str,
    rank_encoder: &'a str,
    rank_dit: &'a str,
    rank_decoder: &'a str,
    attempts: &'a str,
    cancel: &'a str,
}

impl<'a> Fields<'a> {
    fn of(pairs: &[(&'a str, &'a str)]) -> Self {
        let mut f = Fields::default();
        for &(k, v) in pairs {
            let slot = match k {
                "id" => &mut f.id,
                "resource" => &mut f.resource,
                "spec" => &mut f.spec,
                "status" => &mut f.status,
                "stage" => &mut f.stage,
                "progress" => &mut f.progress,
                "step" => &mut f.step,
                "total" => &mut f.total,
                "finished" => &mut f.finished,
                "outputs" => &mut f.outputs,
                "trace" => &mut f.trace,
                "err_code" => &mut f.err_code,
                "err_kind" => &mut f.err_kind,
                "err_msg" => &mut f.err_msg,
                "rank_encoder" => &mut f.rank_encoder,
                "rank_dit" => &mut f.rank_dit,
                "rank_decoder" => &mut f.rank_decoder,
                "attempts" => &mut f.attempts,
                "cancel" => &mut f.cancel,
                _ => continue,
            };
            *slot = v;
        }
        f
    }
}

/// The record a job hash holds.
pub fn record_from_fields(pairs: &[(&str, &str)]) -> Result<JobRecord, QueueError> {
    let h = Fields::of(pairs);
    let corrupt = |message: String| corrupt(h.id, message);
    let id: x2v_core::JobId = h.id.parse().map_err(|e| corrupt(format!("id: {e}")))?;
    let spec = serde_json::from_str(h.spec).map_err(|e| corrupt(format!("spec: {e}")))?;
    let status =
        JobStatus::parse(h.status).ok_or_else(|| corrupt(format!("status `{}`", h.status)))?;
    let stage = Some(h.stage)
        .filter(|s| !s.is_empty())
        .map(str::parse::<Stage>)
        .transpose()
        .map_err(corrupt)?;
    let num = |s: &str| s.parse::<u64>().unwrap_or(0);
    let rank = |s: &str| s.parse::<u32>().ok();
    // Lua's cjson writes an empty array as `{}`.
    let outputs: Vec<OutputRef> = if h.outputs.is_empty() || h.outputs == "{}" {
        Vec::new()
    } else {
        serde_json::from_str(h.outputs).map_err(|e| corrupt(format!("outputs: {e}")))?
    };
    let trace: HashMap<String, String> = if h.trace.is_empty() || h.trace == "{}" {
        HashMap::new()
    } else {
        serde_json::from_str(h.trace).unwrap_or_default()
    };
    let error = (!h.err_code.is_empty()).then(|| {
        JobError::stored(
            h.err_code,
            Some(h.err_kind).filter(|k| !k.is_empty()),
            h.err_msg.to_owned(),
        )
    });
    Ok(JobRecord {
        id,
        resource: [Resource::Video, Resource::Image]
            .into_iter()
            .find(|r| r.as_str() == h.resource)
            .ok_or_else(|| corrupt(format!("resource `{}`", h.resource)))?,
        spec,
        status,
        stage,
        progress: num(h.progress).min(100) as u8,
        step: num(h.step) as u32,
        total_steps: num(h.total) as u32,
        created_at_ms: id.timestamp_ms(),
        finished_at_ms: (!h.finished.is_empty()).then(|| num(h.finished)),
        error,
        outputs,
        ranks: Ranks {
            encoder: rank(h.rank_encoder),
            dit: rank(h.rank_dit),
            decoder: rank(h.rank_decoder),
        },
        trace,
        attempts: num(h.attempts) as u32,
        cancel_requested: h.cancel == "1",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_hash_reads_the_same_as_pairs_or_a_map_in_any_order() {
        let id = x2v_core::JobId::new().to_string();
        let spec = r#"{"model":"m","task":"t2v","prompt":"p","negative_prompt":null,"size":"8x8","num_frames":5,"fps":4,"seconds":1,"num_inference_steps":2,"guidance_scale":1.0,"shift":1.0,"seed":3,"n":1,"output_format":"mp4","output_compression":null,"inputs":[],"pins":{"encoder":null,"dit":null,"decoder":null},"remixed_from":null}"#;
        let fields = [
            ("status", "in_progress"),
            ("unknown", "ignored"),
            ("rank_dit", "2"),
            ("spec", spec),
            ("id", id.as_str()),
            ("resource", "video"),
            ("stage", "dit"),
            ("progress", "40"),
            ("outputs", "{}"),
            ("trace", "{}"),
            ("err_code", ""),
            ("deleted", "0"),
        ];
        let array = Value::Array(fields.iter().flat_map(|(k, v)| [bulk(k), bulk(v)]).collect());
        let map = Value::Map(fields.iter().map(|(k, v)| (bulk(k), bulk(v))).collect());
        let a = record_from_fields(&hash_fields(&array).unwrap()).unwrap();
        let b = record_from_fields(&hash_fields(&map).unwrap()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.id.to_string(), id);
        assert_eq!((a.status, a.stage, a.progress), (JobStatus::InProgress, Some(Stage::Dit), 40));
        assert_eq!((a.ranks.dit, a.ranks.encoder, a.error), (Some(2), None, None));
        assert!(a.outputs.is_empty() && a.trace.is_empty());
        assert!(!is_deleted(&hash_fields(&array).unwrap()));
        let tombstone = [("deleted", "1")];
        assert!(is_deleted(&tombstone));
        assert!(hash_fields(&Value::Nil).unwrap().is_empty());
        let bad = [("id", id.as_str()), ("spec", spec), ("status", "lost"), ("resource", "video")];
        assert!(matches!(record_from_fields(&bad), Err(QueueError::Corrupt { .. })));
    }
}
