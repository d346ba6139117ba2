//! SQL to Weir pipeline plans.
//!
//! ```text
//!  file.sql ──parse──> CREATE SOURCE / SINK / PIPELINE statements
//!                      │ sources & sinks: schemas, watermark rules, connector options (validated)
//!                      │ pipelines: TUMBLE/HOP rewritten to windowed views, then
//!                      ▼ DataFusion SqlToRel + analyzer (names, types, coercions)
//!            LogicalPlan ──lower──> weir_proto::plan::PipelinePlan (operators + encoded exprs)
//! ```
//!
//! What lives here: Weir's statements and their checks, the streaming rewrites, EXPLAIN, and
//! user-facing errors with `line:column` and hints. All problems in a file are reported at once.
//!
//! What does not: executing anything. Plans are data; the engine runs them.

mod catalog;
mod compat;
pub mod error;
mod explain;
mod lower;
mod parse;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::common::{DFSchema, DataFusionError, ScalarValue, SchemaError};
use datafusion::logical_expr::Expr;
use datafusion::optimizer::Analyzer;
use datafusion::sql::planner::{PlannerContext, SqlToRel};
use datafusion::sql::sqlparser::ast::{
    self as sql, FunctionArg, FunctionArgExpr, Ident, ObjectName, ObjectNamePart, Spanned,
    TableAlias, TableFactor, VisitMut, VisitorMut,
};
use prost::Message;
use weir_connectors::ConnectorSpec;
use weir_operators::window::WindowKind;
use weir_proto::plan::{self, PipelinePlan};

use crate::catalog::Catalog;
pub use crate::compat::{has_state, state_compatibility, state_loss};
pub use crate::error::{Diagnostic, PlanError, Position, Result};
pub use crate::explain::explain;
use crate::lower::{LowerContext, WINDOW_END, WINDOW_START, WindowedTable};
use crate::parse::{Options, PipelineDecl, SinkDecl, SourceDecl, Statement};

/// Every pipeline of a SQL file, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    pub pipelines: Vec<PipelinePlan>,
}

impl Compiled {
    /// The plans as one protobuf message stream: each plan length-delimited.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        for plan in &self.pipelines {
            // Writing into a Vec cannot fail.
            let _ = plan.encode_length_delimited(&mut bytes);
        }
        bytes
    }

    pub fn decode(mut bytes: &[u8]) -> std::result::Result<Self, prost::DecodeError> {
        let mut pipelines = Vec::new();
        while !bytes.is_empty() {
            pipelines.push(PipelinePlan::decode_length_delimited(&mut bytes)?);
        }
        Ok(Self { pipelines })
    }
}

/// Compiles a whole SQL file into pipeline plans, or reports every problem in it.
pub fn compile(sql: &str) -> Result<Compiled> {
    let (statements, mut diagnostics) = parse::parse_file(sql);
    let mut compiler = Compiler::new();
    for statement in &statements {
        let result = match statement {
            Statement::Source(source) => compiler.add_source(source),
            Statement::Sink(sink) => compiler.add_sink(sink),
            Statement::Pipeline(_) => Ok(()),
        };
        if let Err(d) = result {
            diagnostics.push(d);
        }
    }
    let mut pipelines = Vec::new();
    for statement in &statements {
        if let Statement::Pipeline(pipeline) = statement {
            match compiler.pipeline(pipeline) {
                Ok(plan) => pipelines.push(plan),
                Err(d) => diagnostics.push(d),
            }
        }
    }
    if pipelines.is_empty() && diagnostics.is_empty() {
        diagnostics.push(
            Diagnostic::new(
                Position { line: 1, column: 1 },
                "no CREATE PIPELINE in this file",
            )
            .with_hint(
                "a pipeline reads: CREATE PIPELINE name AS INSERT INTO sink SELECT ... FROM source",
            ),
        );
    }
    if diagnostics.is_empty() {
        Ok(Compiled { pipelines })
    } else {
        diagnostics.sort_by_key(|d| d.position);
        Err(PlanError { diagnostics })
    }
}

struct SourceEntry {
    schema: Arc<DFSchema>,
    watermark: Option<plan::WatermarkRule>,
    connector: plan::Connector,
}

struct SinkEntry {
    options: Options,
    position: Position,
}

struct Compiler {
    catalog: Catalog,
    sources: HashMap<String, SourceEntry>,
    sinks: HashMap<String, SinkEntry>,
}

fn normalize(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    }
}

fn span_position(
    span: datafusion::sql::sqlparser::tokenizer::Span,
    fallback: Position,
) -> Position {
    if span.start.line == 0 {
        fallback
    } else {
        parse::position(span.start)
    }
}

impl Compiler {
    fn new() -> Self {
        Self {
            catalog: Catalog::new(),
            sources: HashMap::new(),
            sinks: HashMap::new(),
        }
    }

    fn planner(&self) -> SqlToRel<'_, Catalog> {
        SqlToRel::new(&self.catalog)
    }

    fn add_source(&mut self, source: &SourceDecl) -> std::result::Result<(), Diagnostic> {
        let name = source.name.to_ascii_lowercase();
        if self.sources.contains_key(&name) || self.sinks.contains_key(&name) {
            return Err(Diagnostic::new(
                source.position,
                format!("'{name}' is declared twice"),
            ));
        }
        let schema = self
            .planner()
            .build_schema(source.columns.clone())
            .map_err(|e| datafusion_diagnostic(e, source.position, None))?;
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        let watermark = match &source.watermark {
            None => None,
            Some(decl) => {
                let column = normalize(&decl.column);
                let at = span_position(decl.column.span, decl.position);
                let Some(field) = fields.iter_mut().find(|f| f.name() == &column) else {
                    return Err(unknown_column(
                        at,
                        &column,
                        schema.fields().iter().map(|f| f.name().as_str()),
                    ));
                };
                if !matches!(field.data_type(), DataType::Timestamp(_, _)) {
                    return Err(Diagnostic::new(
                        at,
                        format!(
                            "watermark column '{column}' is {}, not a TIMESTAMP",
                            field.data_type()
                        ),
                    ));
                }
                // Event time is always nanoseconds internally; connectors convert on the way in.
                *field = field
                    .clone()
                    .with_data_type(DataType::Timestamp(TimeUnit::Nanosecond, None));
                let delay_ns = self.watermark_delay(&column, &decl.expr, decl.position)?;
                Some(plan::WatermarkRule {
                    column,
                    delay_ns,
                    display: format!("{} AS {}", decl.column, decl.expr),
                })
            }
        };
        let arrow_schema = Schema::new(fields);
        let connector = connector(&source.options, source.position, "source")?;
        let spec = ConnectorSpec {
            connector: connector.name.clone(),
            name: name.clone(),
            options: source.options.values.clone(),
            event_time: watermark.as_ref().map(|w| w.column.clone()),
        };
        let df_schema = DFSchema::try_from_qualified_schema(name.as_str(), &arrow_schema)
            .map_err(|e| datafusion_diagnostic(e, source.position, None))?;
        // Registered before the connector check so that pipelines reading this source are
        // still checked, instead of failing with a misleading "unknown source".
        self.catalog
            .add_table(&name, Arc::new(arrow_schema.clone()));
        self.sources.insert(
            name,
            SourceEntry {
                schema: Arc::new(df_schema),
                watermark,
                connector,
            },
        );
        weir_connectors::validate_source(&spec, &arrow_schema).map_err(|e| {
            connector_diagnostic(
                e,
                &source.options,
                weir_connectors::registry::source_connectors(),
            )
        })
    }

    fn watermark_delay(
        &self,
        column: &str,
        expr: &sql::Expr,
        at: Position,
    ) -> std::result::Result<i64, Diagnostic> {
        let shape_error = || {
            Diagnostic::new(
                span_position(expr.span(), at),
                "watermark must be the column or the column minus an interval",
            )
            .with_hint(format!(
                "e.g. WATERMARK FOR {column} AS {column} - INTERVAL '2' SECOND"
            ))
        };
        match expr {
            sql::Expr::Identifier(ident) if normalize(ident) == column => Ok(0),
            sql::Expr::BinaryOp {
                left,
                op: sql::BinaryOperator::Minus,
                right,
            } => {
                match left.as_ref() {
                    sql::Expr::Identifier(ident) if normalize(ident) == column => {}
                    _ => return Err(shape_error()),
                }
                let delay = self.interval_ns(right, at)?;
                if delay < 0 {
                    return Err(Diagnostic::new(
                        span_position(right.span(), at),
                        "watermark delay must not be negative",
                    ));
                }
                Ok(delay)
            }
            _ => Err(shape_error()),
        }
    }

    /// Evaluates a constant interval such as `INTERVAL '1' SECOND` to nanoseconds.
    fn interval_ns(
        &self,
        expr: &sql::Expr,
        fallback: Position,
    ) -> std::result::Result<i64, Diagnostic> {
        let at = span_position(expr.span(), fallback);
        let not_interval = || {
            Diagnostic::new(at, format!("expected a constant interval, found {expr}"))
                .with_hint("e.g. INTERVAL '1' SECOND or INTERVAL '500' MILLISECOND")
        };
        let planned = self
            .planner()
            .sql_to_expr(expr.clone(), &DFSchema::empty(), &mut PlannerContext::new())
            .map_err(|e| datafusion_diagnostic(e, at, None))?;
        let Expr::Literal(value, _) = planned else {
            return Err(not_interval());
        };
        let too_long = || Diagnostic::new(at, "interval is too long to represent in nanoseconds");
        let day_ns = 86_400_000_000_000i64;
        match value {
            ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => i64::from(v.days)
                .checked_mul(day_ns)
                .and_then(|d| d.checked_add(v.nanoseconds))
                .ok_or_else(too_long),
            ScalarValue::IntervalDayTime(Some(v)) => i64::from(v.days)
                .checked_mul(day_ns)
                .and_then(|d| d.checked_add(i64::from(v.milliseconds) * 1_000_000))
                .ok_or_else(too_long),
            ScalarValue::IntervalMonthDayNano(Some(_)) | ScalarValue::IntervalYearMonth(_) => {
                Err(Diagnostic::new(
                    at,
                    "months and years have no fixed length; use days or smaller units",
                ))
            }
            _ => Err(not_interval()),
        }
    }

    fn add_sink(&mut self, sink: &SinkDecl) -> std::result::Result<(), Diagnostic> {
        let name = sink.name.to_ascii_lowercase();
        if self.sources.contains_key(&name) || self.sinks.contains_key(&name) {
            return Err(Diagnostic::new(
                sink.position,
                format!("'{name}' is declared twice"),
            ));
        }
        connector(&sink.options, sink.position, "sink")?;
        self.sinks.insert(
            name,
            SinkEntry {
                options: Options {
                    connector: sink.options.connector.clone(),
                    values: sink.options.values.clone(),
                    position: sink.options.position,
                },
                position: sink.position,
            },
        );
        Ok(())
    }

    fn pipeline(&self, decl: &PipelineDecl) -> std::result::Result<PipelinePlan, Diagnostic> {
        let sink_name = normalize(&decl.sink);
        let sink_at = span_position(decl.sink.span, decl.position);
        let Some(sink) = self.sinks.get(&sink_name) else {
            let hint = nearest(&sink_name, self.sinks.keys().map(String::as_str))
                .map(|n| format!("did you mean '{n}'?"))
                .unwrap_or_else(|| {
                    format!("declare it first: CREATE SINK {sink_name} WITH (connector = 'stdout')")
                });
            return Err(
                Diagnostic::new(sink_at, format!("unknown sink '{sink_name}'")).with_hint(hint),
            );
        };

        // TUMBLE(...) and HOP(...) in FROM become private views with window columns.
        let mut query = decl.query.clone();
        let mut rewriter = WindowRewriter {
            compiler: self,
            windowed: HashMap::new(),
            error: None,
            fallback: decl.position,
        };
        let _ = query.visit(&mut rewriter);
        if let Some(error) = rewriter.error {
            return Err(error);
        }
        let windowed = rewriter.windowed;

        let mut catalog = Catalog::new();
        for (name, entry) in &self.sources {
            catalog.add_table(name, Arc::new(entry.schema.as_arrow().clone()));
        }
        for (view, window) in &windowed {
            let source = &self.sources[&window.source];
            let mut fields: Vec<Field> = source
                .schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            let ts = DataType::Timestamp(TimeUnit::Nanosecond, None);
            fields.push(Field::new(WINDOW_START, ts.clone(), false));
            fields.push(Field::new(WINDOW_END, ts, false));
            catalog.add_table(view, Arc::new(Schema::new(fields)));
        }
        let planner = SqlToRel::new(&catalog);
        let logical = planner
            .sql_statement_to_plan(sql::Statement::Query(query))
            .map_err(|e| datafusion_diagnostic(e, decl.position, Some(&catalog)))?;
        let logical = Analyzer::new()
            .execute_and_check(logical, catalog.options(), |_, _| {})
            .map_err(|e| datafusion_diagnostic(e, decl.position, Some(&catalog)))?;

        let sources: HashMap<String, Arc<DFSchema>> = self
            .sources
            .iter()
            .map(|(n, e)| (n.clone(), Arc::clone(&e.schema)))
            .collect();
        let group_by = match decl.query.body.as_ref() {
            sql::SetExpr::Select(select) => match &select.group_by {
                sql::GroupByExpr::Expressions(exprs, _) => exprs
                    .first()
                    .map(|e| span_position(e.span(), decl.position)),
                sql::GroupByExpr::All(_) => None,
            },
            _ => None,
        };
        let chain = LowerContext {
            windowed: &windowed,
            sources: &sources,
            position: decl.position,
            group_by,
        }
        .lower(&logical)?;
        let source = &self.sources[&chain.source];

        let sink_schema = chain.schema.as_arrow().clone();
        let sink_connector = connector(&sink.options, sink.position, "sink")?;
        let spec = ConnectorSpec {
            connector: sink_connector.name.clone(),
            name: sink_name.clone(),
            options: sink.options.values.clone(),
            event_time: None,
        };
        weir_connectors::validate_sink(&spec, &sink_schema).map_err(|e| {
            connector_diagnostic(
                e,
                &sink.options,
                weir_connectors::registry::sink_connectors(),
            )
        })?;

        let encode_schema = |schema: &DFSchema| {
            weir_operators::encode_schema(schema)
                .map_err(|e| Diagnostic::new(decl.position, format!("cannot encode the plan: {e}")))
        };
        Ok(PipelinePlan {
            format_version: weir_proto::PLAN_FORMAT_VERSION,
            name: decl.name.to_ascii_lowercase(),
            sql: decl.text.clone(),
            source: Some(plan::SourceNode {
                name: chain.source.clone(),
                schema: encode_schema(&source.schema)?,
                watermark: source.watermark.clone(),
                connector: Some(source.connector.clone()),
            }),
            operators: chain.operators,
            sink: Some(plan::SinkNode {
                name: sink_name,
                connector: Some(sink_connector),
                schema: encode_schema(&chain.schema)?,
            }),
        })
    }
}

fn connector(
    options: &Options,
    at: Position,
    what: &str,
) -> std::result::Result<plan::Connector, Diagnostic> {
    let Some((name, _)) = &options.connector else {
        return Err(Diagnostic::new(
            options.position.max(at),
            format!("the {what} names no connector"),
        )
        .with_hint("add connector = '...' to its WITH options"));
    };
    Ok(plan::Connector {
        name: name.clone(),
        options_json: serde_json::Value::Object(options.values.clone()).to_string(),
    })
}

fn connector_diagnostic(
    error: weir_connectors::ConnectorError,
    options: &Options,
    known: &[&str],
) -> Diagnostic {
    let at = options
        .connector
        .as_ref()
        .map_or(options.position, |(_, at)| *at);
    let mut diagnostic = Diagnostic::new(at, error.to_string());
    if let Some((name, _)) = &options.connector
        && !known.contains(&name.as_str())
        && !diagnostic.message.contains("known")
    {
        diagnostic = diagnostic.with_hint(format!("connectors: {}", known.join(", ")));
    }
    diagnostic
}

fn nearest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|(distance, c)| *distance <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| c)
}

fn unknown_column<'a>(
    at: Position,
    name: &str,
    valid: impl Iterator<Item = &'a str>,
) -> Diagnostic {
    let diagnostic = Diagnostic::new(at, format!("unknown column '{name}'"));
    match nearest(name, valid) {
        Some(n) => diagnostic.with_hint(format!("did you mean '{n}'?")),
        None => diagnostic,
    }
}

/// Turns a DataFusion planning error into a diagnostic at the best position we know.
fn datafusion_diagnostic(
    error: DataFusionError,
    fallback: Position,
    catalog: Option<&Catalog>,
) -> Diagnostic {
    let at = error
        .diagnostic()
        .and_then(|d| d.span)
        .map_or(fallback, |span| {
            if span.start.line == 0 {
                fallback
            } else {
                Position {
                    line: span.start.line,
                    column: span.start.column,
                }
            }
        });
    let root = error.find_root();
    if let DataFusionError::SchemaError(schema_error, _) = root
        && let SchemaError::FieldNotFound {
            field,
            valid_fields,
        } = schema_error.as_ref()
    {
        let names: Vec<&str> = valid_fields
            .iter()
            .map(|c| c.name.as_str())
            .filter(|n| !n.starts_with("__"))
            .collect();
        return unknown_column(at, &field.name, names.into_iter());
    }
    let message = root.message().trim().to_string();
    if let Some(rest) = message.strip_prefix("unknown source '") {
        let name = rest.trim_end_matches('\'');
        let diagnostic = Diagnostic::new(at, format!("unknown source '{name}'"));
        if let Some(n) = catalog.and_then(|c| nearest(name, c.table_names())) {
            return diagnostic.with_hint(format!("did you mean '{n}'?"));
        }
        return diagnostic;
    }
    let mut diagnostic = Diagnostic::new(at, first_line(&message));
    if message.contains("Cannot infer common")
        || message.contains("Cannot coerce")
        || message.contains("coercion")
        || message.contains("No function matches")
        || message.contains("cannot be cast")
    {
        diagnostic = diagnostic
            .with_hint("types do not match; convert one side explicitly, e.g. CAST(x AS DOUBLE)");
    }
    diagnostic
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).to_string()
}

/// Replaces `TUMBLE(source, ts, size)` and `HOP(source, ts, slide, size)` in FROM with a view
/// named after the window and aliased to the source name, so `source.col` still resolves.
struct WindowRewriter<'a> {
    compiler: &'a Compiler,
    windowed: HashMap<String, WindowedTable>,
    error: Option<Diagnostic>,
    fallback: Position,
}

impl VisitorMut for WindowRewriter<'_> {
    type Break = ();

    fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
        let TableFactor::Table {
            name,
            alias,
            args: Some(args),
            ..
        } = factor
        else {
            return ControlFlow::Continue(());
        };
        let function = name.to_string().to_ascii_uppercase();
        let at = span_position(name.span(), self.fallback);
        let result = match function.as_str() {
            "TUMBLE" | "HOP" => self.window(&function, &args.args, at),
            _ => Err(
                Diagnostic::new(at, format!("unknown table function {function}"))
                    .with_hint("windows: TUMBLE(source, ts, size), HOP(source, ts, slide, size)"),
            ),
        };
        match result {
            Ok((view, source)) => {
                let alias_name = alias.clone().unwrap_or(TableAlias {
                    explicit: true,
                    name: Ident::new(source),
                    columns: vec![],
                    at: None,
                });
                *name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(view))]);
                *alias = Some(alias_name);
                if let TableFactor::Table { args, .. } = factor {
                    *args = None;
                }
                ControlFlow::Continue(())
            }
            Err(diagnostic) => {
                self.error = Some(diagnostic);
                ControlFlow::Break(())
            }
        }
    }
}

impl WindowRewriter<'_> {
    fn window(
        &mut self,
        function: &str,
        args: &[FunctionArg],
        at: Position,
    ) -> std::result::Result<(String, String), Diagnostic> {
        let usage = if function == "TUMBLE" {
            "TUMBLE(source, ts, INTERVAL '1' SECOND)"
        } else {
            "HOP(source, ts, INTERVAL '1' SECOND, INTERVAL '10' SECOND)"
        };
        let expected = if function == "TUMBLE" { 3 } else { 4 };
        let exprs: Vec<&sql::Expr> = args
            .iter()
            .filter_map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
                _ => None,
            })
            .collect();
        if exprs.len() != expected || args.len() != expected {
            return Err(
                Diagnostic::new(at, format!("{function} takes {expected} arguments"))
                    .with_hint(usage),
            );
        }
        let ident = |e: &sql::Expr| match e {
            sql::Expr::Identifier(i) => Some(normalize(i)),
            _ => None,
        };
        let source_at = span_position(exprs[0].span(), at);
        let Some(source) = ident(exprs[0]) else {
            return Err(Diagnostic::new(
                source_at,
                "the first window argument must be a source name",
            )
            .with_hint(usage));
        };
        let Some(entry) = self.compiler.sources.get(&source) else {
            let diagnostic = Diagnostic::new(source_at, format!("unknown source '{source}'"));
            return Err(
                match nearest(&source, self.compiler.sources.keys().map(String::as_str)) {
                    Some(n) => diagnostic.with_hint(format!("did you mean '{n}'?")),
                    None => {
                        diagnostic.with_hint("declare it with CREATE SOURCE before the pipeline")
                    }
                },
            );
        };
        let time_at = span_position(exprs[1].span(), at);
        let Some(time) = ident(exprs[1]) else {
            return Err(Diagnostic::new(
                time_at,
                "the second window argument must be the event-time column",
            )
            .with_hint(usage));
        };
        if entry.schema.as_arrow().field_with_name(&time).is_err() {
            return Err(unknown_column(
                time_at,
                &time,
                entry.schema.fields().iter().map(|f| f.name().as_str()),
            ));
        }
        match &entry.watermark {
            None => {
                return Err(Diagnostic::new(time_at, format!("source '{source}' has no WATERMARK, so event-time windows would never close"))
                    .with_hint(format!("add WATERMARK FOR {time} AS {time} - INTERVAL '2' SECOND to CREATE SOURCE {source}")));
            }
            Some(rule) if rule.column != time => {
                return Err(Diagnostic::new(
                    time_at,
                    format!(
                        "windows must use the watermark column '{}' of '{source}'",
                        rule.column
                    ),
                ));
            }
            Some(_) => {}
        }
        let positive = |e: &sql::Expr| -> std::result::Result<i64, Diagnostic> {
            let ns = self.compiler.interval_ns(e, at)?;
            if ns <= 0 {
                return Err(Diagnostic::new(
                    span_position(e.span(), at),
                    "window length must be positive, not zero or negative",
                )
                .with_hint(usage));
            }
            Ok(ns)
        };
        let kind = if function == "TUMBLE" {
            WindowKind::Tumble {
                size: positive(exprs[2])?,
            }
        } else {
            let slide = positive(exprs[2])?;
            let size = positive(exprs[3])?;
            if size / slide > weir_operators::window::MAX_WINDOWS_PER_ROW {
                return Err(Diagnostic::new(
                    span_position(exprs[2].span(), at),
                    format!(
                        "HOP windows overlap {} times; at most {} are allowed",
                        size / slide,
                        weir_operators::window::MAX_WINDOWS_PER_ROW
                    ),
                )
                .with_hint("use a longer slide, or aggregate in two steps"));
            }
            if slide > size {
                return Err(Diagnostic::new(span_position(exprs[2].span(), at), "HOP slide is longer than the window size, so rows between windows would be lost")
                    .with_hint(usage));
            }
            WindowKind::Hop { size, slide }
        };
        let view = format!("__weir_window_{}", self.windowed.len());
        self.windowed.insert(
            view.clone(),
            WindowedTable {
                source: source.clone(),
                time_column: time,
                kind,
            },
        );
        Ok((view, source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "CREATE SOURCE vibration (
        sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE,
        WATERMARK FOR ts AS ts - INTERVAL '2' SECOND
    ) WITH (connector = 'file', path = 'in.jsonl', format = 'json');
    CREATE SINK out WITH (connector = 'stdout');";

    fn compile_one(pipeline: &str) -> PipelinePlan {
        let compiled = compile(&format!("{SOURCE}\n{pipeline}"))
            .unwrap_or_else(|e| panic!("does not compile:\n{}", e.render("test.sql")));
        compiled.pipelines.into_iter().next().expect("one pipeline")
    }

    fn errors(sql: &str) -> Vec<String> {
        match compile(sql) {
            Ok(_) => panic!("compiled but should not"),
            Err(e) => e.diagnostics.iter().map(|d| d.render("f.sql")).collect(),
        }
    }

    #[test]
    fn explain_is_identical_after_an_encode_decode_round_trip() {
        let sql = format!(
            "{SOURCE}
            CREATE PIPELINE rms AS INSERT INTO out
            SELECT sensor, window_start, window_end, sqrt(avg(v * v)) AS rms, max(abs(v)) AS peak,
                   first_value(v) AS first_v, approx_percentile_cont(0.9) WITHIN GROUP (ORDER BY v) AS p90
            FROM TUMBLE(vibration, ts, INTERVAL '1' SECOND)
            WHERE v IS NOT NULL
            GROUP BY sensor, window_start, window_end
            HAVING count(*) > 10;
            CREATE PIPELINE spikes AS INSERT INTO out
            SELECT * FROM (SELECT sensor, ts, zscore(v, 50) OVER (PARTITION BY sensor ORDER BY ts) AS z FROM vibration)
            WHERE abs(z) > 4;"
        );
        let compiled = compile(&sql).expect("compiles");
        let decoded = Compiled::decode(&compiled.encode()).expect("decodes");
        assert_eq!(decoded, compiled);
        for (before, after) in compiled.pipelines.iter().zip(&decoded.pipelines) {
            let text = explain(before);
            assert_eq!(text, explain(after));
            assert!(!text.contains('<'), "every expression decodes: {text}");
        }
        let rms = explain(&compiled.pipelines[0]);
        assert!(
            rms.contains("watermark: ts AS ts - INTERVAL '2' SECOND (delay 2s)"),
            "{rms}"
        );
        assert!(rms.contains("TUMBLE(size 1s) ON ts"), "{rms}");
        assert!(
            rms.contains("output: sensor text not null, window_start timestamp not null"),
            "{rms}"
        );
        let spikes = explain(&compiled.pipelines[1]);
        assert!(spikes.contains("zscore("), "{spikes}");
    }

    #[test]
    fn a_tumbling_aggregate_lowers_to_a_window_then_filter_and_projection() {
        let plan = compile_one(
            "CREATE PIPELINE p AS INSERT INTO out
             SELECT sensor, window_start, avg(v) AS mean FROM TUMBLE(vibration, ts, INTERVAL '500' MILLISECOND)
             WHERE v > 0 GROUP BY sensor, window_start HAVING count(*) > 1;",
        );
        let kinds: Vec<&str> = plan
            .operators
            .iter()
            .map(|o| o.id.split(':').nth(1).unwrap_or(""))
            .collect();
        assert_eq!(kinds, ["filter", "window_aggregate", "filter", "project"]);
        let Some(plan::operator_node::Kind::WindowAggregate(window)) = &plan.operators[1].kind
        else {
            panic!("not a window");
        };
        assert_eq!(
            window.window,
            Some(plan::window_aggregate::Window::Tumble(plan::Tumble {
                size_ns: 500_000_000
            }))
        );
        assert_eq!(
            plan.source
                .as_ref()
                .and_then(|s| s.watermark.as_ref())
                .map(|w| w.delay_ns),
            Some(2_000_000_000)
        );
    }

    #[test]
    fn hop_takes_slide_then_size_and_refuses_gaps() {
        let plan = compile_one(
            "CREATE PIPELINE p AS INSERT INTO out SELECT sensor, window_end, max(v) FROM
             HOP(vibration, ts, INTERVAL '1' SECOND, INTERVAL '5' SECOND) GROUP BY sensor, window_end;",
        );
        let Some(plan::operator_node::Kind::WindowAggregate(window)) = &plan.operators[0].kind
        else {
            panic!("not a window");
        };
        assert_eq!(
            window.window,
            Some(plan::window_aggregate::Window::Hop(plan::Hop {
                size_ns: 5_000_000_000,
                slide_ns: 1_000_000_000
            }))
        );
        let gap = errors(&format!(
            "{SOURCE}\nCREATE PIPELINE p AS INSERT INTO out SELECT count(*) FROM
             HOP(vibration, ts, INTERVAL '5' SECOND, INTERVAL '1' SECOND) GROUP BY window_start;"
        ));
        assert!(
            gap[0].contains("slide is longer than the window size"),
            "{gap:?}"
        );
    }

    #[test]
    fn streaming_errors_name_the_problem() {
        let order = errors(&format!(
            "{SOURCE}\nCREATE PIPELINE p AS INSERT INTO out SELECT v FROM vibration ORDER BY v;"
        ));
        assert!(
            order[0].contains("ORDER BY has no end on a stream"),
            "{order:?}"
        );
        let join = errors(&format!(
            "{SOURCE}\nCREATE PIPELINE p AS INSERT INTO out SELECT a.v FROM vibration a JOIN vibration b ON a.sensor = b.sensor;"
        ));
        assert!(join[0].contains("joins are not supported"), "{join:?}");
        let unknown = errors(&format!(
            "{SOURCE}\nCREATE PIPELINE p AS INSERT INTO out SELECT v FROM vibraton;"
        ));
        assert!(
            unknown[0].contains("did you mean 'vibration'"),
            "{unknown:?}"
        );
        let no_pipeline = errors(SOURCE);
        assert!(
            no_pipeline[0].contains("no CREATE PIPELINE"),
            "{no_pipeline:?}"
        );
        let detector_args = errors(&format!(
            "{SOURCE}\nCREATE PIPELINE p AS INSERT INTO out SELECT zscore(v, v) OVER (PARTITION BY sensor) FROM vibration;"
        ));
        assert!(
            detector_args[0].contains("parameters must be constants"),
            "{detector_args:?}"
        );
    }

    #[test]
    fn the_watermark_must_be_a_timestamp_column_minus_an_interval() {
        let not_time = errors(
            "CREATE SOURCE s (v DOUBLE, WATERMARK FOR v AS v - INTERVAL '1' SECOND) WITH (connector = 'file', path = 'x');",
        );
        assert!(not_time[0].contains("not a TIMESTAMP"), "{not_time:?}");
        let shape = errors(
            "CREATE SOURCE s (ts TIMESTAMP, WATERMARK FOR ts AS ts + INTERVAL '1' SECOND) WITH (connector = 'file', path = 'x');",
        );
        assert!(shape[0].contains("minus an interval"), "{shape:?}");
        let months = errors(
            "CREATE SOURCE s (ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' MONTH) WITH (connector = 'file', path = 'x');",
        );
        assert!(months[0].contains("no fixed length"), "{months:?}");
    }
}
