//! `weir bench --scenario uplink-drain`: how fast a backlog leaves the gateway.
//!
//! A cloud runs in this process. A gateway's uplink store is filled with the backlog of an
//! outage (one batch of 1-second RMS windows per second and sensor group), then the real
//! sender drains it over gRPC, unpaced, until the cloud has stored and acknowledged every
//! batch. The cloud's stored row count is checked against what was queued.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray, TimestampNanosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use weir_cloud::CloudConfig;
use weir_connectors::cloud::{Overflow, StreamPriority, StreamSpec};
use weir_engine::uplink::UplinkStore;
use weir_gateway::uplink::{SenderOptions, run_sender};

#[derive(Debug, Serialize)]
pub struct DrainResult {
    pub scenario: String,
    pub batches: u64,
    pub rows: u64,
    pub megabytes: f64,
    pub seconds: f64,
    pub rows_per_sec: f64,
    pub megabytes_per_sec: f64,
    pub correct: bool,
}

/// One second of windows for `sensors` sensors.
fn second(at: i64, sensors: usize) -> anyhow::Result<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("sensor", DataType::Utf8, false),
        Field::new(
            "window_start",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        ),
        Field::new("rms", DataType::Float64, true),
        Field::new("samples", DataType::Int64, false),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(
                (0..sensors).map(|s| format!("s{s:04}")).collect::<Vec<_>>(),
            )),
            Arc::new(TimestampNanosecondArray::from(vec![
                at * 1_000_000_000;
                sensors
            ])),
            Arc::new(Float64Array::from(
                (0..sensors).map(|s| s as f64 * 0.001).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(vec![1000; sensors])),
        ],
    )?)
}

/// A backlog of `seconds` seconds of `sensors` sensors' windows.
pub fn run(seconds: u64, sensors: usize) -> anyhow::Result<DrainResult> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let dir = tempfile::tempdir()?;
    let (cloud, admin) = crate::cloud::in_process(
        &runtime,
        &dir.path().join("cloud"),
        CloudConfig::default().heartbeat_interval,
    )?;
    let (_, token) = cloud
        .fleet()
        .add_gateway(&admin, "drain-gw", Default::default())?;
    let credential = cloud.fleet().enroll(&token, "bench")?.credential;

    let store = UplinkStore::open(&dir.path().join("uplink"))?;
    let queue = store.open_stream(&StreamSpec {
        name: "drain_rms".into(),
        priority: StreamPriority::Bulk,
        max_bytes: 8 << 30,
        max_age: Duration::from_secs(30 * 24 * 3600),
        overflow: Overflow::DropNewest,
        reaggregate: None,
    })?;
    for at in 0..seconds {
        queue.append(&second(at as i64, sensors)?)?;
    }
    let queued = queue.stats();
    let rows = seconds * sensors as u64;

    let url = format!("http://{}", cloud.address());
    let outcome = runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url)?
            .connect()
            .await?;
        let bearer = format!("Bearer {credential}").parse()?;
        let stop = CancellationToken::new();
        let options = SenderOptions {
            drain_rate: u64::MAX / 2,
            ..SenderOptions::default()
        };
        let started = Instant::now();
        let sender = tokio::spawn(run_sender(
            channel,
            bearer,
            store.clone(),
            options,
            stop.clone(),
        ));
        let deadline = started + Duration::from_secs(600);
        while queue.stats().pending > 0 {
            if Instant::now() > deadline || sender.is_finished() {
                bail!("the backlog did not drain: {:?}", queue.stats());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = started.elapsed();
        stop.cancel();
        let _ = sender.await;
        let stored = cloud
            .results()
            .query("SELECT count(*) AS n FROM drain_rms")
            .await?;
        let stored = stored
            .first()
            .and_then(|b| {
                arrow::array::cast::AsArray::as_primitive_opt::<arrow::datatypes::Int64Type>(
                    b.column(0),
                )
                .map(|c| c.value(0))
            })
            .unwrap_or(0);
        Ok::<_, anyhow::Error>((elapsed, stored))
    })?;
    let (elapsed, stored) = outcome;
    runtime.block_on(cloud.shutdown());
    let seconds_taken = elapsed.as_secs_f64().max(1e-6);
    let megabytes = queued.pending_bytes as f64 / 1e6;
    Ok(DrainResult {
        scenario: "uplink-drain".into(),
        batches: queued.pending,
        rows,
        megabytes,
        seconds: seconds_taken,
        rows_per_sec: rows as f64 / seconds_taken,
        megabytes_per_sec: megabytes / seconds_taken,
        correct: stored == rows as i64,
    })
}
