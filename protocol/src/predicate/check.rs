//! The type checking of a predicate: which literals an operand may be compared with, and how
//! operands and values are named in type errors. The parser calls [`Operand::check`] on every
//! literal it reads, so a rule can't hold a comparison that never makes sense.

use std::fmt;

use super::eval::Operand;
use super::Value;

impl Operand {
    /// The parse-time type rule: which literals this operand may be compared with.
    pub(super) fn check(&self, value: &Value) -> Result<(), String> {
        match (self, value) {
            (Operand::Attr(_), _)
            | (Operand::Tier, Value::String(_))
            | (Operand::Number(_) | Operand::DaysSince(_), Value::Number(_)) => Ok(()),
            (Operand::Tier, _) => Err(format!(
                "tier compares with a tier name (a string), found {}",
                value.kind()
            )),
            (Operand::Number(_) | Operand::DaysSince(_), _) => Err(format!(
                "{self} compares with a number, found {}",
                value.kind()
            )),
        }
    }
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Number(field) => f.write_str(field.name()),
            Operand::Tier => f.write_str("tier"),
            Operand::Attr(name) => write!(f, "attr.{name}"),
            Operand::DaysSince(field) => write!(f, "days_since({field})"),
        }
    }
}

impl Value {
    /// The kind of value, with an article, for error messages.
    fn kind(&self) -> &'static str {
        match self {
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
        }
    }
}
