//! `GET /metrics`: the gateway's counters in the OpenMetrics text format Prometheus scrapes.
//!
//! The engine and connectors keep their own atomic counters; a scrape reads them into a fresh
//! prometheus-client registry and encodes it, so nothing on the data path knows about
//! Prometheus.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use weir_connectors::mqtt::MqttStats;

use weir_proto::cloud::StreamStatus;

use crate::deploy::PipelineStatus;

type Labels = Vec<(&'static str, String)>;

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge_family(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<Labels, Gauge<f64, AtomicU64>> {
    let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    registry.register(name, help, family.clone());
    family
}

/// Renders every metric of the gateway.
pub fn render(
    gateway: &str,
    uptime_s: f64,
    pipelines: &[PipelineStatus],
    dead_letters: &[(String, Vec<(String, u64)>)],
    uplink: &[StreamStatus],
) -> String {
    let mut registry = Registry::with_prefix("weir");
    let info = gauge_family(
        &mut registry,
        "gateway_info",
        "The gateway's name and version",
    );
    info.get_or_create(&vec![
        ("gateway", gateway.to_owned()),
        ("version", env!("CARGO_PKG_VERSION").to_owned()),
    ])
    .set(1.0);
    let uptime = gauge_family(
        &mut registry,
        "gateway_uptime_seconds",
        "Seconds since start",
    );
    uptime.get_or_create(&Vec::new()).set(uptime_s);

    let up = gauge_family(
        &mut registry,
        "pipeline_running",
        "1 while the pipeline runs, 0 while it restarts, failed or stopped",
    );
    let version = gauge_family(&mut registry, "pipeline_version", "Deployed version");
    let rows_in = counter_family(
        &mut registry,
        "pipeline_rows_in",
        "Rows produced by the source",
    );
    let rows_out = counter_family(
        &mut registry,
        "pipeline_rows_out",
        "Rows written by the sink",
    );
    let late = counter_family(
        &mut registry,
        "pipeline_late_rows",
        "Rows later than the watermark, dropped",
    );
    let invalid = counter_family(
        &mut registry,
        "pipeline_invalid_rows",
        "Rows with a NULL or out-of-range event time",
    );
    let errors = counter_family(
        &mut registry,
        "pipeline_errors",
        "Rows whose expressions failed to evaluate (dead-lettered)",
    );
    let restarts = counter_family(
        &mut registry,
        "pipeline_restarts",
        "Restarts after a failure",
    );
    let latency = gauge_family(
        &mut registry,
        "pipeline_latency_seconds",
        "Latency quantiles: source_to_sink (batch produced to result written) and \
         watermark_to_emit (window closed to result emitted)",
    );
    let checkpoints = counter_family(
        &mut registry,
        "pipeline_checkpoints",
        "Checkpoints committed (state, source position and cloud-sink results in one write)",
    );
    let stage_rows_in = counter_family(&mut registry, "stage_rows_in", "Rows into a stage");
    let stage_rows_out = counter_family(&mut registry, "stage_rows_out", "Rows out of a stage");
    let mailbox = gauge_family(
        &mut registry,
        "stage_mailbox_depth",
        "Messages waiting for a stage (backpressure shows here first)",
    );
    for p in pipelines {
        let labels = vec![("pipeline", p.name.clone())];
        up.get_or_create(&labels)
            .set(if p.state == "running" { 1.0 } else { 0.0 });
        version.get_or_create(&labels).set(p.version as f64);
        rows_in.get_or_create(&labels).inc_by(p.rows_in);
        rows_out.get_or_create(&labels).inc_by(p.rows_out);
        late.get_or_create(&labels).inc_by(p.late_rows);
        invalid.get_or_create(&labels).inc_by(p.invalid_rows);
        errors.get_or_create(&labels).inc_by(p.errors);
        restarts.get_or_create(&labels).inc_by(p.restarts);
        checkpoints.get_or_create(&labels).inc_by(p.checkpoints);
        for (path, summary) in [
            ("source_to_sink", &p.source_to_sink),
            ("watermark_to_emit", &p.watermark_to_emit),
        ] {
            if summary.count == 0 {
                continue;
            }
            for (quantile, ms) in [("0.5", summary.p50_ms), ("0.99", summary.p99_ms)] {
                latency
                    .get_or_create(&vec![
                        ("pipeline", p.name.clone()),
                        ("path", path.to_owned()),
                        ("quantile", quantile.to_owned()),
                    ])
                    .set(ms / 1000.0);
            }
        }
        for stage in &p.stages {
            let labels = vec![("pipeline", p.name.clone()), ("stage", stage.name.clone())];
            stage_rows_in.get_or_create(&labels).inc_by(stage.rows_in);
            stage_rows_out.get_or_create(&labels).inc_by(stage.rows_out);
            mailbox
                .get_or_create(&labels)
                .set(stage.mailbox_depth as f64);
        }
    }

    let letters = counter_family(
        &mut registry,
        "dead_letters",
        "Records rejected with a reason (malformed payloads, failed expressions)",
    );
    for (pipeline, reasons) in dead_letters {
        for (reason, count) in reasons {
            letters
                .get_or_create(&vec![
                    ("pipeline", pipeline.clone()),
                    ("reason", reason.clone()),
                ])
                .inc_by(*count);
        }
    }

    let mqtt_up = gauge_family(
        &mut registry,
        "mqtt_connected",
        "1 while connected to the broker",
    );
    let mqtt_messages = counter_family(
        &mut registry,
        "mqtt_messages",
        "Messages received (sources) or published (sinks)",
    );
    let mqtt_rejected = counter_family(
        &mut registry,
        "mqtt_rejected",
        "Records dead-lettered (sources) or messages not published (sinks)",
    );
    let mqtt_failures = counter_family(
        &mut registry,
        "mqtt_connection_failures",
        "Failed connection attempts and lost connections",
    );
    let mqtt_connects = counter_family(&mut registry, "mqtt_connects", "Successful connections");
    let mqtt_rebirths = counter_family(
        &mut registry,
        "mqtt_sparkplug_rebirth_requests",
        "Sparkplug rebirth requests (NCMD) sent to edge nodes",
    );
    let mqtt_redelivered = counter_family(
        &mut registry,
        "mqtt_redelivered",
        "Messages the broker sent again after a reconnect that the source already held, dropped",
    );
    let mqtt_writes = counter_family(
        &mut registry,
        "mqtt_socket_writes",
        "Socket writes that carried published messages (sink); messages / writes is the batching",
    );
    let mqtt_reads = counter_family(
        &mut registry,
        "mqtt_socket_reads",
        "Socket reads that handed received messages to the source; messages / reads is the batching",
    );
    for (client, stats) in MqttStats::all() {
        let labels = vec![("connector", client)];
        mqtt_up
            .get_or_create(&labels)
            .set(MqttStats::get(&stats.up) as f64);
        mqtt_messages
            .get_or_create(&labels)
            .inc_by(MqttStats::get(&stats.messages));
        mqtt_rejected
            .get_or_create(&labels)
            .inc_by(MqttStats::get(&stats.rejected));
        mqtt_failures
            .get_or_create(&labels)
            .inc_by(MqttStats::get(&stats.connect_failures));
        mqtt_connects
            .get_or_create(&labels)
            .inc_by(MqttStats::get(&stats.connects));
        mqtt_rebirths
            .get_or_create(&labels)
            .inc_by(MqttStats::get(&stats.rebirths));
        mqtt_redelivered
            .get_or_create(&labels)
            .inc_by(MqttStats::get(&stats.redelivered));
        mqtt_writes
            .get_or_create(&labels)
            .inc_by(MqttStats::get(&stats.writes));
        mqtt_reads
            .get_or_create(&labels)
            .inc_by(MqttStats::get(&stats.reads));
    }

    let pending = gauge_family(
        &mut registry,
        "uplink_pending_batches",
        "Result batches on disk not yet stored by the cloud",
    );
    let pending_bytes = gauge_family(
        &mut registry,
        "uplink_pending_bytes",
        "Bytes on disk not yet stored by the cloud",
    );
    let oldest = gauge_family(
        &mut registry,
        "uplink_oldest_pending_seconds",
        "Age of the oldest batch not yet stored by the cloud",
    );
    let lost = counter_family(
        &mut registry,
        "uplink_dropped_batches",
        "Batches a full budget cost: dropped_oldest, refused_newest or expired",
    );
    let merged = counter_family(
        &mut registry,
        "uplink_merged_batches",
        "Batches merged into coarser windows to fit the budget",
    );
    for s in uplink {
        let labels = vec![("stream", s.stream.clone())];
        pending.get_or_create(&labels).set(s.pending as f64);
        pending_bytes
            .get_or_create(&labels)
            .set(s.pending_bytes as f64);
        oldest
            .get_or_create(&labels)
            .set(s.oldest_pending_age_ms as f64 / 1000.0);
        merged.get_or_create(&labels).inc_by(s.merged);
        for (reason, count) in [
            ("dropped_oldest", s.dropped_oldest),
            ("refused_newest", s.refused_newest),
            ("expired", s.expired),
        ] {
            lost.get_or_create(&vec![
                ("stream", s.stream.clone()),
                ("reason", reason.to_owned()),
            ])
            .inc_by(count);
        }
    }

    let mut text = String::new();
    if let Err(error) = encode(&mut text, &registry) {
        tracing::error!(%error, "cannot encode metrics");
    }
    text
}
