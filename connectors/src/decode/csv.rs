//! CSV lines decoded into Arrow builders.
//!
//! The header row maps fields to columns by name: columns the header lacks are null (and the
//! header is refused if a `NOT NULL` column is among them), header fields the schema lacks are
//! ignored. An empty field is null. Timestamps are parsed like JSON ones (RFC 3339 or epoch
//! numbers in the configured unit); `NaN` and `inf` are refused as in JSON.
//!
//! Quoting follows RFC 4180 (`"a ""quoted"", field"`), and a quoted field may span lines:
//! sources split their input into records with [`record_end`], which skips newlines inside
//! quotes.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use super::{
    Cell, Column, ColumnKind, Columns, DecodeError, DecodeOptions, DecodeResult, RecordDecoder,
    StrSources, event_time_index, is_non_finite_word, number_cell,
};
use crate::dead_letter::DeadLetterQueue;
use crate::error::{ConnectorError, Result};
use crate::time::{TimeUnit, parse_timestamp};

const NOT_MAPPED: usize = usize::MAX;

/// Where the first record of `input` ends: the index of the first newline outside a quoted
/// field. `None` if no record is complete yet (more input may close a quote).
pub fn record_end(input: &[u8]) -> Option<usize> {
    let mut quoted = false;
    for at in memchr::memchr2_iter(b'"', b'\n', input) {
        match input[at] {
            // A doubled quote inside quotes toggles twice: it stays quoted.
            b'"' => quoted = !quoted,
            _ if !quoted => return Some(at),
            _ => {}
        }
    }
    None
}

/// The records of `input`, each without its newline; the last needs none.
pub fn records(input: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = input;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (record, next) = match record_end(rest) {
            Some(end) => (&rest[..end], &rest[end + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        Some(record)
    })
}

/// Decodes CSV lines into batches of a fixed schema; see the module docs.
#[derive(Debug)]
pub struct CsvDecoder {
    columns: Columns,
    event_time: Option<usize>,
    time_unit: TimeUnit,
    /// For each field position of a line, the column it fills (or [`NOT_MAPPED`]).
    field_columns: Vec<usize>,
    /// Field ranges of the current line, into the line or into `unquoted`.
    fields: Vec<(usize, usize, bool)>,
    cells: Vec<Cell>,
    unquoted: String,
}

impl CsvDecoder {
    /// A decoder for `schema`, expecting fields in schema order until [`Self::set_header`] is
    /// called. `event_time` is checked to be a timestamp column.
    pub fn new(
        schema: SchemaRef,
        event_time: Option<&str>,
        options: DecodeOptions,
    ) -> Result<Self> {
        let columns = Columns::new(schema, "csv decoder")?;
        let event_time = event_time_index(&columns, event_time, "csv decoder")?;
        let width = columns.columns.len();
        Ok(Self {
            columns,
            event_time,
            time_unit: options.time_unit,
            field_columns: (0..width).collect(),
            fields: Vec::with_capacity(width),
            cells: vec![Cell::Null; width],
            unquoted: String::new(),
        })
    }

    /// Maps fields to columns by the names in `header`. Fails, as a configuration error, when
    /// the header is not valid CSV or lacks a `NOT NULL` column.
    pub fn set_header(&mut self, header: &[u8]) -> Result<()> {
        let bad_header = |message: String| {
            ConnectorError::config("csv decoder", format!("header row: {message}"))
        };
        let text = std::str::from_utf8(header.trim_ascii())
            .map_err(|_| bad_header("not valid UTF-8".into()))?;
        split_fields(text, &mut self.fields, &mut self.unquoted)
            .map_err(|e| bad_header(e.to_string()))?;
        let strings = StrSources {
            record: text.as_bytes(),
            unescaped: &self.unquoted,
        };
        self.field_columns.clear();
        for &(start, end, unquoted) in &self.fields {
            let name = strings.get(start, end, unquoted).trim();
            let column = self.columns.index_of(name).unwrap_or(NOT_MAPPED);
            if column != NOT_MAPPED && self.field_columns.contains(&column) {
                return Err(bad_header(format!("column '{name}' appears twice")));
            }
            self.field_columns.push(column);
        }
        for (index, column) in self.columns.columns.iter().enumerate() {
            if !column.nullable && !self.field_columns.contains(&index) {
                return Err(bad_header(format!(
                    "no field for NOT NULL column '{}'",
                    column.name
                )));
            }
        }
        Ok(())
    }

    /// Decodes one CSV line into one row. On error the pending rows are exactly as before.
    pub fn decode_record(&mut self, record: &[u8]) -> DecodeResult<usize> {
        let text = std::str::from_utf8(record).map_err(|_| DecodeError::InvalidUtf8)?;
        let text = text.strip_suffix('\r').unwrap_or(text);
        split_fields(text, &mut self.fields, &mut self.unquoted)?;
        if self.fields.len() > self.field_columns.len() {
            return Err(DecodeError::FieldCount);
        }
        self.cells.fill(Cell::Null);
        let strings = StrSources {
            record: text.as_bytes(),
            unescaped: &self.unquoted,
        };
        for (&(start, end, unquoted), &column) in self.fields.iter().zip(&self.field_columns) {
            if column == NOT_MAPPED {
                continue;
            }
            let field = strings.get(start, end, unquoted);
            self.cells[column] = if field.is_empty() {
                Cell::Null
            } else {
                text_cell(&self.columns.columns[column], field, self.time_unit)?
            };
            if let Cell::Str { .. } = self.cells[column] {
                self.cells[column] = Cell::Str {
                    start,
                    end,
                    unescaped: unquoted,
                };
            }
        }
        for (cell, column) in self.cells.iter().zip(&self.columns.columns) {
            if *cell == Cell::Null && !column.nullable {
                return Err(DecodeError::NullField(column.name.clone()));
            }
        }
        for (builder, cell) in self.columns.builders.iter_mut().zip(&self.cells) {
            builder.append(*cell, &strings);
        }
        self.columns.rows += 1;
        Ok(1)
    }

    /// Decodes CSV lines; see [`RecordDecoder::decode_lines`]. The header must have been set.
    pub fn decode_lines(
        &mut self,
        bytes: &[u8],
        source: &str,
        dead_letters: &DeadLetterQueue,
    ) -> usize {
        <Self as RecordDecoder>::decode_lines(self, bytes, source, dead_letters)
    }

    /// Rows decoded and not yet flushed.
    pub fn len(&self) -> usize {
        self.columns.rows
    }

    /// The latest event time among the pending rows from `from_row` on.
    pub fn latest_event_time(&self, from_row: usize) -> Option<i64> {
        self.columns.latest_time(self.event_time?, from_row)
    }

    /// Whether no rows are pending.
    pub fn is_empty(&self) -> bool {
        self.columns.rows == 0
    }

    /// Turns the pending rows into a batch; `None` when there are none.
    pub fn flush(&mut self) -> Result<Option<RecordBatch>> {
        self.columns.flush()
    }
}

impl RecordDecoder for CsvDecoder {
    fn decode_record(&mut self, record: &[u8]) -> DecodeResult<usize> {
        CsvDecoder::decode_record(self, record)
    }

    fn len(&self) -> usize {
        self.columns.rows
    }

    fn flush(&mut self) -> Result<Option<RecordBatch>> {
        self.columns.flush()
    }
}

/// Interprets the text of one non-empty field for `column`. Strings come back as a
/// placeholder range that the caller replaces with the field's own.
fn text_cell(column: &Column, field: &str, time_unit: TimeUnit) -> DecodeResult<Cell> {
    let wrong_type = |expected| DecodeError::WrongType {
        column: column.name.clone(),
        expected,
    };
    match column.kind {
        ColumnKind::Utf8 => Ok(Cell::Str {
            start: 0,
            end: 0,
            unescaped: false,
        }),
        ColumnKind::Boolean => match field.trim() {
            "true" | "TRUE" | "True" | "1" => Ok(Cell::Bool(true)),
            "false" | "FALSE" | "False" | "0" => Ok(Cell::Bool(false)),
            _ => Err(wrong_type("boolean")),
        },
        ColumnKind::Timestamp => parse_timestamp(field, time_unit)
            .map(Cell::Int)
            .ok_or_else(|| DecodeError::InvalidTimestamp(column.name.clone())),
        _ => {
            let field = field.trim().as_bytes();
            if is_non_finite_word(field) {
                return Err(DecodeError::NonNumeric(column.name.clone()));
            }
            number_cell(column, field)
        }
    }
}

/// Splits one CSV line into field ranges. Unquoted fields are ranges of `line`; quoted ones
/// are copied, without their quotes and with `""` made `"`, into `unquoted`.
fn split_fields(
    line: &str,
    fields: &mut Vec<(usize, usize, bool)>,
    unquoted: &mut String,
) -> DecodeResult<()> {
    fields.clear();
    unquoted.clear();
    let b = line.as_bytes();
    let mut i = 0;
    loop {
        if b.get(i) == Some(&b'"') {
            let from = unquoted.len();
            let mut run = i + 1;
            let mut j = i + 1;
            loop {
                match b.get(j) {
                    None => return Err(DecodeError::InvalidCsv),
                    Some(b'"') if b.get(j + 1) == Some(&b'"') => {
                        unquoted.push_str(line.get(run..=j).ok_or(DecodeError::InvalidCsv)?);
                        j += 2;
                        run = j;
                    }
                    Some(b'"') => {
                        unquoted.push_str(line.get(run..j).ok_or(DecodeError::InvalidCsv)?);
                        j += 1;
                        break;
                    }
                    Some(_) => j += 1,
                }
            }
            fields.push((from, unquoted.len(), true));
            i = j;
            match b.get(i) {
                None => return Ok(()),
                Some(b',') => i += 1,
                Some(_) => return Err(DecodeError::InvalidCsv),
            }
        } else {
            let end = b[i..].iter().position(|&c| c == b',').map(|p| i + p);
            match end {
                Some(end) => {
                    if b[i..end].contains(&b'"') {
                        return Err(DecodeError::InvalidCsv);
                    }
                    fields.push((i, end, false));
                    i = end + 1;
                }
                None => {
                    if b[i..].contains(&b'"') {
                        return Err(DecodeError::InvalidCsv);
                    }
                    fields.push((i, b.len(), false));
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::test_support::{table, vibration_schema};

    #[test]
    fn records_end_at_newlines_outside_quotes() {
        let input = b"a,\"x\ny\"\nb,\"\"\"q\"\"\"\nlast";
        let split: Vec<&[u8]> = records(input).collect();
        assert_eq!(
            split,
            [&b"a,\"x\ny\""[..], &b"b,\"\"\"q\"\"\""[..], &b"last"[..]]
        );
        assert_eq!(
            record_end(b"open,\"quote\n"),
            None,
            "more input may close it"
        );
        assert_eq!(record_end(b"\n"), Some(0));
    }

    fn decoder(header: &str) -> CsvDecoder {
        let mut decoder = CsvDecoder::new(vibration_schema(), Some("ts"), DecodeOptions::default())
            .expect("decoder");
        decoder.set_header(header.as_bytes()).expect("header");
        decoder
    }

    #[test]
    fn header_maps_fields_by_name_and_bad_rows_are_dead_lettered() {
        let mut decoder = decoder("v,site,ts,sensor");
        let dlq = DeadLetterQueue::default();
        let lines = "0.5,plant1,2024-01-01T00:00:00Z,s1\r\n\
                     ,plant1,1704067200250,\"s,2\"\n\
                     x,plant1,1704067200250,s3\n\
                     1,plant1,,s4\n\
                     NaN,plant1,1704067200250,s5\n\
                     1,plant1,1704067200250,s6,extra\n\
                     1,plant1,1704067200250,\"s7\n\
                     -2,plant1,1704067200500,\"say \"\"hi\"\"\"\n";
        assert_eq!(decoder.decode_lines(lines.as_bytes(), "test", &dlq), 3);
        assert_eq!(
            dlq.counts_by_reason(),
            vec![
                ("invalid csv quoting".to_owned(), 1),
                ("non-numeric value for 'v'".to_owned(), 1),
                ("null for required field 'ts'".to_owned(), 1),
                ("wrong number of csv fields".to_owned(), 1),
                ("wrong type for 'v': expected number".to_owned(), 1),
            ]
        );
        let batch = decoder.flush().ok().flatten().expect("batch");
        assert_eq!(
            table(&batch),
            vec![
                "+----------+-------------------------+------+",
                "| sensor   | ts                      | v    |",
                "+----------+-------------------------+------+",
                "| s1       | 2024-01-01T00:00:00     | 0.5  |",
                "| s,2      | 2024-01-01T00:00:00.250 |      |",
                "| say \"hi\" | 2024-01-01T00:00:00.500 | -2.0 |",
                "+----------+-------------------------+------+",
            ]
        );
    }

    #[test]
    fn header_without_a_required_column_is_a_config_error() {
        let mut decoder = CsvDecoder::new(vibration_schema(), Some("ts"), DecodeOptions::default())
            .expect("decoder");
        let error = decoder.set_header(b"sensor,v").map_err(|e| e.to_string());
        assert_eq!(
            error,
            Err("csv decoder: header row: no field for NOT NULL column 'ts'".to_owned())
        );
        assert!(decoder.set_header(b"sensor,ts,ts").is_err());
    }

    #[test]
    fn without_a_header_fields_follow_schema_order() {
        let mut decoder = CsvDecoder::new(vibration_schema(), Some("ts"), DecodeOptions::default())
            .expect("decoder");
        assert_eq!(decoder.decode_record(b"s1,1704067200000,1.5"), Ok(1));
        assert_eq!(decoder.len(), 1);
    }
}
