//! Re-aggregation of a backlog: fine windows merged into coarse ones.
//!
//! ```text
//!  sensor  window_start  rms   samples        sensor  window_start  rms                     samples
//!  s1      10:00:00      0.3   1000      →    s1      10:00:00      sqrt((.09·1000+.16·1000)  2000
//!  s1      10:00:01      0.4   1000                                      / 2000))
//! ```
//!
//! Rows are grouped by every column that is neither the window start, the window end nor
//! merged, and by the window start floored to the coarser granularity. Each merged column is
//! combined so the result is what the coarse window would have computed itself: sums add,
//! extremes take the extreme, means and RMS values are weighted by their count column. A
//! batch that is already coarse comes out the same, so merging again is harmless.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, TimestampNanosecondArray, UInt32Array,
};
use arrow::compute::{cast, concat_batches, take};
use arrow::datatypes::{DataType, Float64Type, Schema, TimeUnit};
use arrow::util::display::array_value_to_string;
use weir_connectors::cloud::{MergeFn, Reaggregate};

use crate::error::{EngineError, Result};

fn arrow_error(e: arrow::error::ArrowError) -> EngineError {
    EngineError::Internal(format!("re-aggregating a backlog: {e}"))
}

/// Running state of one merged column in one coarse window.
#[derive(Clone, Copy)]
struct Accumulator {
    /// Sum of x (sum, avg numerator) or of x^2 (rms numerator), weighted where weighted.
    total: f64,
    weight: f64,
    extreme: Option<f64>,
    /// (window start, value) of the earliest and latest fine window.
    first: Option<(i64, f64)>,
    last: Option<(i64, f64)>,
}

impl Accumulator {
    const EMPTY: Self = Self {
        total: 0.0,
        weight: 0.0,
        extreme: None,
        first: None,
        last: None,
    };
}

/// Merges `batches` (one stream's schema) into windows of `spec.granularity`.
pub fn coarsen(batches: &[RecordBatch], spec: &Reaggregate) -> Result<RecordBatch> {
    let schema = batches
        .first()
        .map(RecordBatch::schema)
        .ok_or_else(|| EngineError::Internal("nothing to re-aggregate".into()))?;
    let all = concat_batches(&schema, batches).map_err(arrow_error)?;
    let time_index = schema
        .index_of(&spec.time_column)
        .map_err(|_| EngineError::Plan(format!("no column '{}'", spec.time_column)))?;
    let starts = cast(
        all.column(time_index),
        &DataType::Timestamp(TimeUnit::Nanosecond, None),
    )
    .map_err(arrow_error)?;
    let starts = starts.as_primitive::<arrow::datatypes::TimestampNanosecondType>();
    let step = i64::try_from(spec.granularity.as_nanos())
        .unwrap_or(i64::MAX)
        .max(1);
    let merged: HashMap<&str, &MergeFn> = spec
        .merges
        .iter()
        .map(|(column, how)| (column.as_str(), how))
        .collect();
    let keys: Vec<usize> = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(i, f)| {
            *i != time_index && f.name() != "window_end" && !merged.contains_key(f.name().as_str())
        })
        .map(|(i, _)| i)
        .collect();
    let numeric = |name: &str| -> Result<Float64Array> {
        let index = schema
            .index_of(name)
            .map_err(|_| EngineError::Plan(format!("no column '{name}'")))?;
        let values = cast(all.column(index), &DataType::Float64).map_err(arrow_error)?;
        Ok(values.as_primitive::<Float64Type>().clone())
    };
    let columns: Vec<(usize, &MergeFn, Float64Array, Option<Float64Array>)> = spec
        .merges
        .iter()
        .map(|(column, how)| {
            let weight = match how {
                MergeFn::Avg(w) | MergeFn::Rms(w) => Some(numeric(w)?),
                _ => None,
            };
            Ok((
                schema
                    .index_of(column)
                    .map_err(|_| EngineError::Plan(format!("no column '{column}' to merge")))?,
                how,
                numeric(column)?,
                weight,
            ))
        })
        .collect::<Result<_>>()?;

    // Coarse windows in order of first appearance: (key text, bucket) -> (row, accumulators).
    let mut groups: HashMap<(Vec<String>, i64), usize> = HashMap::new();
    let mut firsts: Vec<u32> = Vec::new();
    let mut buckets: Vec<i64> = Vec::new();
    let mut state: Vec<Vec<Accumulator>> = Vec::new();
    for row in 0..all.num_rows() {
        if starts.is_null(row) {
            continue;
        }
        let start = starts.value(row);
        let bucket = start.div_euclid(step) * step;
        let key = keys
            .iter()
            .map(|&k| array_value_to_string(all.column(k), row).unwrap_or_default())
            .collect();
        let group = *groups.entry((key, bucket)).or_insert_with(|| {
            firsts.push(row as u32);
            buckets.push(bucket);
            state.push(vec![Accumulator::EMPTY; columns.len()]);
            state.len() - 1
        });
        for (accumulator, (_, how, values, weights)) in state[group].iter_mut().zip(&columns) {
            if values.is_null(row) {
                continue;
            }
            let x = values.value(row);
            let w = weights
                .as_ref()
                .map_or(1.0, |w| if w.is_null(row) { 0.0 } else { w.value(row) });
            match how {
                MergeFn::Sum => accumulator.total += x,
                MergeFn::Avg(_) => accumulator.total += x * w,
                MergeFn::Rms(_) => accumulator.total += x * x * w,
                MergeFn::Min => {
                    accumulator.extreme = Some(accumulator.extreme.map_or(x, |e| e.min(x)))
                }
                MergeFn::Max => {
                    accumulator.extreme = Some(accumulator.extreme.map_or(x, |e| e.max(x)))
                }
                MergeFn::First | MergeFn::Last => {}
            }
            accumulator.weight += w;
            if accumulator.first.is_none_or(|(at, _)| start < at) {
                accumulator.first = Some((start, x));
            }
            if accumulator.last.is_none_or(|(at, _)| start >= at) {
                accumulator.last = Some((start, x));
            }
        }
    }

    let indices = UInt32Array::from(firsts);
    let mut out: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (i, field) in schema.fields().iter().enumerate() {
        let column: ArrayRef = if i == time_index || field.name() == "window_end" {
            let offset = if i == time_index { 0 } else { step };
            let times = TimestampNanosecondArray::from(
                buckets.iter().map(|b| b + offset).collect::<Vec<_>>(),
            );
            cast(&times, field.data_type()).map_err(arrow_error)?
        } else if let Some(position) = columns.iter().position(|(index, ..)| *index == i) {
            let how = columns[position].1;
            let values: Float64Array = state
                .iter()
                .map(|accumulators| {
                    let a = accumulators[position];
                    match how {
                        MergeFn::Sum => (a.weight > 0.0).then_some(a.total),
                        MergeFn::Avg(_) => (a.weight > 0.0).then(|| a.total / a.weight),
                        MergeFn::Rms(_) => (a.weight > 0.0).then(|| (a.total / a.weight).sqrt()),
                        MergeFn::Min | MergeFn::Max => a.extreme,
                        MergeFn::First => a.first.map(|(_, v)| v),
                        MergeFn::Last => a.last.map(|(_, v)| v),
                    }
                })
                .collect();
            cast(&values, field.data_type()).map_err(arrow_error)?
        } else {
            take(all.column(i), &indices, None).map_err(arrow_error)?
        };
        out.push(column);
    }
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), out).map_err(arrow_error)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::Field;

    use super::*;

    fn windows(rows: &[(&str, i64, f64, f64, i64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("sensor", DataType::Utf8, false),
            Field::new(
                "window_start",
                DataType::Timestamp(TimeUnit::Nanosecond, None),
                false,
            ),
            Field::new(
                "window_end",
                DataType::Timestamp(TimeUnit::Nanosecond, None),
                false,
            ),
            Field::new("rms", DataType::Float64, true),
            Field::new("peak", DataType::Float64, true),
            Field::new("samples", DataType::Int64, false),
        ]));
        let second = 1_000_000_000;
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
                Arc::new(TimestampNanosecondArray::from(
                    rows.iter().map(|r| r.1 * second).collect::<Vec<_>>(),
                )),
                Arc::new(TimestampNanosecondArray::from(
                    rows.iter().map(|r| (r.1 + 1) * second).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    rows.iter().map(|r| r.3).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.4).collect::<Vec<_>>(),
                )),
            ],
        )
        .expect("batch")
    }

    fn spec() -> Reaggregate {
        Reaggregate::parse(
            Duration::from_secs(60),
            "rms:rms(samples), peak:max, samples:sum",
        )
        .expect("spec")
    }

    #[test]
    fn seconds_merge_into_minutes_as_the_minute_would_have_computed() {
        let fine = [
            windows(&[("s1", 0, 3.0, 5.0, 100), ("s2", 0, 1.0, 1.5, 50)]),
            windows(&[("s1", 1, 4.0, 7.0, 300), ("s1", 61, 2.0, 2.5, 10)]),
        ];
        let coarse = coarsen(&fine, &spec()).expect("coarsen");
        assert_eq!(coarse.num_rows(), 3);
        let sensors = coarse.column(0).as_string::<i32>();
        let starts = coarse
            .column(1)
            .as_primitive::<arrow::datatypes::TimestampNanosecondType>();
        let ends = coarse
            .column(2)
            .as_primitive::<arrow::datatypes::TimestampNanosecondType>();
        let rms = coarse.column(3).as_primitive::<Float64Type>();
        let peak = coarse.column(4).as_primitive::<Float64Type>();
        let samples = coarse
            .column(5)
            .as_primitive::<arrow::datatypes::Int64Type>();
        // s1, minute 0: 100 samples of RMS 3 and 300 of RMS 4.
        let expected = ((9.0 * 100.0 + 16.0 * 300.0) / 400.0_f64).sqrt();
        assert_eq!(sensors.value(0), "s1");
        assert_eq!((starts.value(0), ends.value(0)), (0, 60_000_000_000));
        assert!((rms.value(0) - expected).abs() < 1e-12);
        assert_eq!((peak.value(0), samples.value(0)), (7.0, 400));
        assert_eq!(
            (sensors.value(1), rms.value(1), samples.value(1)),
            ("s2", 1.0, 50)
        );
        assert_eq!(
            (sensors.value(2), starts.value(2), samples.value(2)),
            ("s1", 60_000_000_000, 10)
        );
        // Merging what is already coarse changes nothing.
        let again = coarsen(std::slice::from_ref(&coarse), &spec()).expect("again");
        assert_eq!(again, coarse);
    }

    #[test]
    fn merge_specs_are_checked() {
        assert!(Reaggregate::parse(Duration::from_secs(60), "rms:median").is_err());
        assert!(Reaggregate::parse(Duration::from_secs(60), "").is_err());
        let spec = Reaggregate::parse(Duration::from_secs(60), "rms:rms(n)").expect("parse");
        let schema = windows(&[]).schema();
        let problem = spec.check(&schema).err().map(|e| e.to_string());
        assert!(problem.is_some_and(|p| p.contains("weight 'n'")));
    }
}
