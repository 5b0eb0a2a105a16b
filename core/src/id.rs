//! Job ids: UUIDv7, so ids sort by creation time both as bytes and as their hex text.
//!
//! The text form is 32 lowercase hex digits, optionally behind a resource prefix such as `video_`
//! (the shape OpenAI clients expect). Within one process ids are strictly increasing even when many
//! are made in the same millisecond (the `uuid` crate keeps a monotonic counter in the random bits).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// A time-ordered job identifier.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(Uuid);

/// Why a string is not a job id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseJobIdError {
    /// The string does not carry the expected resource prefix.
    #[error("id `{given}` does not start with `{expected}_`")]
    Prefix { expected: String, given: String },
    /// The body is not 32 hex digits of a version-7 UUID.
    #[error("`{0}` is not a valid x2v id (expected 32 lowercase hex digits of a UUIDv7)")]
    Body(String),
}

impl JobId {
    /// A new id, later than every id made before it in this process.
    pub fn new() -> Self {
        JobId(Uuid::now_v7())
    }

    /// Milliseconds since the Unix epoch at which this id was made.
    pub fn timestamp_ms(&self) -> u64 {
        let (secs, nanos) = self.0.get_timestamp().expect("v7 ids carry a timestamp").to_unix();
        secs * 1000 + u64::from(nanos) / 1_000_000
    }

    /// The id as `{prefix}_{hex}`, e.g. `video_0190f...`.
    pub fn with_prefix(&self, prefix: &str) -> String {
        format!("{prefix}_{self}")
    }

    /// Parses `{prefix}_{hex}`; the prefix must match exactly.
    pub fn parse_prefixed(s: &str, prefix: &str) -> Result<Self, ParseJobIdError> {
        let body =
            s.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('_')).ok_or_else(|| {
                ParseJobIdError::Prefix { expected: prefix.to_owned(), given: s.to_owned() }
            })?;
        body.parse()
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.simple())
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

impl FromStr for JobId {
    type Err = ParseJobIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let well_formed =
            s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let uuid = well_formed.then(|| Uuid::parse_str(s).ok()).flatten();
        match uuid {
            Some(u) if u.get_version_num() == 7 => Ok(JobId(u)),
            _ => Err(ParseJobIdError::Body(s.to_owned())),
        }
    }
}

impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_in_text_and_value_order() {
        let ids: Vec<JobId> = (0..10_000).map(|_| JobId::new()).collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} !< {}", pair[0], pair[1]);
            assert!(pair[0].to_string() < pair[1].to_string());
        }
    }

    #[test]
    fn text_round_trip_and_prefix() {
        let id = JobId::new();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<JobId>().unwrap(), id);
        let prefixed = id.with_prefix("video");
        assert!(prefixed.starts_with("video_"));
        assert_eq!(JobId::parse_prefixed(&prefixed, "video").unwrap(), id);
        assert!(matches!(
            JobId::parse_prefixed(&prefixed, "img"),
            Err(ParseJobIdError::Prefix { .. })
        ));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<JobId>(&json).unwrap(), id);
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "xyz",
            "0190F3A0B1C27D4E8F9A0B1C2D3E4F50",
            &"0".repeat(32),
            "9f1c3e0a7b2d4c8e9f1c3e0a7b2d4c8e",
        ] {
            assert!(bad.parse::<JobId>().is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn timestamp_is_now() {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
                as u64;
        let ts = JobId::new().timestamp_ms();
        assert!(ts.abs_diff(now) < 5_000, "ts {ts} now {now}");
    }
}
