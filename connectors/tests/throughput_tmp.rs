use std::sync::Arc;
use std::time::Instant;

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use weir_connectors::DeadLetterQueue;
use weir_connectors::decode::{DecodeOptions, JsonDecoder};

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("sensor", DataType::Utf8, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
        Field::new("v", DataType::Float64, true),
    ]))
}

#[test]
#[ignore]
fn throughput() {
    // single samples
    let mut lines = Vec::new();
    let n = 2_000_000;
    for i in 0..n {
        let line = format!(
            "{{\"sensor\":\"s{:04}\",\"ts\":\"2024-01-01T00:00:{:02}.{:03}Z\",\"v\":{:?}}}",
            i % 100,
            (i / 1000) % 60,
            i % 1000,
            (i as f64 * 0.37).sin()
        );
        lines.push(line);
    }
    let mut decoder = JsonDecoder::new(schema(), Some("ts"), DecodeOptions::default()).unwrap();
    for _ in 0..2 {
        let t = Instant::now();
        let mut rows = 0;
        for line in &lines {
            rows += decoder.decode_record(line.as_bytes()).unwrap();
            if decoder.len() >= 8192 {
                decoder.flush().unwrap();
            }
        }
        decoder.flush().unwrap();
        let el = t.elapsed().as_secs_f64();
        println!(
            "single: {rows} rows in {el:.3}s = {:.2} M rec/s",
            rows as f64 / el / 1e6
        );
    }
    // epoch ms single
    let lines2: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{{\"sensor\":\"s{:04}\",\"ts\":{},\"v\":{:?}}}",
                i % 100,
                1704067200000i64 + i as i64,
                (i as f64 * 0.37).sin()
            )
        })
        .collect();
    let t = Instant::now();
    let mut rows = 0;
    for line in &lines2 {
        rows += decoder.decode_record(line.as_bytes()).unwrap();
        if decoder.len() >= 8192 {
            decoder.flush().unwrap();
        }
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "single epoch: {rows} rows in {el:.3}s = {:.2} M rec/s",
        rows as f64 / el / 1e6
    );

    // blocks
    let blocks: Vec<String> = (0..100_000)
        .map(|b| {
            let samples: Vec<String> = (0..100).map(|i| format!("{:?}", ((b * 100 + i) as f64 * 0.37).sin())).collect();
            format!("{{\"sensor\":\"s{:04}\",\"t0\":\"2024-01-01T00:00:00Z\",\"rate_hz\":1000,\"samples\":[{}]}}", b % 100, samples.join(","))
        })
        .collect();
    for _ in 0..2 {
        let t = Instant::now();
        let mut rows = 0;
        for line in &blocks {
            rows += decoder.decode_record(line.as_bytes()).unwrap();
            if decoder.len() >= 8192 {
                decoder.flush().unwrap();
            }
        }
        decoder.flush().unwrap();
        let el = t.elapsed().as_secs_f64();
        println!(
            "blocks: {rows} samples in {el:.3}s = {:.2} M samples/s",
            rows as f64 / el / 1e6
        );
    }
    let blocks: Vec<String> = (0..100_000)
        .map(|b| {
            let samples: Vec<String> = (0..100).map(|i| format!("{:.4}", ((b * 100 + i) as f64 * 0.37).sin())).collect();
            format!("{{\"sensor\":\"s{:04}\",\"t0\":\"2024-01-01T00:00:00Z\",\"rate_hz\":1000,\"samples\":[{}]}}", b % 100, samples.join(","))
        })
        .collect();
    for _ in 0..2 {
        let t = Instant::now();
        let mut rows = 0;
        for line in &blocks {
            rows += decoder.decode_record(line.as_bytes()).unwrap();
            if decoder.len() >= 8192 {
                decoder.flush().unwrap();
            }
        }
        decoder.flush().unwrap();
        let el = t.elapsed().as_secs_f64();
        println!(
            "blocks 4 digits: {rows} samples in {el:.3}s = {:.2} M samples/s",
            rows as f64 / el / 1e6
        );
    }
    let dlq = DeadLetterQueue::default();
    let joined = lines.join("\n");
    let t = Instant::now();
    let rows = decoder.decode_lines(joined.as_bytes(), "x", &dlq);
    let el = t.elapsed().as_secs_f64();
    println!(
        "lines: {rows} in {el:.3}s = {:.2} M rec/s",
        rows as f64 / el / 1e6
    );
}

#[test]
#[ignore]
fn single_only() {
    let lines: Vec<String> = (0..100_000)
        .map(|i| {
            format!(
                "{{\"sensor\":\"s{:04}\",\"ts\":\"2024-01-01T00:00:{:02}.{:03}Z\",\"v\":{:?}}}",
                i % 100,
                (i / 1000) % 60,
                i % 1000,
                (i as f64 * 0.37).sin()
            )
        })
        .collect();
    let mut decoder = JsonDecoder::new(schema(), Some("ts"), DecodeOptions::default()).unwrap();
    let t = Instant::now();
    let mut rows = 0;
    for _ in 0..100 {
        for line in &lines {
            rows += decoder.decode_record(line.as_bytes()).unwrap();
            if decoder.len() >= 8192 {
                decoder.flush().unwrap();
            }
        }
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "single only: {rows} rows in {el:.3}s = {:.2} M rec/s",
        rows as f64 / el / 1e6
    );
}

#[test]
#[ignore]
fn blocks_only() {
    let blocks: Vec<String> = (0..10_000)
        .map(|b| {
            let samples: Vec<String> = (0..100).map(|i| format!("{:?}", ((b * 100 + i) as f64 * 0.37).sin())).collect();
            format!("{{\"sensor\":\"s{:04}\",\"t0\":\"2024-01-01T00:00:00Z\",\"rate_hz\":1000,\"samples\":[{}]}}", b % 100, samples.join(","))
        })
        .collect();
    let mut decoder = JsonDecoder::new(schema(), Some("ts"), DecodeOptions::default()).unwrap();
    let t = Instant::now();
    let mut rows = 0;
    for _ in 0..50 {
        for line in &blocks {
            rows += decoder.decode_record(line.as_bytes()).unwrap();
            if decoder.len() >= 8192 {
                decoder.flush().unwrap();
            }
        }
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "blocks only: {rows} rows in {el:.3}s = {:.2} M samples/s",
        rows as f64 / el / 1e6
    );
}

#[tokio::test(flavor = "current_thread")]
#[ignore]
async fn simulator_speed() {
    use weir_connectors::simulator::{SimulatorConfig, SimulatorPayload, SimulatorSource};
    use weir_connectors::{Source, SourceEvent};
    for payload in [
        SimulatorPayload::Arrow,
        SimulatorPayload::Json,
        SimulatorPayload::JsonBlocks,
    ] {
        let config = SimulatorConfig {
            sensors: 100,
            duration_s: Some(20.0),
            payload,
            ..SimulatorConfig::default()
        };
        let mut source =
            SimulatorSource::new(config, schema(), Some("ts"), DeadLetterQueue::default()).unwrap();
        let t = Instant::now();
        let mut rows = 0;
        while let SourceEvent::Batch(b) = source.next_event().await.unwrap() {
            rows += b.num_rows();
        }
        let el = t.elapsed().as_secs_f64();
        println!(
            "simulator {payload:?}: {rows} rows in {el:.3}s = {:.2} M rows/s",
            rows as f64 / el / 1e6
        );
    }
}
