//! Prometheus metrics of one agent. Labels are bounded (result, phase), never object names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// Succeeded, Failed or Cancelled.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

pub struct Metrics {
    registry: Registry,
    pub migrations: Family<ResultLabel, Counter>,
    pub phases: Family<PhaseLabel, Counter>,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    pub duration_seconds: Histogram,
    pub downtime_seconds: Histogram,
    pub active_transfers: Gauge,
    pub reconcile_errors: Counter,
    pub step_watches: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ployz");
        let migrations = Family::<ResultLabel, Counter>::default();
        let phases = Family::<PhaseLabel, Counter>::default();
        let bytes_sent = Counter::default();
        let bytes_received = Counter::default();
        // 1 s .. ~9 h
        let duration_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        // 0.1 s .. ~55 min
        let downtime_seconds = Histogram::new(exponential_buckets(0.1, 2.0, 16));
        let active_transfers = Gauge::default();
        let reconcile_errors = Counter::default();
        let step_watches = Gauge::default();
        registry.register(
            "step_watches",
            "Watches open for the waiting steps of migrations this agent drives (pods or claims)",
            step_watches.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and were retried",
            reconcile_errors.clone(),
        );
        registry.register(
            "migrations",
            "Migrations this agent finished as source, by result",
            migrations.clone(),
        );
        registry.register(
            "phase_transitions",
            "Phases entered by migrations this agent drives",
            phases.clone(),
        );
        registry.register(
            "sent_bytes",
            "Stream bytes sent to other machines",
            bytes_sent.clone(),
        );
        registry.register(
            "received_bytes",
            "Stream bytes received from other machines",
            bytes_received.clone(),
        );
        registry.register(
            "migration_duration_seconds",
            "From acceptance to a terminal phase",
            duration_seconds.clone(),
        );
        registry.register(
            "downtime_seconds",
            "Workload downtime of successful migrations (scale-down to Ready on the target)",
            downtime_seconds.clone(),
        );
        registry.register(
            "active_transfers",
            "Volume transfers in flight from this machine",
            active_transfers.clone(),
        );
        Self {
            registry,
            migrations,
            phases,
            bytes_sent,
            bytes_received,
            duration_seconds,
            downtime_seconds,
            active_transfers,
            reconcile_errors,
            step_watches,
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
