//! The statements Weir adds to SQL, parsed with sqlparser's tokenizer and parser so that
//! expressions, types and queries inside them are exactly DataFusion's dialect:
//!
//! ```sql
//! CREATE SOURCE name (col TYPE [NOT NULL], ..., WATERMARK FOR col AS col - INTERVAL '2' SECOND)
//!     WITH (connector = 'file', key = 'value', ...);
//! CREATE SINK name WITH (connector = 'stdout', ...);
//! CREATE PIPELINE name AS INSERT INTO sink SELECT ...;
//! ```
//!
//! Each statement is parsed on its own, so one broken statement is reported and the rest are
//! still checked.

use datafusion::sql::sqlparser::ast::{ColumnDef, Expr, Ident, Query, Value};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};
use serde_json::{Map, Value as Json};

use crate::error::{Diagnostic, Position};

#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per statement; boxing buys nothing
pub enum Statement {
    Source(SourceDecl),
    Sink(SinkDecl),
    Pipeline(PipelineDecl),
}

#[derive(Debug)]
pub struct SourceDecl {
    pub name: String,
    pub position: Position,
    pub columns: Vec<ColumnDef>,
    pub watermark: Option<WatermarkDecl>,
    pub options: Options,
}

#[derive(Debug)]
pub struct WatermarkDecl {
    pub column: Ident,
    /// The expression after AS, e.g. `ts - INTERVAL '2' SECOND`.
    pub expr: Expr,
    pub position: Position,
}

#[derive(Debug)]
pub struct SinkDecl {
    pub name: String,
    pub position: Position,
    pub options: Options,
}

#[derive(Debug)]
pub struct PipelineDecl {
    pub name: String,
    pub position: Position,
    pub sink: Ident,
    pub query: Box<Query>,
    /// The statement as written.
    pub text: String,
}

/// `WITH (key = value, ...)`: `connector` separately, the rest as JSON values.
#[derive(Debug, Default)]
pub struct Options {
    pub connector: Option<(String, Position)>,
    pub values: Map<String, Json>,
    pub position: Position,
}

pub fn position(location: Location) -> Position {
    Position {
        line: location.line,
        column: location.column,
    }
}

/// Parses a whole file. Returns the statements that parsed and a diagnostic per one that did not.
pub fn parse_file(sql: &str) -> (Vec<Statement>, Vec<Diagnostic>) {
    let dialect = GenericDialect {};
    let tokens = match Tokenizer::new(&dialect, sql).tokenize_with_location() {
        Ok(tokens) => tokens,
        Err(e) => {
            let at = Position {
                line: e.location.line,
                column: e.location.column,
            };
            return (Vec::new(), vec![Diagnostic::new(at, e.message)]);
        }
    };
    let line_starts = line_starts(sql);
    let mut statements = Vec::new();
    let mut diagnostics = Vec::new();
    for chunk in tokens.split(|t| t.token == Token::SemiColon) {
        let meaningful: Vec<TokenWithSpan> = chunk
            .iter()
            .filter(|t| !matches!(t.token, Token::Whitespace(_)))
            .cloned()
            .collect();
        let (Some(first), Some(last)) = (meaningful.first(), meaningful.last()) else {
            continue;
        };
        let text = slice(sql, &line_starts, first.span.start, last.span.end).to_string();
        match parse_statement(&dialect, chunk.to_vec(), text) {
            Ok(statement) => statements.push(statement),
            Err(mut diagnostic) => {
                // sqlparser gives no position for "found: EOF": the statement ended too early,
                // so point just past its last token.
                if diagnostic.message.ends_with("found: EOF") {
                    diagnostic.position = position(last.span.end);
                    diagnostic.message = diagnostic
                        .message
                        .replace("found: EOF", "but the statement ends here");
                }
                diagnostics.push(diagnostic);
            }
        }
    }
    (statements, diagnostics)
}

fn line_starts(sql: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(sql.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

fn offset(sql: &str, line_starts: &[usize], location: Location) -> usize {
    let Some(&start) = line_starts.get(location.line.saturating_sub(1) as usize) else {
        return sql.len();
    };
    // Columns count characters, not bytes.
    sql[start..]
        .char_indices()
        .nth(location.column.saturating_sub(1) as usize)
        .map_or(sql.len(), |(i, _)| start + i)
}

fn slice<'a>(sql: &'a str, line_starts: &[usize], start: Location, end: Location) -> &'a str {
    let from = offset(sql, line_starts, start);
    let to = offset(sql, line_starts, end).max(from);
    &sql[from..to]
}

fn parse_statement(
    dialect: &GenericDialect,
    tokens: Vec<TokenWithSpan>,
    text: String,
) -> Result<Statement, Diagnostic> {
    let mut parser = Parser::new(dialect).with_tokens_with_locations(tokens);
    let start = position(parser.peek_token().span.start);
    let err = |e: ParserError| parser_diagnostic(e, start);
    parser.expect_keyword(Keyword::CREATE).map_err(err)?;
    let kind = parser.next_token();
    let word = match &kind.token {
        Token::Word(w) => w.value.to_ascii_uppercase(),
        _ => String::new(),
    };
    match word.as_str() {
        "SOURCE" => parse_source(&mut parser, start).map(Statement::Source),
        "SINK" => parse_sink(&mut parser, start).map(Statement::Sink),
        "PIPELINE" => parse_pipeline(&mut parser, start, text).map(Statement::Pipeline),
        _ => Err(Diagnostic::new(
            position(kind.span.start),
            format!(
                "expected SOURCE, SINK or PIPELINE after CREATE, found {}",
                kind.token
            ),
        )
        .with_hint("a Weir file holds CREATE SOURCE, CREATE SINK and CREATE PIPELINE statements")),
    }
}

fn parser_diagnostic(error: ParserError, fallback: Position) -> Diagnostic {
    let message = match &error {
        ParserError::ParserError(m) | ParserError::TokenizerError(m) => m.clone(),
        ParserError::RecursionLimitExceeded => "statement nests too deeply".to_string(),
    };
    // sqlparser appends " at Line: L, Column: C" to its messages.
    if let Some(at) = message.rfind(" at Line: ") {
        let tail = &message[at + " at Line: ".len()..];
        let mut parts = tail.split(", Column: ");
        let line = parts.next().and_then(|l| l.trim().parse().ok());
        let column = parts.next().and_then(|c| c.trim().parse().ok());
        if let (Some(line), Some(column)) = (line, column) {
            return Diagnostic::new(Position { line, column }, message[..at].to_string());
        }
    }
    Diagnostic::new(fallback, message)
}

fn parse_source(parser: &mut Parser, start: Position) -> Result<SourceDecl, Diagnostic> {
    let err = |e: ParserError| parser_diagnostic(e, start);
    let name = parser.parse_identifier().map_err(err)?;
    parser.expect_token(&Token::LParen).map_err(err)?;
    let mut columns = Vec::new();
    let mut watermark = None;
    loop {
        let next = parser.peek_token();
        if matches!(&next.token, Token::Word(w) if w.value.eq_ignore_ascii_case("WATERMARK")) {
            parser.next_token();
            parser.expect_keyword(Keyword::FOR).map_err(err)?;
            let column = parser.parse_identifier().map_err(err)?;
            parser.expect_keyword(Keyword::AS).map_err(err)?;
            let expr = parser.parse_expr().map_err(err)?;
            watermark = Some(WatermarkDecl {
                column,
                expr,
                position: position(next.span.start),
            });
        } else {
            columns.push(parser.parse_column_def().map_err(err)?);
        }
        if !parser.consume_token(&Token::Comma) {
            break;
        }
    }
    parser.expect_token(&Token::RParen).map_err(err)?;
    let options = parse_with(parser, start)?;
    expect_end(parser, start)?;
    Ok(SourceDecl {
        name: name.value,
        position: start,
        columns,
        watermark,
        options,
    })
}

fn parse_sink(parser: &mut Parser, start: Position) -> Result<SinkDecl, Diagnostic> {
    let name = parser
        .parse_identifier()
        .map_err(|e| parser_diagnostic(e, start))?;
    let options = parse_with(parser, start)?;
    expect_end(parser, start)?;
    Ok(SinkDecl {
        name: name.value,
        position: start,
        options,
    })
}

fn parse_pipeline(
    parser: &mut Parser,
    start: Position,
    text: String,
) -> Result<PipelineDecl, Diagnostic> {
    let err = |e: ParserError| parser_diagnostic(e, start);
    let name = parser.parse_identifier().map_err(err)?;
    parser.expect_keyword(Keyword::AS).map_err(err)?;
    parser.expect_keyword(Keyword::INSERT).map_err(|e| {
        parser_diagnostic(e, start)
            .with_hint("a pipeline reads: CREATE PIPELINE name AS INSERT INTO sink SELECT ...")
    })?;
    parser.expect_keyword(Keyword::INTO).map_err(err)?;
    let sink = parser.parse_identifier().map_err(err)?;
    let query = parser.parse_query().map_err(err)?;
    expect_end(parser, start)?;
    Ok(PipelineDecl {
        name: name.value,
        position: start,
        sink,
        query,
        text,
    })
}

fn expect_end(parser: &mut Parser, start: Position) -> Result<(), Diagnostic> {
    let next = parser.peek_token();
    if next.token == Token::EOF {
        Ok(())
    } else {
        let at = if next.span.start.line == 0 {
            start
        } else {
            position(next.span.start)
        };
        let missing_semicolon =
            matches!(&next.token, Token::Word(w) if w.keyword == Keyword::CREATE);
        let diagnostic = Diagnostic::new(
            at,
            format!("unexpected '{}' after the end of the statement", next.token),
        );
        Err(if missing_semicolon {
            diagnostic.with_hint("statements are separated by ';'")
        } else {
            diagnostic
        })
    }
}

fn parse_with(parser: &mut Parser, start: Position) -> Result<Options, Diagnostic> {
    let err = |e: ParserError| parser_diagnostic(e, start);
    let at = position(parser.peek_token().span.start);
    if !parser.parse_keyword(Keyword::WITH) {
        return Err(
            Diagnostic::new(at, "expected WITH (connector = '...', ...)").with_hint(
                "every source and sink names its connector, e.g. WITH (connector = 'stdout')",
            ),
        );
    }
    parser.expect_token(&Token::LParen).map_err(err)?;
    let mut options = Options {
        position: at,
        ..Options::default()
    };
    loop {
        if parser.consume_token(&Token::RParen) {
            break;
        }
        let key_token = parser.peek_token();
        let key_at = position(key_token.span.start);
        let key = match &key_token.token {
            Token::Word(w) => w.value.to_ascii_lowercase(),
            Token::SingleQuotedString(s) => s.clone(),
            other => {
                return Err(Diagnostic::new(
                    key_at,
                    format!("expected an option name, found {other}"),
                ));
            }
        };
        parser.next_token();
        parser.expect_token(&Token::Eq).map_err(err)?;
        let value_at = position(parser.peek_token().span.start);
        let negative = parser.consume_token(&Token::Minus);
        let value = parser.parse_value().map_err(err)?;
        let json = match value.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => Json::String(s),
            Value::Boolean(b) => Json::Bool(b),
            Value::Number(n, _) => {
                let text = if negative { format!("-{n}") } else { n };
                serde_json::from_str::<Json>(&text)
                    .map_err(|_| Diagnostic::new(value_at, format!("'{text}' is not a number")))?
            }
            other => {
                return Err(
                    Diagnostic::new(value_at, format!("unsupported option value {other}"))
                        .with_hint("option values are 'strings', numbers or true/false"),
                );
            }
        };
        if key == "connector" {
            match json {
                Json::String(name) => options.connector = Some((name, value_at)),
                _ => return Err(Diagnostic::new(value_at, "connector must be a quoted name")),
            }
        } else if options.values.insert(key.clone(), json).is_some() {
            return Err(Diagnostic::new(
                key_at,
                format!("option '{key}' is given twice"),
            ));
        }
        if !parser.consume_token(&Token::Comma) {
            parser.expect_token(&Token::RParen).map_err(err)?;
            break;
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_statements_and_keeps_going_after_an_error() {
        let sql = "CREATE SOURCE s (a TEXT NOT NULL, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (connector = 'file', path = 'x.csv', batch_size = 10);\n\
                   CREATE TABLE nope (a INT);\n\
                   CREATE SINK out WITH (connector = 'stdout');\n\
                   CREATE PIPELINE p AS INSERT INTO out SELECT a FROM s;";
        let (statements, diagnostics) = parse_file(sql);
        assert_eq!(statements.len(), 3);
        assert_eq!(diagnostics.len(), 1);
        assert_eq!(diagnostics[0].position, Position { line: 2, column: 8 });
        let Statement::Source(source) = &statements[0] else {
            panic!("not a source")
        };
        assert_eq!(source.columns.len(), 2);
        assert_eq!(
            source.watermark.as_ref().map(|w| w.column.value.as_str()),
            Some("ts")
        );
        assert_eq!(
            source.options.values.get("batch_size"),
            Some(&Json::from(10))
        );
        let Statement::Pipeline(pipeline) = &statements[2] else {
            panic!("not a pipeline")
        };
        assert_eq!(
            pipeline.text,
            "CREATE PIPELINE p AS INSERT INTO out SELECT a FROM s"
        );
    }

    #[test]
    fn reports_position_of_a_syntax_error_inside_a_query() {
        let (_, diagnostics) =
            parse_file("CREATE PIPELINE p AS INSERT INTO out\nSELECT a FROM s WHERE;");
        assert_eq!(diagnostics.len(), 1);
        // The statement ends where an expression was expected: point just past `WHERE`.
        assert_eq!(
            diagnostics[0].position,
            Position {
                line: 2,
                column: 22
            }
        );
        assert!(
            diagnostics[0].message.contains("the statement ends here"),
            "{}",
            diagnostics[0].message
        );
    }
}
