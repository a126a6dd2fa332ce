//! Forms an organisation publishes in a channel (a vaccine appointment, a daily health check-in)
//! and the answers citizens send back. A definition is a small JSON schema: fields with a type,
//! whether they are required, and choices. Answers travel as MLS messages to the organisation's
//! staff devices; this module checks both sides and writes the staff's CSV export.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// Most fields in one form.
pub const MAX_FIELDS: usize = 100;
/// Most choices of one field.
pub const MAX_CHOICES: usize = 100;
/// Longest title, label, description or choice, in characters.
pub const MAX_LABEL_CHARS: usize = 500;
/// Longest text answer unless the field says less, in characters.
pub const DEFAULT_MAX_TEXT_CHARS: usize = 2000;
/// Longest text answer any field may allow.
pub const MAX_TEXT_CHARS: usize = 10_000;

/// Why a form or an answer was refused (the message names the field).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct FormError(pub String);

fn error(message: impl Into<String>) -> FormError {
    FormError(message.into())
}

/// A form as the organisation defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormDefinition {
    /// Shown as the form's heading.
    pub title: String,
    /// Shown under the title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The questions, in order.
    pub fields: Vec<Field>,
}

/// One question.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// Key of the answer and CSV column: `a-z`, `0-9`, `_`, at most 64.
    pub name: String,
    /// The question as shown.
    pub label: String,
    /// What kind of answer.
    #[serde(rename = "type")]
    pub kind: FieldKind,
    /// Whether an answer is needed.
    #[serde(default)]
    pub required: bool,
    /// For `choice` and `choices`: the allowed answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    /// For `text`: the longest answer in characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
}

/// Answer types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    /// Free text (one line or several).
    Text,
    /// A number (decimal allowed).
    Number,
    /// A calendar date, `YYYY-MM-DD`.
    Date,
    /// Yes or no.
    Boolean,
    /// Exactly one of `choices`.
    Choice,
    /// Any number of `choices` (a JSON array).
    Choices,
}

/// Answers by field name.
pub type Answers = BTreeMap<String, Value>;

impl FormDefinition {
    /// Parses and checks a definition.
    pub fn parse(json: &[u8]) -> Result<Self, FormError> {
        let form: Self = serde_json::from_slice(json).map_err(|e| error(format!("not a form definition: {e}")))?;
        form.validate()?;
        Ok(form)
    }

    /// Checks limits, names and choices.
    pub fn validate(&self) -> Result<(), FormError> {
        check_label(&self.title, "the title")?;
        if let Some(description) = &self.description {
            check_label(description, "the description")?;
        }
        if self.fields.is_empty() || self.fields.len() > MAX_FIELDS {
            return Err(error(format!("a form has 1 to {MAX_FIELDS} fields")));
        }
        let mut names = std::collections::HashSet::new();
        for field in &self.fields {
            let name = &field.name;
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(error(format!("field name {name:?}: use 1 to 64 of a-z, 0-9 and _")));
            }
            if !names.insert(name.as_str()) {
                return Err(error(format!("two fields are named {name:?}")));
            }
            check_label(&field.label, &format!("the label of {name}"))?;
            let wants_choices = matches!(field.kind, FieldKind::Choice | FieldKind::Choices);
            if wants_choices && (field.choices.is_empty() || field.choices.len() > MAX_CHOICES) {
                return Err(error(format!("{name} needs 1 to {MAX_CHOICES} choices")));
            }
            if !wants_choices && !field.choices.is_empty() {
                return Err(error(format!("{name}: only choice fields have choices")));
            }
            let mut seen = std::collections::HashSet::new();
            for choice in &field.choices {
                check_label(choice, &format!("a choice of {name}"))?;
                if !seen.insert(choice) {
                    return Err(error(format!("{name} lists the choice {choice:?} twice")));
                }
            }
            match field.max_length {
                Some(max) if field.kind != FieldKind::Text => {
                    return Err(error(format!("{name}: only text fields have a max_length ({max})")));
                }
                Some(max) if max == 0 || max > MAX_TEXT_CHARS => {
                    return Err(error(format!("{name}: max_length is 1 to {MAX_TEXT_CHARS}")));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Checks a set of answers: every required field answered, every answer of its field's type
    /// and within its limits, no answer to a field the form does not have.
    pub fn check_answers(&self, answers: &Answers) -> Result<(), FormError> {
        for name in answers.keys() {
            if !self.fields.iter().any(|f| &f.name == name) {
                return Err(error(format!("the form has no field {name:?}")));
            }
        }
        for field in &self.fields {
            let value = answers.get(&field.name).filter(|v| !is_empty(v));
            match value {
                None if field.required => return Err(error(format!("{} is required", field.label))),
                None => {}
                Some(value) => field.check(value)?,
            }
        }
        Ok(())
    }
}

/// No answer: null, blank text, or no choice picked.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(text) => text.trim().is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

fn check_label(text: &str, what: &str) -> Result<(), FormError> {
    let chars = text.chars().count();
    if text.trim().is_empty() || chars > MAX_LABEL_CHARS {
        return Err(error(format!("{what} is 1 to {MAX_LABEL_CHARS} characters")));
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(error(format!("{what} contains control characters")));
    }
    Ok(())
}

impl Field {
    fn check(&self, value: &Value) -> Result<(), FormError> {
        let label = &self.label;
        let ok = match (self.kind, value) {
            (FieldKind::Text, Value::String(text)) => {
                let max = self.max_length.unwrap_or(DEFAULT_MAX_TEXT_CHARS);
                if text.chars().count() > max {
                    return Err(error(format!("{label}: at most {max} characters")));
                }
                true
            }
            (FieldKind::Number, Value::Number(_)) => true,
            (FieldKind::Date, Value::String(date)) => is_date(date),
            (FieldKind::Boolean, Value::Bool(_)) => true,
            (FieldKind::Choice, Value::String(choice)) => self.choices.contains(choice),
            (FieldKind::Choices, Value::Array(picked)) => {
                let mut seen = std::collections::HashSet::new();
                picked.iter().all(|p| {
                    p.as_str()
                        .is_some_and(|p| self.choices.iter().any(|c| c == p) && seen.insert(p))
                })
            }
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(error(format!("{label}: {}", self.expects())))
        }
    }

    /// What an answer must look like, for errors and prompts.
    pub fn expects(&self) -> String {
        match self.kind {
            FieldKind::Text => "text".into(),
            FieldKind::Number => "a number".into(),
            FieldKind::Date => "a date as YYYY-MM-DD".into(),
            FieldKind::Boolean => "yes or no".into(),
            FieldKind::Choice => format!("one of: {}", self.choices.join(", ")),
            FieldKind::Choices => format!("any of: {}", self.choices.join(", ")),
        }
    }

    /// Reads a typed-in answer: numbers for choices (1-based, comma-separated for `choices`),
    /// `y`/`n`, a date, a number. Empty input is no answer.
    pub fn parse_typed(&self, input: &str) -> Result<Option<Value>, FormError> {
        let input = input.trim();
        if input.is_empty() {
            return Ok(None);
        }
        let pick = |text: &str| -> Option<String> {
            let index: usize = text.trim().parse().ok()?;
            self.choices.get(index.checked_sub(1)?).cloned()
        };
        let value = match self.kind {
            FieldKind::Text | FieldKind::Date => Value::String(input.to_owned()),
            FieldKind::Number => input
                .parse::<f64>()
                .ok()
                .and_then(|n| {
                    if n.fract() == 0.0 && n.abs() < 9e15 {
                        Some(Value::from(n as i64))
                    } else {
                        serde_json::Number::from_f64(n).map(Value::Number)
                    }
                })
                .ok_or_else(|| error(format!("{}: {}", self.label, self.expects())))?,
            FieldKind::Boolean => match input.to_ascii_lowercase().as_str() {
                "y" | "yes" | "true" => Value::Bool(true),
                "n" | "no" | "false" => Value::Bool(false),
                _ => return Err(error(format!("{}: {}", self.label, self.expects()))),
            },
            FieldKind::Choice => Value::String(
                pick(input)
                    .or_else(|| self.choices.iter().find(|c| c.as_str() == input).cloned())
                    .ok_or_else(|| error(format!("{}: {}", self.label, self.expects())))?,
            ),
            FieldKind::Choices => Value::Array(
                input
                    .split(',')
                    .map(|part| pick(part).map(Value::String))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| error(format!("{}: numbers of {}", self.label, self.expects())))?,
            ),
        };
        self.check(&value)?;
        Ok(Some(value))
    }
}

/// `YYYY-MM-DD` with a month 1–12 and a day that month can have.
fn is_date(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return false;
    }
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = &text[range];
        part.bytes().all(|b| b.is_ascii_digit()).then(|| part.parse().ok())?
    };
    let (Some(year), Some(month), Some(day)) = (number(0..4), number(5..7), number(8..10)) else {
        return false;
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

/// One received submission, as staff export it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmissionRow {
    /// Submission (message) id.
    pub id: String,
    /// When the submitter sent it, ms since the Unix epoch.
    pub sent_at: u64,
    /// Who sent it (username or account id).
    pub submitter: String,
    /// The answers.
    pub answers: Answers,
}

/// Writes submissions as CSV (RFC 4180, CRLF line ends): `submission, sent_at, submitter`, then
/// one column per field in form order. A cell that a spreadsheet would run as a formula (starts
/// with `=`, `+`, `-`, `@`, tab or CR) gets a leading `'`: answers come from the public.
pub fn to_csv(form: &FormDefinition, rows: &[SubmissionRow]) -> String {
    let mut out = String::new();
    let header: Vec<String> = ["submission", "sent_at", "submitter"]
        .into_iter()
        .map(str::to_owned)
        .chain(form.fields.iter().map(|f| f.name.clone()))
        .collect();
    push_row(&mut out, &header);
    for row in rows {
        let mut cells = vec![row.id.clone(), iso_time(row.sent_at), row.submitter.clone()];
        for field in &form.fields {
            cells.push(match row.answers.get(&field.name) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(text)) => text.clone(),
                Some(Value::Bool(true)) => "yes".into(),
                Some(Value::Bool(false)) => "no".into(),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join("; "),
                Some(other) => other.to_string(),
            });
        }
        push_row(&mut out, &cells);
    }
    out
}

fn push_row(out: &mut String, cells: &[String]) {
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // A negative number is data, not a formula.
        let guarded = if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) && cell.parse::<f64>().is_err() {
            format!("'{cell}")
        } else {
            cell.clone()
        };
        if guarded.contains([',', '"', '\n', '\r']) {
            out.push('"');
            out.push_str(&guarded.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(&guarded);
        }
    }
    out.push_str("\r\n");
}

/// `YYYY-MM-DDTHH:MM:SSZ` for ms since the Unix epoch (UTC, proleptic Gregorian).
pub fn iso_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vaccine() -> FormDefinition {
        FormDefinition::parse(
            json!({
                "title": "Vaccine appointment",
                "fields": [
                    {"name": "name", "label": "Full name", "type": "text", "required": true, "max_length": 20},
                    {"name": "born", "label": "Date of birth", "type": "date", "required": true},
                    {"name": "site", "label": "Site", "type": "choice", "choices": ["North", "South"], "required": true},
                    {"name": "symptoms", "label": "Symptoms", "type": "choices", "choices": ["fever", "cough"]},
                    {"name": "temperature", "label": "Temperature", "type": "number"},
                    {"name": "consent", "label": "I consent", "type": "boolean", "required": true}
                ]
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    fn answers(value: Value) -> Answers {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn good_answers_pass_and_each_fault_is_named() {
        let form = vaccine();
        let good = json!({"name": "Aiko", "born": "1990-02-28", "site": "North", "symptoms": ["cough"],
                          "temperature": 36.6, "consent": true});
        form.check_answers(&answers(good.clone())).unwrap();
        let cases = [
            ("name", json!(null), "Full name is required"),
            ("name", json!("  "), "Full name is required"),
            ("site", json!([]), "Site is required"),
            ("name", json!("x".repeat(21)), "at most 20"),
            ("born", json!("1990-02-30"), "YYYY-MM-DD"),
            ("site", json!("East"), "one of: North, South"),
            ("symptoms", json!(["cough", "cough"]), "any of"),
            ("temperature", json!("hot"), "a number"),
            ("consent", json!("yes"), "yes or no"),
            ("extra", json!(1), "no field \"extra\""),
        ];
        for (field, value, expected) in cases {
            let mut bad = good.clone();
            bad[field] = value;
            let err = form.check_answers(&answers(bad)).unwrap_err();
            assert!(err.0.contains(expected), "{field}: {err}");
        }
    }

    #[test]
    fn bad_definitions_are_refused() {
        let bad = [
            json!({"title": "t", "fields": []}),
            json!({"title": "t", "fields": [{"name": "Bad Name", "label": "l", "type": "text"}]}),
            json!({"title": "t", "fields": [{"name": "a", "label": "l", "type": "choice"}]}),
            json!({"title": "t", "fields": [{"name": "a", "label": "l", "type": "text", "choices": ["x"]}]}),
            json!({"title": "t", "fields": [{"name": "a", "label": "l", "type": "text"}, {"name": "a", "label": "m", "type": "text"}]}),
            json!({"title": "", "fields": [{"name": "a", "label": "l", "type": "text"}]}),
            json!({"title": "t", "fields": [{"name": "a", "label": "l", "type": "colour"}]}),
        ];
        for definition in bad {
            assert!(
                FormDefinition::parse(definition.to_string().as_bytes()).is_err(),
                "{definition}"
            );
        }
    }

    #[test]
    fn typed_answers_are_parsed() {
        let form = vaccine();
        let field = |name: &str| form.fields.iter().find(|f| f.name == name).unwrap();
        assert_eq!(field("site").parse_typed("2").unwrap(), Some(json!("South")));
        assert_eq!(field("site").parse_typed("North").unwrap(), Some(json!("North")));
        assert!(field("site").parse_typed("3").is_err());
        assert_eq!(
            field("symptoms").parse_typed("2,1").unwrap(),
            Some(json!(["cough", "fever"]))
        );
        assert_eq!(field("consent").parse_typed("Y").unwrap(), Some(json!(true)));
        assert_eq!(field("temperature").parse_typed("37").unwrap(), Some(json!(37)));
        assert_eq!(field("temperature").parse_typed("").unwrap(), None);
    }

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        let form = vaccine();
        let row = SubmissionRow {
            id: "ab".into(),
            sent_at: 0,
            submitter: "bob.12".into(),
            answers: answers(
                json!({"name": "=HYPERLINK(\"x\")", "born": "2000-01-01", "site": "North",
                                    "symptoms": ["fever", "cough"], "temperature": -1.5, "consent": false}),
            ),
        };
        let csv = to_csv(&form, &[row]);
        assert_eq!(
            csv,
            "submission,sent_at,submitter,name,born,site,symptoms,temperature,consent\r\n\
             ab,1970-01-01T00:00:00Z,bob.12,\"'=HYPERLINK(\"\"x\"\")\",2000-01-01,North,fever; cough,-1.5,no\r\n"
        );
    }

    #[test]
    fn iso_time_matches_known_dates() {
        assert_eq!(iso_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(iso_time(1_795_000_000_123), "2026-11-18T11:06:40Z");
    }
}
