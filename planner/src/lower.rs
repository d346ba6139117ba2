//! From DataFusion's logical plan of a pipeline's SELECT to Weir's operator chain.
//!
//! DataFusion parses, resolves and types the query; this module walks the resulting plan from
//! the scan upwards and maps each node to a streaming operator:
//!
//! | logical node                 | Weir operator                                    |
//! |------------------------------|--------------------------------------------------|
//! | TableScan of a source        | the source itself                                |
//! | TableScan of TUMBLE/HOP      | the source; the window is applied by the GROUP BY |
//! | Filter (WHERE, HAVING)       | `filter`                                         |
//! | Projection                   | `project`                                        |
//! | Aggregate over a window      | `window_aggregate`                               |
//! | Window with a detector call  | `detector`                                       |
//! | SubqueryAlias                | nothing: only names change                       |
//!
//! Anything else (joins, ORDER BY, LIMIT, ...) has no streaming meaning here yet and is
//! reported as an error at the pipeline.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::common::{Column, DFSchema, DFSchemaRef};
use datafusion::logical_expr::expr::{AggregateFunction, WindowFunction};
use datafusion::logical_expr::{Expr, LogicalPlan, SortExpr, WindowFunctionDefinition};
use weir_operators::encode_expr;
use weir_operators::window::WindowKind;
use weir_proto::plan::{self, aggregate_output, operator_node, window_aggregate};

use crate::error::{Diagnostic, Position};

pub const WINDOW_START: &str = "window_start";
pub const WINDOW_END: &str = "window_end";

/// A `TUMBLE(source, time, size)` or `HOP(source, time, slide, size)` in FROM, registered in
/// the catalog under a private name whose schema adds `window_start` and `window_end`.
#[derive(Debug, Clone)]
pub struct WindowedTable {
    pub source: String,
    pub time_column: String,
    pub kind: WindowKind,
}

pub struct LowerContext<'a> {
    pub windowed: &'a HashMap<String, WindowedTable>,
    pub sources: &'a HashMap<String, DFSchemaRef>,
    /// Where errors without a more precise position point: the pipeline statement.
    pub position: Position,
    /// The first GROUP BY expression of the outer query, for errors about aggregation.
    pub group_by: Option<Position>,
}

/// The lowered pipeline so far.
pub struct Chain {
    pub source: String,
    pub operators: Vec<plan::OperatorNode>,
    /// The schema of the batches flowing out of the last operator.
    pub schema: DFSchemaRef,
    /// Set between a windowed scan and the GROUP BY that applies the window.
    pending_window: Option<WindowedTable>,
}

type LowerResult<T> = Result<T, Diagnostic>;

impl LowerContext<'_> {
    fn error(&self, message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(self.position, message)
    }

    fn internal(&self, e: impl std::fmt::Display) -> Diagnostic {
        self.error(format!("cannot encode the plan: {e}"))
    }

    pub fn lower(&self, plan: &LogicalPlan) -> LowerResult<Chain> {
        match plan {
            LogicalPlan::TableScan(scan) => {
                self.lower_scan(scan.table_name.table(), &scan.projected_schema)
            }
            LogicalPlan::SubqueryAlias(alias) => {
                let mut chain = self.lower(&alias.input)?;
                let fields = alias
                    .schema
                    .iter()
                    .filter(|(_, f)| chain.schema.has_column_with_unqualified_name(f.name()))
                    .map(|(q, f)| (q.cloned(), Arc::clone(f)))
                    .collect::<Vec<_>>();
                chain.schema = Arc::new(
                    DFSchema::new_with_metadata(fields, alias.schema.metadata().clone())
                        .map_err(|e| self.internal(e))?,
                );
                Ok(chain)
            }
            LogicalPlan::Filter(filter) => {
                let mut chain = self.lower(&filter.input)?;
                self.check_no_window_columns(&chain, std::slice::from_ref(&filter.predicate))?;
                let node = operator_node::Kind::Filter(plan::Filter {
                    predicate: encode_expr(&filter.predicate).map_err(|e| self.internal(e))?,
                });
                let schema = Arc::clone(&chain.schema);
                self.push(&mut chain, "filter", node, schema)?;
                Ok(chain)
            }
            LogicalPlan::Projection(projection) => {
                let mut chain = self.lower(&projection.input)?;
                if chain.pending_window.is_some() {
                    return Err(self
                        .error("TUMBLE and HOP windows need GROUP BY with aggregates")
                        .with_hint("e.g. SELECT sensor, window_start, avg(v) FROM TUMBLE(...) GROUP BY sensor, window_start"));
                }
                let exprs = projection
                    .expr
                    .iter()
                    .map(|e| encode_expr(e).map_err(|e| self.internal(e)))
                    .collect::<LowerResult<Vec<_>>>()?;
                let node = operator_node::Kind::Project(plan::Project { exprs });
                self.push(&mut chain, "project", node, Arc::clone(&projection.schema))?;
                Ok(chain)
            }
            LogicalPlan::Aggregate(aggregate) => {
                let mut chain = self.lower(&aggregate.input)?;
                let Some(window) = chain.pending_window.take() else {
                    return Err(Diagnostic::new(self.group_by.unwrap_or(self.position), "")
                        .with_message("aggregate without a window: a stream never ends, so GROUP BY needs an event-time window")
                        .with_hint("read the source through a window, e.g. FROM TUMBLE(source, ts, INTERVAL '1' SECOND)"));
                };
                let time = self.qualified(&chain.schema, &window.time_column)?;
                let mut outputs = Vec::new();
                for expr in &aggregate.group_expr {
                    let kind = match expr {
                        Expr::Column(c) if c.name == WINDOW_START => {
                            aggregate_output::Kind::WindowStart(plan::WindowBound {})
                        }
                        Expr::Column(c) if c.name == WINDOW_END => {
                            aggregate_output::Kind::WindowEnd(plan::WindowBound {})
                        }
                        Expr::GroupingSet(_) => {
                            return Err(self.error(
                                "GROUPING SETS, ROLLUP and CUBE are not supported in pipelines",
                            ));
                        }
                        other => {
                            self.check_no_window_columns(&chain, std::slice::from_ref(other))?;
                            aggregate_output::Kind::Key(
                                encode_expr(other).map_err(|e| self.internal(e))?,
                            )
                        }
                    };
                    outputs.push(plan::AggregateOutput { kind: Some(kind) });
                }
                for expr in &aggregate.aggr_expr {
                    let expr = order_by_event_time(expr.clone(), &time);
                    self.check_no_window_columns(&chain, std::slice::from_ref(&expr))?;
                    outputs.push(plan::AggregateOutput {
                        kind: Some(aggregate_output::Kind::Aggregate(
                            encode_expr(&expr).map_err(|e| self.internal(e))?,
                        )),
                    });
                }
                let window_node = match window.kind {
                    WindowKind::Tumble { size } => {
                        window_aggregate::Window::Tumble(plan::Tumble { size_ns: size })
                    }
                    WindowKind::Hop { size, slide } => window_aggregate::Window::Hop(plan::Hop {
                        size_ns: size,
                        slide_ns: slide,
                    }),
                };
                let node = operator_node::Kind::WindowAggregate(plan::WindowAggregate {
                    time_column: window.time_column.clone(),
                    window: Some(window_node),
                    outputs,
                });
                self.push(
                    &mut chain,
                    "window_aggregate",
                    node,
                    Arc::clone(&aggregate.schema),
                )?;
                Ok(chain)
            }
            LogicalPlan::Window(window) => {
                let mut chain = self.lower(&window.input)?;
                if chain.pending_window.is_some() {
                    return Err(self.error(
                        "detectors cannot read a TUMBLE/HOP window directly; aggregate it first",
                    ));
                }
                let base = window.input.schema().fields().len();
                for (i, expr) in window.window_expr.iter().enumerate() {
                    let (function, output_name) = match expr {
                        Expr::WindowFunction(f) => {
                            (f.as_ref(), window.schema.field(base + i).name().clone())
                        }
                        Expr::Alias(alias) => match alias.expr.as_ref() {
                            Expr::WindowFunction(f) => {
                                (f.as_ref(), window.schema.field(base + i).name().clone())
                            }
                            _ => {
                                return Err(
                                    self.error(format!("unsupported window expression {expr}"))
                                );
                            }
                        },
                        _ => {
                            return Err(self.error(format!("unsupported window expression {expr}")));
                        }
                    };
                    let node = self.detector(function, output_name)?;
                    let fields = window
                        .schema
                        .iter()
                        .take(base + i + 1)
                        .map(|(q, f)| (q.cloned(), Arc::clone(f)))
                        .collect::<Vec<_>>();
                    let schema =
                        DFSchema::new_with_metadata(fields, window.schema.metadata().clone())
                            .map_err(|e| self.internal(e))?;
                    self.push(&mut chain, "detector", node, Arc::new(schema))?;
                }
                Ok(chain)
            }
            LogicalPlan::Join(_) => Err(self.error("joins are not supported in pipelines yet")),
            LogicalPlan::Sort(_) => Err(self
                .error("ORDER BY has no end on a stream")
                .with_hint("rows leave in event-time order per window; drop the ORDER BY")),
            LogicalPlan::Limit(_) => Err(self.error("LIMIT is not supported on a stream")),
            LogicalPlan::Union(_) => Err(self.error("UNION is not supported in pipelines yet")),
            LogicalPlan::Distinct(_) => Err(self
                .error("DISTINCT needs a window on a stream")
                .with_hint("use GROUP BY over a TUMBLE window instead")),
            LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => {
                Err(self.error("a pipeline must read FROM a source"))
            }
            other => Err(self.error(format!(
                "{} is not supported in pipelines",
                other
                    .display()
                    .to_string()
                    .split(':')
                    .next()
                    .unwrap_or("this construct")
            ))),
        }
    }

    fn lower_scan(&self, table: &str, scan_schema: &DFSchemaRef) -> LowerResult<Chain> {
        if let Some(window) = self.windowed.get(table) {
            let source = self
                .sources
                .get(&window.source)
                .ok_or_else(|| self.error(format!("unknown source '{}'", window.source)))?;
            return Ok(Chain {
                source: window.source.clone(),
                operators: Vec::new(),
                schema: Arc::clone(source),
                pending_window: Some(window.clone()),
            });
        }
        if self.sources.contains_key(table) {
            return Ok(Chain {
                source: table.to_string(),
                operators: Vec::new(),
                schema: Arc::clone(scan_schema),
                pending_window: None,
            });
        }
        Err(self.error(format!("'{table}' is not a source")))
    }

    fn push(
        &self,
        chain: &mut Chain,
        kind: &str,
        node: operator_node::Kind,
        output: DFSchemaRef,
    ) -> LowerResult<()> {
        let index = chain.operators.len();
        chain.operators.push(plan::OperatorNode {
            id: format!("{index}:{kind}"),
            inputs: if index == 0 {
                vec![]
            } else {
                vec![(index - 1) as u32]
            },
            input_schema: weir_operators::encode_schema(&chain.schema)
                .map_err(|e| self.internal(e))?,
            output_schema: weir_operators::encode_schema(&output).map_err(|e| self.internal(e))?,
            kind: Some(node),
        });
        chain.schema = output;
        Ok(())
    }

    fn qualified(&self, schema: &DFSchema, name: &str) -> LowerResult<Expr> {
        let (qualifier, _) = schema
            .qualified_field_with_unqualified_name(name)
            .map_err(|_| self.error(format!("no column '{name}'")))?;
        Ok(Expr::Column(Column::new(qualifier.cloned(), name)))
    }

    /// `window_start`/`window_end` exist only once GROUP BY applies the window.
    fn check_no_window_columns(&self, chain: &Chain, exprs: &[Expr]) -> LowerResult<()> {
        if chain.pending_window.is_none() {
            return Ok(());
        }
        for expr in exprs {
            for column in expr.column_refs() {
                if column.name == WINDOW_START || column.name == WINDOW_END {
                    return Err(self
                        .error(format!("{} is only known after GROUP BY", column.name))
                        .with_hint(
                            "group by window_start/window_end and use them in SELECT or HAVING",
                        ));
                }
            }
        }
        Ok(())
    }

    fn detector(
        &self,
        function: &WindowFunction,
        output_name: String,
    ) -> LowerResult<operator_node::Kind> {
        let name = match &function.fun {
            WindowFunctionDefinition::WindowUDF(udf) => udf.name().to_string(),
            WindowFunctionDefinition::AggregateUDF(udaf) => udaf.name().to_string(),
        };
        let Some(kind) = weir_operators::detect::find(&name) else {
            let known = weir_operators::detect::registry()
                .iter()
                .map(|d| d.usage())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(self
                .error(format!(
                    "window function {name}() is not a streaming detector"
                ))
                .with_hint(format!("detectors: {known}")));
        };
        let params = &function.params;
        if params.args.len() != 1 + kind.parameter_count() {
            return Err(self.error(format!("wrong number of arguments: {}", kind.usage())));
        }
        for parameter in &params.args[1..] {
            if !is_constant(parameter) {
                return Err(self
                    .error(format!("{name}() parameters must be constants"))
                    .with_hint(kind.usage()));
            }
        }
        let encode = |e: &Expr| encode_expr(e).map_err(|e| self.internal(e));
        Ok(operator_node::Kind::Detector(plan::Detector {
            kind: name,
            partition_by: params
                .partition_by
                .iter()
                .map(encode)
                .collect::<LowerResult<_>>()?,
            args: params.args.iter().map(encode).collect::<LowerResult<_>>()?,
            output_name,
        }))
    }
}

fn is_constant(expr: &Expr) -> bool {
    match expr {
        Expr::Literal(..) => true,
        Expr::Cast(cast) => is_constant(&cast.expr),
        Expr::TryCast(cast) => is_constant(&cast.expr),
        Expr::Negative(inner) => is_constant(inner),
        _ => false,
    }
}

/// `first_value(x)` and `last_value(x)` without ORDER BY mean first and last in event time.
fn order_by_event_time(expr: Expr, time: &Expr) -> Expr {
    match expr {
        Expr::AggregateFunction(AggregateFunction { func, mut params })
            if matches!(func.name(), "first_value" | "last_value")
                && params.order_by.is_empty() =>
        {
            params.order_by = vec![SortExpr::new(time.clone(), true, false)];
            Expr::AggregateFunction(AggregateFunction { func, params })
        }
        Expr::Alias(mut alias) => {
            *alias.expr = order_by_event_time(*alias.expr, time);
            Expr::Alias(alias)
        }
        other => other,
    }
}
