//! A Prometheus registry per service, with the service's constant labels, and the text exposition
//! every `/metrics` endpoint serves.

use std::collections::HashMap;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds, from 1 ms to about 30 minutes (a long video denoise).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0,
];

/// Metrics registry of one service: every metric is named `x2v_<name>` and labelled `service=<name>`.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// A registry whose metrics all carry `service=<service>` plus `extra` constant labels.
    pub fn new(service: &str, extra: &[(&str, &str)]) -> Self {
        let mut labels: HashMap<String, String> =
            extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        labels.insert("service".into(), service.into());
        let registry = Registry::new_custom(Some("x2v".into()), Some(labels))
            .expect("the x2v prefix is a valid name");
        Metrics { registry }
    }

    /// The underlying registry, for metric types these helpers do not cover.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Registers a counter family; panics on a duplicate or invalid name (a programming error).
    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c =
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter definition");
        self.registry.register(Box::new(c.clone())).expect("counter registered once");
        c
    }

    /// Registers a gauge family.
    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge definition");
        self.registry.register(Box::new(g.clone())).expect("gauge registered once");
        g
    }

    /// Registers a histogram family with [`LATENCY_BUCKETS`] unless `buckets` is given.
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: Option<Vec<f64>>,
    ) -> HistogramVec {
        let opts = HistogramOpts::new(name, help)
            .buckets(buckets.unwrap_or_else(|| LATENCY_BUCKETS.to_vec()));
        let h = HistogramVec::new(opts, labels).expect("valid histogram definition");
        self.registry.register(Box::new(h.clone())).expect("histogram registered once");
        h
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    /// The `Content-Type` of [`Metrics::encode`]'s output.
    pub fn content_type() -> &'static str {
        prometheus::TEXT_FORMAT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_carries_prefix_and_labels() {
        let m = Metrics::new("gateway", &[("rank", "0")]);
        let jobs = m.counter("jobs_total", "Jobs by outcome.", &["outcome"]);
        let lat = m.histogram("stage_seconds", "Stage latency.", &["stage"], None);
        let depth = m.gauge("queue_depth", "Queued jobs.", &["stage"]);
        jobs.with_label_values(&["completed"]).inc_by(3);
        lat.with_label_values(&["dit"]).observe(0.2);
        depth.with_label_values(&["encoder"]).set(7);
        let text = m.encode();
        assert!(
            has_sample(
                &text,
                "x2v_jobs_total",
                &["outcome=\"completed\"", "rank=\"0\"", "service=\"gateway\""],
                "3"
            ),
            "{text}"
        );
        assert!(
            has_sample(
                &text,
                "x2v_queue_depth",
                &["stage=\"encoder\"", "service=\"gateway\""],
                "7"
            ),
            "{text}"
        );
        assert!(
            has_sample(&text, "x2v_stage_seconds_bucket", &["stage=\"dit\"", "le=\"0.25\""], "1"),
            "{text}"
        );
        assert!(
            has_sample(&text, "x2v_stage_seconds_bucket", &["stage=\"dit\"", "le=\"0.1\""], "0"),
            "{text}"
        );
    }

    /// Whether `text` has a sample of `name` carrying every label in `labels` (in any order) and `value`.
    fn has_sample(text: &str, name: &str, labels: &[&str], value: &str) -> bool {
        text.lines().any(|line| {
            let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
                return false;
            };
            let Some((label_text, sample)) = rest.split_once("} ") else { return false };
            let present: Vec<&str> = label_text.split(',').collect();
            sample == value && labels.iter().all(|l| present.contains(l))
        })
    }

    #[test]
    #[should_panic(expected = "registered once")]
    fn duplicate_names_are_programming_errors() {
        let m = Metrics::new("x", &[]);
        m.counter("a", "a", &[]);
        m.counter("a", "a", &[]);
    }
}
