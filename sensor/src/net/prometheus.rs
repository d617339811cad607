//! The Prometheus exposition both `/metrics` endpoints serve (the agent's and the collector's):
//! families are gathered from state once per scrape, then prometheus-client encodes them in the
//! text format 0.0.4 (escaping, `_total` suffixes, HELP and TYPE lines are its).
//!
//! The values live in the agent's and the collector's own state, not in prometheus-client's
//! metric types: a scrape reads them under the state lock, and a per-client series exists only
//! while its client is in the top N. So each scrape registers one collector holding what it
//! gathered, in the order it was gathered (heaviest client first).

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

/// The content type of what `Exposition::encode` writes (text format 0.0.4, which Prometheus
/// and `promtool check metrics` read).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Labels of a sample without labels.
pub const NO_LABELS: [(&str, &str); 0] = [];

/// A sample's value: counts are integers, times are seconds with a fraction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Self::Int(v)
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Self::Int(v as u64)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
struct Family {
    /// Without the `_total` of a counter: the encoder appends it.
    name: String,
    help: String,
    kind: MetricType,
    samples: Vec<(Labels, Value)>,
}

/// One scrape's families, in the order they are added.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    /// A counter family; `name` ends in `_total`. Nothing is written for a family without
    /// samples (no HELP or TYPE either).
    pub fn counter<'a, L, V>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) where
        L: AsRef<[(&'static str, &'a str)]>,
        V: Into<Value>,
    {
        debug_assert!(name.ends_with("_total"), "counter {name}");
        let base = name.strip_suffix("_total").unwrap_or(name);
        self.family(base, help, MetricType::Counter, samples);
    }

    /// A gauge family; like `counter`.
    pub fn gauge<'a, L, V>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) where
        L: AsRef<[(&'static str, &'a str)]>,
        V: Into<Value>,
    {
        debug_assert!(!name.ends_with("_total"), "gauge {name}");
        self.family(name, help, MetricType::Gauge, samples);
    }

    fn family<'a, L, V>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        samples: impl IntoIterator<Item = (L, V)>,
    ) where
        L: AsRef<[(&'static str, &'a str)]>,
        V: Into<Value>,
    {
        let samples: Vec<(Labels, Value)> = samples
            .into_iter()
            .map(|(labels, value)| {
                let labels = labels
                    .as_ref()
                    .iter()
                    .map(|(k, v)| (*k, (*v).to_owned()))
                    .collect();
                (labels, value.into())
            })
            .collect();
        if samples.is_empty() {
            return;
        }
        self.families.push(Family {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            samples,
        });
    }

    /// The exposition text (format 0.0.4).
    pub fn encode(self) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.families {
            let mut metric =
                encoder.encode_descriptor(&family.name, &family.help, None, family.kind)?;
            for (labels, value) in &family.samples {
                let sample = metric.encode_family(labels)?;
                match (family.kind, *value) {
                    (MetricType::Counter, Value::Int(v)) => ConstCounter::new(v).encode(sample)?,
                    (MetricType::Counter, Value::Float(v)) => {
                        ConstCounter::new(v).encode(sample)?;
                    }
                    (_, Value::Int(v)) => ConstGauge::new(v).encode(sample)?,
                    (_, Value::Float(v)) => ConstGauge::new(v).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_in_order_with_total_help_and_escaping() {
        let mut e = Exposition::default();
        e.gauge("x_up", "Up.", [(NO_LABELS, 1u64)]);
        e.counter(
            "x_bytes_total",
            "Bytes \\ by\ndirection.",
            [
                ([("direction", "in")], 5u64),
                ([("direction", "a\"b\\c\nd")], 7u64),
            ],
        );
        e.counter(
            "x_empty_total",
            "Never written.",
            Vec::<([(&str, &str); 0], u64)>::new(),
        );
        e.gauge("x_time_seconds", "A time.", [(NO_LABELS, 1.5f64)]);
        assert_eq!(
            e.encode().expect("encode"),
            "# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n\
             # HELP x_bytes_total Bytes \\\\ by\\ndirection.\n# TYPE x_bytes_total counter\n\
             x_bytes_total{direction=\"in\"} 5\nx_bytes_total{direction=\"a\\\"b\\\\c\\nd\"} 7\n\
             # HELP x_time_seconds A time.\n# TYPE x_time_seconds gauge\nx_time_seconds 1.5\n"
        );
    }
}
