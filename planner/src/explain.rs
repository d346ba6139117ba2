//! EXPLAIN for a pipeline plan: the operators, their output schemas and the watermark rule.
//!
//! It is computed from the encoded plan alone, decoding every expression, so printing a plan
//! before and after an encode/decode round trip must give the same text.

use std::fmt::Write;

use arrow::datatypes::DataType;
use datafusion::common::DFSchema;
use weir_operators::ExprDecoder;
use weir_proto::plan::{PipelinePlan, aggregate_output, operator_node, window_aggregate};

pub fn explain(plan: &PipelinePlan) -> String {
    let decoder = ExprDecoder::new();
    let mut out = String::new();
    let _ = writeln!(out, "pipeline {}", plan.name);
    if let Some(source) = &plan.source {
        let connector = source.connector.as_ref();
        let _ = writeln!(
            out,
            "  source {} [connector={} {}]",
            source.name,
            connector.map_or("?", |c| c.name.as_str()),
            connector.map_or("", |c| c.options_json.as_str())
        );
        let _ = writeln!(out, "    schema: {}", schema_text(&decoder, &source.schema));
        match &source.watermark {
            Some(rule) => {
                let _ = writeln!(
                    out,
                    "    watermark: {} (delay {})",
                    rule.display,
                    duration(rule.delay_ns)
                );
            }
            None => {
                let _ = writeln!(out, "    watermark: none (processing order only)");
            }
        }
    }
    for node in &plan.operators {
        let expr = |bytes: &[u8]| match decoder.expr(bytes) {
            Ok(e) => e.human_display().to_string(),
            Err(e) => format!("<{e}>"),
        };
        let _ = write!(out, "  {}", node.id);
        match &node.kind {
            Some(operator_node::Kind::Filter(f)) => {
                let _ = writeln!(out, " WHERE {}", expr(&f.predicate));
            }
            Some(operator_node::Kind::Project(p)) => {
                let items: Vec<String> = p.exprs.iter().map(|e| expr(e)).collect();
                let _ = writeln!(out, " {}", items.join(", "));
            }
            Some(operator_node::Kind::WindowAggregate(w)) => {
                let window = match &w.window {
                    Some(window_aggregate::Window::Tumble(t)) => {
                        format!("TUMBLE(size {})", duration(t.size_ns))
                    }
                    Some(window_aggregate::Window::Hop(h)) => {
                        format!(
                            "HOP(slide {}, size {})",
                            duration(h.slide_ns),
                            duration(h.size_ns)
                        )
                    }
                    None => "<no window>".to_string(),
                };
                let _ = writeln!(out, " {window} ON {}", w.time_column);
                let mut keys = Vec::new();
                let mut aggregates = Vec::new();
                for output in &w.outputs {
                    match &output.kind {
                        Some(aggregate_output::Kind::Key(k)) => keys.push(expr(k)),
                        Some(aggregate_output::Kind::WindowStart(_)) => {
                            keys.push("window_start".into())
                        }
                        Some(aggregate_output::Kind::WindowEnd(_)) => {
                            keys.push("window_end".into())
                        }
                        Some(aggregate_output::Kind::Aggregate(a)) => aggregates.push(expr(a)),
                        None => {}
                    }
                }
                let _ = writeln!(out, "      group by: {}", keys.join(", "));
                let _ = writeln!(out, "      aggregates: {}", aggregates.join(", "));
                let _ = writeln!(
                    out,
                    "      emits a window when the watermark passes its end"
                );
            }
            Some(operator_node::Kind::Detector(d)) => {
                let args: Vec<String> = d.args.iter().map(|a| expr(a)).collect();
                let keys: Vec<String> = d.partition_by.iter().map(|k| expr(k)).collect();
                let _ = writeln!(
                    out,
                    " {}({}) PER {} AS {}",
                    d.kind,
                    args.join(", "),
                    if keys.is_empty() {
                        "<all rows>".to_string()
                    } else {
                        keys.join(", ")
                    },
                    d.output_name
                );
            }
            None => {
                let _ = writeln!(out, " <unknown operator>");
            }
        }
        let _ = writeln!(
            out,
            "      output: {}",
            schema_text(&decoder, &node.output_schema)
        );
    }
    if let Some(sink) = &plan.sink {
        let connector = sink.connector.as_ref();
        let _ = writeln!(
            out,
            "  sink {} [connector={} {}]",
            sink.name,
            connector.map_or("?", |c| c.name.as_str()),
            connector.map_or("", |c| c.options_json.as_str())
        );
    }
    out
}

fn schema_text(decoder: &ExprDecoder, bytes: &[u8]) -> String {
    match decoder.schema(bytes) {
        Ok(schema) => fields_text(&schema),
        Err(e) => format!("<{e}>"),
    }
}

fn fields_text(schema: &DFSchema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| {
            let ty = match f.data_type() {
                DataType::Timestamp(_, None) => "timestamp".to_string(),
                DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => "text".to_string(),
                other => other.to_string().to_ascii_lowercase(),
            };
            let null = if f.is_nullable() { "" } else { " not null" };
            format!("{} {ty}{null}", f.name())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `1s`, `250ms`, `2m30s`: the shortest exact rendering.
pub fn duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    let units = [
        ("h", 3_600_000_000_000i64),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ];
    let mut rest = ns.unsigned_abs() as i128;
    let mut text = if ns < 0 {
        "-".to_string()
    } else {
        String::new()
    };
    for (unit, size) in units {
        let size = size as i128;
        if rest >= size {
            let _ = write!(text, "{}{unit}", rest / size);
            rest %= size;
        }
    }
    text
}
