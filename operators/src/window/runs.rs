//! Accumulators for the aggregates telemetry windows use most, `count`, and `sum`, `avg`,
//! `min` and `max` over `DOUBLE`, that also take a batch a run at a time.
//!
//! Sensors send blocks: a batch is mostly runs of consecutive rows of one key. DataFusion's
//! accumulators take one group index per row and update the group's slot in memory row by
//! row, so a run of one group is a chain of loads and stores to the same address. Here a run
//! is folded in a register and stored once.
//!
//! Results are those of DataFusion's accumulators to the bit: values are folded into a group
//! in row order starting from the group's current value, with the same operations (plain
//! addition; `min`/`max` replace the current value when the new one compares less/greater
//! or either is NaN, starting from `f64::MAX`/`f64::MIN`), and `state`/`merge_batch` use the
//! same layout, so snapshots move between the two. The tests check both against DataFusion.

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, UInt64Array};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Float64Type, Int64Type, UInt64Type};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;

/// Which aggregate a [`RunAccumulator`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RunKind {
    Count,
    Sum,
    Avg,
    Min,
    Max,
}

impl RunKind {
    /// The kind for `function` applied to an input of `input_type`, if it is one of these
    /// aggregates, plain (no DISTINCT, no ORDER BY), with the result and state types this
    /// module produces.
    pub(super) fn of(function: &AggregateFunctionExpr, input_type: &DataType) -> Option<Self> {
        if function.is_distinct() || !function.order_bys().is_empty() {
            return None;
        }
        let kind = match function.fun().name() {
            "count" => Self::Count,
            "sum" => Self::Sum,
            "avg" => Self::Avg,
            "min" => Self::Min,
            "max" => Self::Max,
            _ => return None,
        };
        if kind != Self::Count && input_type != &DataType::Float64 {
            return None;
        }
        let (result, state): (DataType, &[DataType]) = match kind {
            Self::Count => (DataType::Int64, &[DataType::Int64]),
            Self::Avg => (DataType::Float64, &[DataType::UInt64, DataType::Float64]),
            Self::Sum | Self::Min | Self::Max => (DataType::Float64, &[DataType::Float64]),
        };
        let state_types: Vec<DataType> = function
            .state_fields()
            .ok()?
            .iter()
            .map(|field| field.data_type().clone())
            .collect();
        (function.field().data_type() == &result && state_types == state).then_some(kind)
    }

    /// What a group holds before its first value.
    fn start(self) -> f64 {
        match self {
            Self::Min => f64::MAX,
            Self::Max => f64::MIN,
            Self::Count | Self::Sum | Self::Avg => 0.0,
        }
    }
}

/// The fold of one value into a group's `current` one.
#[inline(always)]
fn fold(kind: RunKind, current: f64, value: f64) -> f64 {
    match kind {
        RunKind::Sum | RunKind::Avg => current + value,
        // NaN on either side replaces, as in DataFusion's `min` and `max`.
        RunKind::Min => match value.partial_cmp(&current) {
            Some(std::cmp::Ordering::Less) | None => value,
            _ => current,
        },
        RunKind::Max => match value.partial_cmp(&current) {
            Some(std::cmp::Ordering::Greater) | None => value,
            _ => current,
        },
        RunKind::Count => current,
    }
}

/// `count`, `sum`, `avg`, `min` or `max` per group; see the module docs.
#[derive(Debug)]
pub(super) struct RunAccumulator {
    kind: RunKind,
    /// The sum (`sum`, `avg`), or the least or greatest value so far.
    values: Vec<f64>,
    /// Values counted (`count`, `avg`).
    counts: Vec<u64>,
    /// Whether a group has had a value; a group without one is NULL, except for `count`.
    seen: Vec<bool>,
}

impl RunAccumulator {
    pub(super) fn new(kind: RunKind) -> Self {
        Self {
            kind,
            values: Vec::new(),
            counts: Vec::new(),
            seen: Vec::new(),
        }
    }

    fn resize(&mut self, groups: usize) {
        if self.kind != RunKind::Count {
            self.values.resize(groups, self.kind.start());
            self.seen.resize(groups, false);
        }
        if matches!(self.kind, RunKind::Count | RunKind::Avg) {
            self.counts.resize(groups, 0);
        }
    }

    /// Adds the rows of each run in `runs` to the group at the same position in `groups`.
    pub(super) fn update_runs(
        &mut self,
        values: &ArrayRef,
        runs: &[Range<usize>],
        groups: &[usize],
        total_groups: usize,
    ) -> DfResult<()> {
        self.resize(total_groups);
        let nulls = values.logical_nulls();
        if self.kind == RunKind::Count {
            for (run, &group) in runs.iter().zip(groups) {
                let valid = match &nulls {
                    None => run.len(),
                    Some(nulls) => run.len() - nulls.slice(run.start, run.len()).null_count(),
                };
                self.counts[group] += valid as u64;
            }
            return Ok(());
        }
        let floats = float_values(values)?.values();
        let kind = self.kind;
        for (run, &group) in runs.iter().zip(groups) {
            let rows = &floats[run.clone()];
            let mut current = self.values[group];
            let mut valid = rows.len();
            match &nulls {
                None => {
                    for &value in rows {
                        current = fold(kind, current, value);
                    }
                }
                Some(nulls) => {
                    for (offset, &value) in rows.iter().enumerate() {
                        if nulls.is_valid(run.start + offset) {
                            current = fold(kind, current, value);
                        } else {
                            valid -= 1;
                        }
                    }
                }
            }
            self.values[group] = current;
            if valid > 0 {
                self.seen[group] = true;
                if kind == RunKind::Avg {
                    self.counts[group] += valid as u64;
                }
            }
        }
        Ok(())
    }

    /// The NULLs of groups that never had a value, for the groups `emit_to` takes.
    fn take_nulls(&mut self, emit_to: EmitTo) -> Option<NullBuffer> {
        let seen = emit_to.take_needed(&mut self.seen);
        let nulls = NullBuffer::from(seen);
        (nulls.null_count() > 0).then_some(nulls)
    }
}

fn float_values(values: &ArrayRef) -> DfResult<&Float64Array> {
    values.as_primitive_opt::<Float64Type>().ok_or_else(|| {
        DataFusionError::Internal(format!(
            "window aggregate expected DOUBLE input, got {}",
            values.data_type()
        ))
    })
}

impl GroupsAccumulator for RunAccumulator {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> DfResult<()> {
        let [values] = values else {
            return Err(DataFusionError::Internal(
                "window aggregate takes one argument".into(),
            ));
        };
        self.resize(total_num_groups);
        let nulls = values.logical_nulls();
        let included = |row: usize| {
            nulls.as_ref().is_none_or(|n| n.is_valid(row))
                && opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row))
        };
        if self.kind == RunKind::Count {
            for (row, &group) in group_indices.iter().enumerate() {
                if included(row) {
                    self.counts[group] += 1;
                }
            }
            return Ok(());
        }
        let floats = float_values(values)?.values();
        for (row, (&group, &value)) in group_indices.iter().zip(floats.iter()).enumerate() {
            if included(row) {
                self.values[group] = fold(self.kind, self.values[group], value);
                self.seen[group] = true;
                if self.kind == RunKind::Avg {
                    self.counts[group] += 1;
                }
            }
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> DfResult<ArrayRef> {
        let counts = emit_to.take_needed(&mut self.counts);
        if self.kind == RunKind::Count {
            let counts = counts.into_iter().map(|c| c as i64).collect::<Vec<_>>();
            return Ok(Arc::new(Int64Array::from(counts)));
        }
        let values = emit_to.take_needed(&mut self.values);
        let nulls = self.take_nulls(emit_to);
        let values = match self.kind {
            RunKind::Avg => values
                .iter()
                .zip(&counts)
                .map(|(&sum, &count)| sum / count as f64)
                .collect(),
            _ => values,
        };
        Ok(Arc::new(Float64Array::new(values.into(), nulls)))
    }

    fn state(&mut self, emit_to: EmitTo) -> DfResult<Vec<ArrayRef>> {
        let counts = emit_to.take_needed(&mut self.counts);
        if self.kind == RunKind::Count {
            let counts = counts.into_iter().map(|c| c as i64).collect::<Vec<_>>();
            return Ok(vec![Arc::new(Int64Array::from(counts))]);
        }
        let values = emit_to.take_needed(&mut self.values);
        let nulls = self.take_nulls(emit_to);
        let values: ArrayRef = Arc::new(Float64Array::new(values.into(), nulls.clone()));
        Ok(match self.kind {
            RunKind::Avg => vec![Arc::new(UInt64Array::new(counts.into(), nulls)), values],
            _ => vec![values],
        })
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.resize(total_num_groups);
        let column = |i: usize| {
            values.get(i).ok_or_else(|| {
                DataFusionError::Internal("window aggregate state has too few columns".into())
            })
        };
        match self.kind {
            RunKind::Count => {
                let partial = column(0)?
                    .as_primitive_opt::<Int64Type>()
                    .ok_or_else(|| DataFusionError::Internal("count state must be Int64".into()))?;
                for (&group, count) in group_indices.iter().zip(partial.iter()) {
                    self.counts[group] += count.unwrap_or(0).max(0) as u64;
                }
            }
            RunKind::Avg => {
                let counts = column(0)?.as_primitive_opt::<UInt64Type>().ok_or_else(|| {
                    DataFusionError::Internal("avg state must start with UInt64 counts".into())
                })?;
                let sums = float_values(column(1)?)?;
                for (row, &group) in group_indices.iter().enumerate() {
                    if counts.is_valid(row) {
                        self.counts[group] += counts.value(row);
                        self.seen[group] = true;
                    }
                    if sums.is_valid(row) {
                        self.values[group] += sums.value(row);
                        self.seen[group] = true;
                    }
                }
            }
            kind => {
                let partial = float_values(column(0)?)?;
                for (row, &group) in group_indices.iter().enumerate() {
                    if partial.is_valid(row) {
                        self.values[group] = fold(kind, self.values[group], partial.value(row));
                        self.seen[group] = true;
                    }
                }
            }
        }
        Ok(())
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> DfResult<Vec<ArrayRef>> {
        let [values] = values else {
            return Err(DataFusionError::Internal(
                "window aggregate takes one argument".into(),
            ));
        };
        let nulls = values.logical_nulls();
        let included: Vec<bool> = (0..values.len())
            .map(|row| {
                nulls.as_ref().is_none_or(|n| n.is_valid(row))
                    && opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row))
            })
            .collect();
        if self.kind == RunKind::Count {
            let counts = included.iter().map(|&i| i64::from(i)).collect::<Vec<_>>();
            return Ok(vec![Arc::new(Int64Array::from(counts))]);
        }
        let nulls = NullBuffer::from(included);
        let nulls = (nulls.null_count() > 0).then_some(nulls);
        let floats = float_values(values)?.values().clone();
        let values: ArrayRef = Arc::new(Float64Array::new(floats, nulls.clone()));
        Ok(match self.kind {
            RunKind::Avg => {
                let ones = vec![1u64; values.len()];
                vec![Arc::new(UInt64Array::new(ones.into(), nulls)), values]
            }
            _ => vec![values],
        })
    }

    fn size(&self) -> usize {
        self.values.capacity() * size_of::<f64>()
            + self.counts.capacity() * size_of::<u64>()
            + self.seen.capacity()
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Float64Array, StringArray};
    use datafusion::functions_aggregate::average::avg_udaf;
    use datafusion::functions_aggregate::count::count_udaf;
    use datafusion::functions_aggregate::min_max::{max_udaf, min_udaf};
    use datafusion::functions_aggregate::sum::sum_udaf;
    use datafusion::logical_expr::AggregateUDF;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::col;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::testing::schema;

    fn function(udaf: Arc<AggregateUDF>, column: &str) -> AggregateFunctionExpr {
        let input = schema("v:f64, name:utf8");
        AggregateExprBuilder::new(udaf, vec![col(column, &input).expect("column")])
            .schema(input)
            .alias("x")
            .build()
            .expect("aggregate")
    }

    fn functions() -> Vec<(RunKind, AggregateFunctionExpr)> {
        vec![
            (RunKind::Count, function(count_udaf(), "v")),
            (RunKind::Sum, function(sum_udaf(), "v")),
            (RunKind::Avg, function(avg_udaf(), "v")),
            (RunKind::Min, function(min_udaf(), "v")),
            (RunKind::Max, function(max_udaf(), "v")),
        ]
    }

    #[test]
    fn only_plain_aggregates_of_doubles_take_runs() {
        for (kind, function) in functions() {
            assert_eq!(RunKind::of(&function, &DataType::Float64), Some(kind));
        }
        let count_text = function(count_udaf(), "name");
        assert_eq!(
            RunKind::of(&count_text, &DataType::Utf8),
            Some(RunKind::Count)
        );
        let max_text = function(max_udaf(), "name");
        assert_eq!(RunKind::of(&max_text, &DataType::Utf8), None);
        let input = schema("v:f64");
        let distinct = AggregateExprBuilder::new(sum_udaf(), vec![col("v", &input).expect("v")])
            .schema(input)
            .alias("x")
            .distinct()
            .build()
            .expect("aggregate");
        assert_eq!(RunKind::of(&distinct, &DataType::Float64), None);
    }

    /// Values that test the corners: NaN (which min and max let through in DataFusion's own
    /// peculiar way), infinities below the starting values, signed zeros, and NULLs.
    fn random_values(rng: &mut SmallRng, rows: usize) -> ArrayRef {
        let specials = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 0.0, 1e308];
        let values: Vec<Option<f64>> = (0..rows)
            .map(|_| match rng.random_range(0..20) {
                0 => None,
                1 => Some(specials[rng.random_range(0..specials.len())]),
                _ => Some(rng.random_range(-100.0..100.0)),
            })
            .collect();
        Arc::new(Float64Array::from(values))
    }

    /// Random runs over `rows` rows, each of one of `keys` keys, and the group of each run:
    /// as in a window, a key's group is numbered when its first row arrives (`groups` holds
    /// the numbering so far), so every group has rows.
    fn random_runs(
        rng: &mut SmallRng,
        rows: usize,
        keys: usize,
        groups: &mut Vec<usize>,
    ) -> (Vec<Range<usize>>, Vec<usize>) {
        let mut runs = Vec::new();
        let mut start = 0;
        while start < rows {
            let end = (start + rng.random_range(1..12)).min(rows);
            runs.push(start..end);
            start = end;
        }
        let run_groups = runs
            .iter()
            .map(|_| {
                let key = rng.random_range(0..keys);
                groups.iter().position(|&k| k == key).unwrap_or_else(|| {
                    groups.push(key);
                    groups.len() - 1
                })
            })
            .collect();
        (runs, run_groups)
    }

    /// Equal types, NULLs and valid values, floats by their bits, so that a different NaN or
    /// a lost sign of zero shows.
    fn same(a: &ArrayRef, b: &ArrayRef) -> bool {
        let bits = |array: &ArrayRef| -> Vec<Option<u64>> {
            (0..array.len())
                .map(|i| {
                    array.is_valid(i).then(|| match array.data_type() {
                        DataType::Float64 => array.as_primitive::<Float64Type>().value(i).to_bits(),
                        DataType::Int64 => array.as_primitive::<Int64Type>().value(i) as u64,
                        _ => array.as_primitive::<UInt64Type>().value(i),
                    })
                })
                .collect()
        };
        a.data_type() == b.data_type() && bits(a) == bits(b)
    }

    #[test]
    fn runs_give_what_datafusion_gives_row_by_row_in_results_and_state() {
        let mut rng = SmallRng::seed_from_u64(0x5eed);
        for (kind, function) in functions() {
            for _ in 0..300 {
                let keys = rng.random_range(1..6);
                let mut numbering = Vec::new();
                let mut ours = RunAccumulator::new(kind);
                let mut theirs = function.create_groups_accumulator().expect("accumulator");
                for _ in 0..rng.random_range(1..4) {
                    let rows = rng.random_range(0..60);
                    let values = random_values(&mut rng, rows);
                    let (runs, run_groups) = random_runs(&mut rng, rows, keys, &mut numbering);
                    let groups = numbering.len();
                    let indices: Vec<usize> = runs
                        .iter()
                        .zip(&run_groups)
                        .flat_map(|(run, &group)| std::iter::repeat_n(group, run.len()))
                        .collect();
                    if rng.random_bool(0.5) {
                        ours.update_runs(&values, &runs, &run_groups, groups)
                            .expect("runs");
                    } else {
                        ours.update_batch(&[Arc::clone(&values)], &indices, None, groups)
                            .expect("rows");
                    }
                    theirs
                        .update_batch(&[values], &indices, None, groups)
                        .expect("datafusion");
                }
                let groups = numbering.len();
                // Each side's state merged into a fresh copy of the other gives the same too.
                let our_state = ours.state(EmitTo::All).expect("state");
                let their_state = theirs.state(EmitTo::All).expect("state");
                assert_eq!(our_state.len(), their_state.len(), "{kind:?}");
                for (a, b) in our_state.iter().zip(&their_state) {
                    assert!(same(a, b), "{kind:?} state\n{a:?}\n{b:?}");
                }
                let all: Vec<usize> = (0..groups).collect();
                let mut ours = RunAccumulator::new(kind);
                ours.merge_batch(&their_state, &all, groups).expect("merge");
                let mut theirs = function.create_groups_accumulator().expect("accumulator");
                theirs.merge_batch(&our_state, &all, groups).expect("merge");
                let (a, b) = (
                    ours.evaluate(EmitTo::All).expect("evaluate"),
                    theirs.evaluate(EmitTo::All).expect("evaluate"),
                );
                assert!(same(&a, &b), "{kind:?} result\n{a:?}\n{b:?}");
            }
        }
    }

    #[test]
    fn a_filter_and_nulls_leave_rows_out() {
        let mut count = RunAccumulator::new(RunKind::Count);
        let mut max = RunAccumulator::new(RunKind::Max);
        let values: ArrayRef = Arc::new(Float64Array::from(vec![
            Some(1.0),
            None,
            Some(5.0),
            Some(3.0),
        ]));
        let filter = BooleanArray::from(vec![Some(true), Some(true), Some(false), None]);
        for accumulator in [&mut count, &mut max] {
            accumulator
                .update_batch(&[Arc::clone(&values)], &[0, 0, 0, 1], Some(&filter), 2)
                .expect("update");
        }
        let counts = count.evaluate(EmitTo::All).expect("count");
        assert_eq!(counts.as_primitive::<Int64Type>().values(), &[1, 0]);
        let maxima = max.evaluate(EmitTo::All).expect("max");
        let maxima = maxima.as_primitive::<Float64Type>();
        assert_eq!((maxima.value(0), maxima.is_null(1)), (1.0, true));
        // Text counts too: only its NULLs matter.
        let names: ArrayRef = Arc::new(StringArray::from(vec![Some("a"), None, Some("b")]));
        let mut count = RunAccumulator::new(RunKind::Count);
        let one_run = std::iter::once(0..3).collect::<Vec<_>>();
        count.update_runs(&names, &one_run, &[0], 1).expect("runs");
        let counts = count.evaluate(EmitTo::All).expect("count");
        assert_eq!(counts.as_primitive::<Int64Type>().values(), &[2]);
    }
}
