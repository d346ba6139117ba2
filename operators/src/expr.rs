//! The bridge between plan bytes and DataFusion: schemas and expressions are encoded with
//! datafusion-proto by the planner and decoded here into physical expressions.
//!
//! Both directions live in this one module so the planner and the gateway agree on the codec
//! and on the set of functions a plan may call (DataFusion's plus Weir's detectors).

use std::sync::Arc;

use datafusion::common::DFSchema;
use datafusion::execution::SessionStateDefaults;
use datafusion::execution::TaskContext;
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::Expr;
use datafusion::logical_expr::execution_props::ExecutionProps;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::physical_expr::{PhysicalExpr, create_physical_expr};
use datafusion_proto::logical_plan::DefaultLogicalExtensionCodec;
use datafusion_proto::logical_plan::from_proto::parse_expr;
use datafusion_proto::logical_plan::to_proto::serialize_expr;
use datafusion_proto::protobuf;
use prost::Message;

use crate::detect;
use crate::error::{OperatorError, Result};

/// A DataFusion session with every function a Weir pipeline may call registered: the
/// planner types SQL against it and gateways decode plans with it, so both sides agree.
///
/// Functions and the SQL operator planners only: not DataFusion's default catalog, table
/// factories and file formats, which a pipeline never uses and whose set-up code would only
/// stay resident in every gateway's memory.
pub fn session_state() -> SessionState {
    let mut window_functions = SessionStateDefaults::default_window_functions();
    window_functions.extend(detect::window_udfs());
    SessionStateBuilder::new()
        .with_expr_planners(SessionStateDefaults::default_expr_planners())
        .with_scalar_functions(SessionStateDefaults::default_scalar_functions())
        .with_higher_order_functions(SessionStateDefaults::default_higher_order_functions())
        .with_aggregate_functions(SessionStateDefaults::default_aggregate_functions())
        .with_window_functions(window_functions)
        .build()
}

/// Decodes plan bytes into DataFusion values for one pipeline.
pub struct ExprDecoder {
    task_ctx: Arc<TaskContext>,
    props: ExecutionProps,
}

impl Default for ExprDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ExprDecoder {
    pub fn new() -> Self {
        Self {
            task_ctx: session_state().task_ctx(),
            props: ExecutionProps::new(),
        }
    }

    pub fn schema(&self, bytes: &[u8]) -> Result<Arc<DFSchema>> {
        let message = protobuf::DfSchema::decode(bytes)
            .map_err(|e| OperatorError::plan(format!("malformed schema: {e}")))?;
        let schema = DFSchema::try_from(&message)
            .map_err(|e| OperatorError::plan(format!("invalid schema: {e}")))?;
        Ok(Arc::new(schema))
    }

    /// The plain Arrow schema (no qualifiers) of encoded DataFusion schema bytes.
    pub fn arrow_schema(&self, bytes: &[u8]) -> Result<arrow::datatypes::SchemaRef> {
        Ok(Arc::new(self.schema(bytes)?.as_arrow().clone()))
    }

    pub fn expr(&self, bytes: &[u8]) -> Result<Expr> {
        let message = protobuf::LogicalExprNode::decode(bytes)
            .map_err(|e| OperatorError::plan(format!("malformed expression: {e}")))?;
        parse_expr(&message, &self.task_ctx, &DefaultLogicalExtensionCodec {})
            .map_err(|e| OperatorError::plan(format!("invalid expression: {e}")))
    }

    /// Decodes an expression and lowers it to a physical expression over `schema`.
    pub fn physical(&self, bytes: &[u8], schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>> {
        let expr = self.expr(bytes)?;
        self.lower(&expr, schema)
    }

    pub fn lower(&self, expr: &Expr, schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>> {
        Ok(create_physical_expr(
            expr,
            schema,
            &self.props,
            &PhysicalPlanningContext::default(),
        )?)
    }

    pub fn props(&self) -> &ExecutionProps {
        &self.props
    }
}

pub fn encode_schema(schema: &DFSchema) -> Result<Vec<u8>> {
    let message = protobuf::DfSchema::try_from(schema)
        .map_err(|e| OperatorError::plan(format!("cannot encode schema: {e}")))?;
    Ok(message.encode_to_vec())
}

pub fn encode_expr(expr: &Expr) -> Result<Vec<u8>> {
    let message = serialize_expr(expr, &DefaultLogicalExtensionCodec {})
        .map_err(|e| OperatorError::plan(format!("cannot encode expression {expr}: {e}")))?;
    Ok(message.encode_to_vec())
}
