//! From a decoded plan node to a running operator.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::logical_expr::Expr;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::physical_expr::aggregate::LoweredAggregateBuilder;
use weir_proto::plan::{self, aggregate_output, operator_node, window_aggregate};

use crate::Operator;
use crate::detect::{self, DetectorOperator};
use crate::error::{OperatorError, Result};
use crate::expr::ExprDecoder;
use crate::filter::FilterOperator;
use crate::project::ProjectOperator;
use crate::window::{AggregateCall, OutputColumn, WindowAggregate, WindowKind};

/// Builds the operator described by `node`. Fails only for plans this build cannot run
/// (unknown function or detector, malformed bytes), never because of data.
pub fn build(node: &plan::OperatorNode, decoder: &ExprDecoder) -> Result<Box<dyn Operator>> {
    let input = decoder.schema(&node.input_schema)?;
    let output = decoder.schema(&node.output_schema)?;
    let output_schema: SchemaRef = Arc::new(output.as_arrow().clone());
    let kind = node
        .kind
        .as_ref()
        .ok_or_else(|| OperatorError::plan(format!("operator {} has no kind", node.id)))?;
    Ok(match kind {
        operator_node::Kind::Filter(filter) => Box::new(FilterOperator::new(
            decoder.physical(&filter.predicate, &input)?,
            output_schema,
        )),
        operator_node::Kind::Project(project) => {
            let exprs = project
                .exprs
                .iter()
                .map(|e| decoder.physical(e, &input))
                .collect::<Result<Vec<_>>>()?;
            Box::new(ProjectOperator::new(exprs, output_schema))
        }
        operator_node::Kind::WindowAggregate(window) => {
            Box::new(build_window(window, &input, output_schema, decoder)?)
        }
        operator_node::Kind::Detector(detector) => Box::new(build_detector(
            &node.id,
            detector,
            &input,
            output_schema,
            decoder,
        )?),
    })
}

/// Whether the operator `node` describes keeps state between batches (open windows, a
/// detector's history) that `snapshot` captures. The others start the same every time.
pub fn is_stateful(node: &plan::OperatorNode) -> bool {
    matches!(
        node.kind,
        Some(operator_node::Kind::WindowAggregate(_) | operator_node::Kind::Detector(_))
    )
}

fn build_window(
    node: &plan::WindowAggregate,
    input: &DFSchema,
    output_schema: SchemaRef,
    decoder: &ExprDecoder,
) -> Result<WindowAggregate> {
    let kind = match node.window {
        Some(window_aggregate::Window::Tumble(plan::Tumble { size_ns })) => {
            WindowKind::Tumble { size: size_ns }
        }
        Some(window_aggregate::Window::Hop(plan::Hop { size_ns, slide_ns })) => WindowKind::Hop {
            size: size_ns,
            slide: slide_ns,
        },
        None => return Err(OperatorError::plan("window aggregate without a window")),
    };
    let time_column = input
        .as_arrow()
        .index_of(&node.time_column)
        .map_err(|_| OperatorError::plan(format!("no event-time column '{}'", node.time_column)))?;
    let mut keys = Vec::new();
    let mut aggregates = Vec::new();
    let mut outputs = Vec::new();
    let planning = PhysicalPlanningContext::default();
    for output in &node.outputs {
        let column = match &output.kind {
            Some(aggregate_output::Kind::Key(bytes)) => {
                keys.push(decoder.physical(bytes, input)?);
                OutputColumn::Key(keys.len() - 1)
            }
            Some(aggregate_output::Kind::WindowStart(_)) => OutputColumn::WindowStart,
            Some(aggregate_output::Kind::WindowEnd(_)) => OutputColumn::WindowEnd,
            Some(aggregate_output::Kind::Aggregate(bytes)) => {
                let expr = decoder.expr(bytes)?;
                let lowered = LoweredAggregateBuilder::new(
                    &expr,
                    input,
                    input.as_arrow(),
                    decoder.props(),
                    &planning,
                )
                .build()?;
                let mut inputs = lowered.aggregate.expressions();
                inputs.extend(lowered.order_bys.iter().map(|sort| Arc::clone(&sort.expr)));
                aggregates.push(AggregateCall {
                    function: lowered.aggregate,
                    inputs,
                    filter: lowered.filter,
                });
                OutputColumn::Aggregate(aggregates.len() - 1)
            }
            None => return Err(OperatorError::plan("aggregate output without a kind")),
        };
        outputs.push(column);
    }
    WindowAggregate::try_new(
        kind,
        input.as_arrow(),
        time_column,
        keys,
        aggregates,
        outputs,
        output_schema,
    )
}

fn build_detector(
    id: &str,
    node: &plan::Detector,
    input: &DFSchema,
    output_schema: SchemaRef,
    decoder: &ExprDecoder,
) -> Result<DetectorOperator> {
    let kind = detect::find(&node.kind)
        .ok_or_else(|| OperatorError::plan(format!("unknown detector '{}'", node.kind)))?;
    let (value, parameters) = node
        .args
        .split_first()
        .ok_or_else(|| OperatorError::plan(format!("{} needs a value argument", node.kind)))?;
    let parameters = parameters
        .iter()
        .map(|bytes| literal(&decoder.expr(bytes)?))
        .collect::<Result<Vec<_>>>()?;
    let partition_by = node
        .partition_by
        .iter()
        .map(|bytes| decoder.physical(bytes, input))
        .collect::<Result<Vec<_>>>()?;
    DetectorOperator::try_new(
        id,
        input.as_arrow(),
        partition_by,
        decoder.physical(value, input)?,
        kind.create(&parameters)?,
        output_schema,
    )
}

/// Detector parameters are constants; casts the planner added around them are folded here.
fn literal(expr: &Expr) -> Result<ScalarValue> {
    match expr {
        Expr::Literal(value, _) => Ok(value.cast_to(&arrow::datatypes::DataType::Float64)?),
        Expr::Cast(cast) => literal(&cast.expr),
        Expr::TryCast(cast) => literal(&cast.expr),
        Expr::Alias(alias) => literal(&alias.expr),
        other => Err(OperatorError::plan(format!(
            "detector parameters must be constants, got {other}"
        ))),
    }
}
