//! Conversion between the Redis job hash and [`JobRecord`].

use std::collections::HashMap;

use redis::Value;

use crate::error::QueueError;
use crate::record::{JobError, JobRecord, JobStatus, OutputRef};
use crate::spec::{Ranks, Stage};

/// A flat `[field, value, ...]` reply as a map.
pub fn values_to_map(items: &[Value]) -> Result<HashMap<String, String>, QueueError> {
    let mut map = HashMap::with_capacity(items.len() / 2);
    for pair in items.chunks(2) {
        if let [k, v] = pair {
            map.insert(redis::from_redis_value_ref(k)?, redis::from_redis_value_ref(v)?);
        }
    }
    Ok(map)
}

pub fn record_from_hash(mut h: HashMap<String, String>) -> Result<JobRecord, QueueError> {
    let id_text = h.get("id").cloned().unwrap_or_default();
    let corrupt = |message: String| QueueError::Corrupt { id: id_text.clone(), message };
    let mut take = |k: &str| h.remove(k).unwrap_or_default();
    let id = take("id").parse().map_err(|e| corrupt(format!("id: {e}")))?;
    let spec = serde_json::from_str(&take("spec")).map_err(|e| corrupt(format!("spec: {e}")))?;
    let status_text = take("status");
    let status =
        JobStatus::parse(&status_text).ok_or_else(|| corrupt(format!("status `{status_text}`")))?;
    let stage = Some(take("stage"))
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<Stage>())
        .transpose()
        .map_err(corrupt)?;
    let num = |s: String| s.parse::<u64>().unwrap_or(0);
    let rank = |s: String| s.parse::<u32>().ok();
    let outputs_text = take("outputs");
    // Lua's cjson writes an empty array as `{}`.
    let outputs: Vec<OutputRef> = if outputs_text.is_empty() || outputs_text == "{}" {
        Vec::new()
    } else {
        serde_json::from_str(&outputs_text).map_err(|e| corrupt(format!("outputs: {e}")))?
    };
    let trace: HashMap<String, String> = serde_json::from_str(&take("trace")).unwrap_or_default();
    let code = take("err_code");
    let kind = take("err_kind");
    let error = (!code.is_empty()).then(|| {
        JobError::stored(&code, Some(kind.as_str()).filter(|k| !k.is_empty()), take("err_msg"))
    });
    let finished = take("finished");
    Ok(JobRecord {
        id,
        resource: serde_json::from_value(serde_json::Value::String(take("resource")))
            .map_err(|e| corrupt(format!("resource: {e}")))?,
        spec,
        status,
        stage,
        progress: num(take("progress")).min(100) as u8,
        step: num(take("step")) as u32,
        total_steps: num(take("total")) as u32,
        created_at_ms: 0,
        finished_at_ms: (!finished.is_empty()).then(|| num(finished)),
        error,
        outputs,
        ranks: Ranks {
            encoder: rank(take("rank_encoder")),
            dit: rank(take("rank_dit")),
            decoder: rank(take("rank_decoder")),
        },
        trace,
        attempts: num(take("attempts")) as u32,
        cancel_requested: take("cancel") == "1",
    })
    .map(|mut r: JobRecord| {
        r.created_at_ms = r.id.timestamp_ms();
        r
    })
}
