//! Topic patterns of the `mqtt` source and topic templates of the `mqtt` sink.
//!
//! A source pattern is an MQTT topic filter in which a whole level may be written `{column}`:
//! `plant1/{sensor}/vibration` subscribes to `plant1/+/vibration` and fills the `sensor` column
//! of every row of a message from the level the `+` matched. A sink template uses the same
//! braces to build each message's topic from the row: `alerts/{sensor}`.

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::{DataType, Schema};
use arrow::util::display::{ArrayFormatter, FormatOptions};

use crate::error::{ConnectorError, Result};

/// A topic filter with named levels; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    /// What is sent to the broker: the pattern with each `{column}` replaced by `+`.
    pub filter: String,
    /// `(level index, column name)` for each named level, in order.
    pub captures: Vec<(usize, String)>,
}

impl TopicPattern {
    /// Parses a pattern, checking it is a valid MQTT filter and that every named level is a
    /// text column of `schema`.
    pub fn parse(pattern: &str, schema: &Schema) -> Result<Self> {
        let invalid = |message: String| Err(ConnectorError::config("mqtt", message));
        if pattern.is_empty() {
            return invalid("option 'topic' is required, e.g. topic = 'plant1/+/vibration'".into());
        }
        let levels: Vec<&str> = pattern.split('/').collect();
        let mut filter = Vec::with_capacity(levels.len());
        let mut captures: Vec<(usize, String)> = Vec::new();
        for (index, level) in levels.iter().enumerate() {
            if let Some(name) = level.strip_prefix('{').and_then(|l| l.strip_suffix('}')) {
                match schema.field_with_name(name).map(|f| f.data_type()) {
                    Ok(DataType::Utf8) => {}
                    Ok(other) => {
                        return invalid(format!(
                            "topic level '{{{name}}}' fills column '{name}', which must be TEXT, \
                             not {other}"
                        ));
                    }
                    Err(_) => {
                        return invalid(format!(
                            "topic level '{{{name}}}' names no column of the source"
                        ));
                    }
                }
                if captures.iter().any(|(_, n)| n == name) {
                    return invalid(format!("topic level '{{{name}}}' appears twice"));
                }
                captures.push((index, name.to_owned()));
                filter.push("+");
            } else if level.contains(['{', '}']) {
                return invalid(format!(
                    "topic level '{level}': a named level must be a whole level, like \
                     'plant1/{{sensor}}/vibration'"
                ));
            } else if *level == "#" && index + 1 != levels.len() {
                return invalid("topic: '#' must be the last level".into());
            } else if level.len() > 1 && level.contains(['+', '#']) {
                return invalid(format!(
                    "topic level '{level}': '+' and '#' must stand alone in a level"
                ));
            } else {
                filter.push(level);
            }
        }
        Ok(Self {
            filter: filter.join("/"),
            captures,
        })
    }

    /// The value of each named level in `topic`, in [`Self::captures`] order, written into
    /// `out`; `false` if the topic has too few levels (a broker bug or a misrouted message).
    pub fn capture<'t>(&self, topic: &'t str, out: &mut Vec<&'t str>) -> bool {
        out.clear();
        if self.captures.is_empty() {
            return true;
        }
        // Byte positions, not `str::split`: this runs once per message, and a `/` is ASCII,
        // so the slices between them are whole characters.
        let mut wanted = self.captures.iter().map(|(index, _)| *index).peekable();
        let (mut level, mut start) = (0, 0);
        let ends = topic.bytes().enumerate().filter(|(_, b)| *b == b'/');
        for end in ends.map(|(i, _)| i).chain([topic.len()]) {
            if wanted.next_if_eq(&level).is_some() {
                out.push(&topic[start..end]);
                if wanted.peek().is_none() {
                    return true;
                }
            }
            level += 1;
            start = end + 1;
        }
        false
    }
}

/// One piece of a sink topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Column(usize),
}

/// A sink topic built per row from column values; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

impl TopicTemplate {
    /// Parses a template against the schema of the rows it will be applied to.
    pub fn parse(template: &str, schema: &Schema) -> Result<Self> {
        let invalid = |message: String| Err(ConnectorError::config("mqtt", message));
        if template.is_empty() {
            return invalid("option 'topic' is required, e.g. topic = 'alerts/{sensor}'".into());
        }
        if template.contains(['+', '#']) {
            return invalid(format!(
                "topic '{template}': '+' and '#' are for subscriptions, not for publishing"
            ));
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}').map(|c| open + c) else {
                return invalid(format!("topic '{template}': '{{' without a closing '}}'"));
            };
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let name = &rest[open + 1..close];
            let Ok(index) = schema.index_of(name) else {
                let known: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                return invalid(format!(
                    "topic '{template}' names column '{name}', which the pipeline does not \
                     produce; its columns are: {}",
                    known.join(", ")
                ));
            };
            parts.push(Part::Column(index));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return invalid(format!("topic '{template}': '}}' without an opening '{{'"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self { parts })
    }

    /// Whether every row gets the same topic.
    pub fn is_fixed(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// Renders the topic of every row of `batch` with `render(row, topic)`; a NULL value
    /// renders as `null`, and a `/`, `+` or `#` inside a value is replaced by `_` so that a
    /// value never changes the topic's shape.
    pub fn for_each_row(
        &self,
        batch: &RecordBatch,
        mut render: impl FnMut(usize, &str),
    ) -> Result<()> {
        let options = FormatOptions::default().with_null("null");
        let mut formatters = Vec::new();
        for part in &self.parts {
            if let Part::Column(index) = part {
                let column = batch.column(*index);
                formatters.push((
                    *index,
                    ArrayFormatter::try_new(column.as_ref() as &dyn Array, &options)?,
                ));
            }
        }
        let mut topic = String::new();
        let mut value = String::new();
        for row in 0..batch.num_rows() {
            topic.clear();
            for part in &self.parts {
                match part {
                    Part::Text(text) => topic.push_str(text),
                    Part::Column(index) => {
                        value.clear();
                        if let Some((_, formatter)) = formatters.iter().find(|(i, _)| i == index) {
                            use std::fmt::Write;
                            let _ = write!(value, "{}", formatter.value(row));
                        }
                        topic.extend(value.chars().map(|c| match c {
                            '/' | '+' | '#' => '_',
                            c => c,
                        }));
                    }
                }
            }
            render(row, &topic);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::Field;

    use super::*;

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("sensor", DataType::Utf8, false),
            Field::new("site", DataType::Utf8, true),
            Field::new("v", DataType::Float64, true),
        ])
    }

    fn error<T: std::fmt::Debug>(result: Result<T>) -> String {
        result.expect_err("should fail").to_string()
    }

    #[test]
    fn named_levels_become_single_level_wildcards_and_capture_their_level() {
        let pattern = TopicPattern::parse("{site}/{sensor}/vibration/#", &schema()).expect("ok");
        assert_eq!(pattern.filter, "+/+/vibration/#");
        let mut values = Vec::new();
        assert!(pattern.capture("plant1/s-07/vibration/x/y", &mut values));
        assert_eq!(values, ["plant1", "s-07"]);
        assert!(!pattern.capture("plant1", &mut values));
        assert!(pattern.capture("/s-08/vibration", &mut values));
        assert_eq!(values, ["", "s-08"]);
        let last = TopicPattern::parse("plant1/{sensor}", &schema()).expect("ok");
        assert!(last.capture("plant1/s-09", &mut values));
        assert_eq!(values, ["s-09"]);
        assert!(last.capture("plant1/", &mut values));
        assert_eq!(values, [""]);
        assert!(!last.capture("plant1", &mut values));
        let plain = TopicPattern::parse("plant1/+/vibration", &schema()).expect("ok");
        assert_eq!(plain.filter, "plant1/+/vibration");
        assert!(plain.captures.is_empty());
    }

    #[test]
    fn bad_patterns_say_what_is_wrong() {
        let schema = schema();
        assert!(error(TopicPattern::parse("a/{v}/b", &schema)).contains("must be TEXT"));
        assert!(error(TopicPattern::parse("a/{nope}", &schema)).contains("names no column"));
        assert!(error(TopicPattern::parse("a/x{sensor}", &schema)).contains("whole level"));
        assert!(error(TopicPattern::parse("a/#/b", &schema)).contains("must be the last level"));
        assert!(error(TopicPattern::parse("a/b+", &schema)).contains("stand alone"));
        assert!(error(TopicPattern::parse("{sensor}/{sensor}", &schema)).contains("appears twice"));
        assert!(error(TopicPattern::parse("", &schema)).contains("required"));
    }

    #[test]
    fn templates_render_each_row_and_keep_values_within_one_level() {
        let schema = Arc::new(schema());
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["s1", "a/b+#"])),
                Arc::new(StringArray::from(vec![Some("p1"), None])),
                Arc::new(Float64Array::from(vec![1.5, 2.0])),
            ],
        )
        .expect("batch");
        let template = TopicTemplate::parse("alerts/{site}/{sensor}/v{v}", &schema).expect("ok");
        assert!(!template.is_fixed());
        let mut topics = Vec::new();
        template
            .for_each_row(&batch, |row, topic| topics.push((row, topic.to_owned())))
            .expect("render");
        assert_eq!(
            topics,
            [
                (0, "alerts/p1/s1/v1.5".to_owned()),
                (1, "alerts/null/a_b__/v2.0".to_owned())
            ]
        );
        assert!(
            TopicTemplate::parse("out/all", &schema)
                .expect("ok")
                .is_fixed()
        );
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        let schema = schema();
        assert!(error(TopicTemplate::parse("a/{x}", &schema)).contains("its columns are: sensor"));
        assert!(error(TopicTemplate::parse("a/{sensor", &schema)).contains("without a closing"));
        assert!(error(TopicTemplate::parse("a/sensor}", &schema)).contains("without an opening"));
        assert!(error(TopicTemplate::parse("a/+", &schema)).contains("not for publishing"));
    }
}
