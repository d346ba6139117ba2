//! Label selectors: which gateways a deployment targets.
//!
//! `site=plant1,line!=3` is a conjunction of terms separated by commas: `key=value`,
//! `key!=value` (also true where the key is absent), `key` (present) and `!key` (absent).
//! The empty selector matches every gateway.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::{CloudError, Result};

/// Gateway labels: `site=plant1`, `line=3`.
pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Present(String),
    Absent(String),
}

/// A parsed selector; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    terms: Vec<Term>,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self> {
        let mut terms = Vec::new();
        let mut offset = 0;
        for raw in text.split(',') {
            let column = offset + 1 + (raw.len() - raw.trim_start().len());
            offset += raw.len() + 1;
            let term = raw.trim();
            if term.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(invalid(text, column, "empty term"));
            }
            let parsed = if let Some((key, value)) = term.split_once("!=") {
                Term::NotEquals(key_at(text, column, key)?, value_at(text, column, value)?)
            } else if let Some((key, value)) = term.split_once('=') {
                Term::Equals(key_at(text, column, key)?, value_at(text, column, value)?)
            } else if let Some(key) = term.strip_prefix('!') {
                Term::Absent(key_at(text, column, key)?)
            } else {
                Term::Present(key_at(text, column, term)?)
            };
            terms.push(parsed);
        }
        Ok(Self { terms })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.terms.iter().all(|term| match term {
            Term::Equals(key, value) => labels.get(key) == Some(value),
            Term::NotEquals(key, value) => labels.get(key) != Some(value),
            Term::Present(key) => labels.contains_key(key),
            Term::Absent(key) => !labels.contains_key(key),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let terms: Vec<String> = self
            .terms
            .iter()
            .map(|term| match term {
                Term::Equals(k, v) => format!("{k}={v}"),
                Term::NotEquals(k, v) => format!("{k}!={v}"),
                Term::Present(k) => k.clone(),
                Term::Absent(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&terms.join(","))
    }
}

fn invalid(text: &str, column: usize, what: &str) -> CloudError {
    CloudError::Invalid(format!(
        "selector '{text}', column {column}: {what}; write terms like 'site=plant1,line!=3', 'gpu' or '!canary'"
    ))
}

fn key_at(text: &str, column: usize, key: &str) -> Result<String> {
    validate_key(key.trim()).map_err(|why| invalid(text, column, &why))?;
    Ok(key.trim().to_owned())
}

fn value_at(text: &str, column: usize, value: &str) -> Result<String> {
    validate_value(value.trim()).map_err(|why| invalid(text, column, &why))?;
    Ok(value.trim().to_owned())
}

/// Label keys: 1 to 63 characters of `a-z 0-9 . _ - /`, starting with a letter or digit.
pub fn validate_key(key: &str) -> std::result::Result<(), String> {
    let valid = !key.is_empty()
        && key.len() <= 63
        && key.starts_with(|c: char| c.is_ascii_alphanumeric())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "label key '{key}' must be 1-63 characters of a-z, 0-9, '.', '_', '-', '/', starting with a letter or digit"
        ))
    }
}

/// Label values: up to 63 characters of `A-Z a-z 0-9 . _ -`.
pub fn validate_value(value: &str) -> std::result::Result<(), String> {
    let valid = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "label value '{value}' must be at most 63 characters of A-Z, a-z, 0-9, '.', '_', '-'"
        ))
    }
}

/// Checks every key and value of `labels`.
pub fn validate_labels(labels: &Labels) -> Result<()> {
    for (key, value) in labels {
        validate_key(key).map_err(CloudError::Invalid)?;
        validate_value(value).map_err(CloudError::Invalid)?;
    }
    Ok(())
}

/// Parses `key=value` label assignments as the CLI takes them.
pub fn parse_labels<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Labels> {
    let mut labels = Labels::new();
    for item in items {
        let Some((key, value)) = item.split_once('=') else {
            return Err(CloudError::Invalid(format!(
                "label '{item}' must be written key=value, e.g. site=plant1"
            )));
        };
        validate_key(key).map_err(CloudError::Invalid)?;
        validate_value(value).map_err(CloudError::Invalid)?;
        labels.insert(key.to_owned(), value.to_owned());
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(items: &[&str]) -> Labels {
        parse_labels(items.iter().copied()).expect("labels")
    }

    fn matches(selector: &str, items: &[&str]) -> bool {
        Selector::parse(selector)
            .expect("selector")
            .matches(&labels(items))
    }

    #[test]
    fn terms_combine_with_and() {
        let plant1_line3 = &["site=plant1", "line=3"];
        let plant1_line4 = &["site=plant1", "line=4"];
        let plant1 = &["site=plant1"];
        let plant2 = &["site=plant2", "line=3"];
        assert!(!matches("site=plant1,line!=3", plant1_line3));
        assert!(matches("site=plant1,line!=3", plant1_line4));
        assert!(
            matches("site=plant1,line!=3", plant1),
            "!= holds where the key is absent"
        );
        assert!(!matches("site=plant1,line!=3", plant2));
        assert!(matches("line", plant2));
        assert!(!matches("line", plant1));
        assert!(matches("!line", plant1));
        assert!(matches("", plant1), "the empty selector matches everything");
        assert!(
            matches(" site = plant1 ", plant1),
            "spaces around terms are ignored"
        );
    }

    #[test]
    fn display_round_trips() {
        let selector = Selector::parse("site=plant1, line!=3,gpu,!canary").expect("parse");
        assert_eq!(selector.to_string(), "site=plant1,line!=3,gpu,!canary");
        assert_eq!(
            Selector::parse(&selector.to_string()).expect("reparse"),
            selector
        );
    }

    #[test]
    fn bad_selectors_say_where() {
        let error = Selector::parse("site=plant1,,line=3").expect_err("empty term");
        assert!(
            error.to_string().contains("column 13: empty term"),
            "{error}"
        );
        let error = Selector::parse("site=plant1,Line=3").expect_err("upper-case key");
        assert!(error.to_string().contains("column 13"), "{error}");
        assert!(error.to_string().contains("label key 'Line'"), "{error}");
        let error = Selector::parse("site=plant 1").expect_err("space in value");
        assert!(
            error.to_string().contains("label value 'plant 1'"),
            "{error}"
        );
    }

    #[test]
    fn labels_must_be_key_value() {
        let error = parse_labels(["site"]).expect_err("no value");
        assert!(error.to_string().contains("key=value"), "{error}");
        assert!(parse_labels(["site=plant1", "line=3"]).expect("ok").len() == 2);
    }
}
