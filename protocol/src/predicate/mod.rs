//! Predicates over a customer profile: the condition language of rule-based tags and
//! audience segments.
//!
//! A predicate is a boolean expression such as
//!
//! ```text
//! tier >= "gold" and (spend_365d >= 1000.50 or has_tag("vip"))
//!     and not channel("wechat") and days_since(last_order_at) <= 30
//! ```
//!
//! # Grammar
//!
//! Keywords (`and`, `or`, `not`, `in`, `true`, `false`) are case-sensitive; whitespace and
//! newlines are free between tokens.
//!
//! ```text
//! expr       := or
//! or         := and ("or" and)*
//! and        := unary ("and" unary)*
//! unary      := "not" unary | primary
//! primary    := "(" expr ")" | call | comparison
//! comparison := operand OP value | operand "in" "(" value ("," value)* ")"
//! OP         := "==" | "!=" | "<" | "<=" | ">" | ">="
//! operand    := "points" | "tier" | "spend_365d" | "total_spend" | "order_count"
//!             | "attr." NAME | "days_since" "(" TIMEFIELD ")"
//! TIMEFIELD  := "last_order_at" | "first_order_at" | "created_at"
//!             | "last_seen" "(" STRING ")" | "last_order_on" "(" STRING ")"
//! call       := "has_tag" "(" STRING ")" | "channel" "(" STRING ")"
//!             | "has_identity" "(" STRING ")"
//! value      := NUMBER | STRING | "true" | "false"
//! NUMBER     := "-"? DIGITS ("." DIGITS)?      e.g. 100, -3, 12.50
//! STRING     := '"' (any char but '"', '\' or newline | '\"' | '\\')* '"'
//! NAME       := [a-z0-9_]{1,64}               written right after "attr.", no space
//! ```
//!
//! So `not` binds tighter than `and`, which binds tighter than `or`:
//! `a or b and c` means `a or (b and c)`.
//!
//! # Types
//!
//! Types are checked when a predicate is parsed, so a rule can't hold a comparison that never
//! makes sense:
//!
//! * `points`, `spend_365d`, `total_spend`, `order_count` and `days_since(..)` compare only
//!   with numbers. Number literals are parsed exactly as decimals from their text (never
//!   through a binary float), so `spend_365d >= 1000.10` means exactly that.
//! * `tier` compares only with tier names (strings). It is ordered by tier *level*, looked up
//!   through the [`PredicateContext`] when the predicate is evaluated, so renaming or
//!   reordering tiers in the rules takes effect without re-parsing.
//! * `attr.NAME` compares with a value of any type.
//! * An `in (...)` list holds 1 to [`PREDICATE_IN_VALUES_MAX`] values and means "equal to any".
//!
//! # Evaluation
//!
//! Evaluation is pure and deterministic: it reads only the [`PredicateContext`] it is given.
//!
//! * A comparison whose left side is missing (an unset attribute, a profile without orders for
//!   `days_since(last_order_at)`, a tier name the rules don't know) is false, whatever the
//!   operator: `attr.city == "x"` and `attr.city != "x"` are both false when there is no city.
//! * Comparing values of different types (a string attribute with a number) is false.
//! * Numbers compare numerically (`1.0 == 1`), strings byte-wise (so `"B" < "a"`), and booleans
//!   only with `==` and `!=`; `<`, `<=`, `>`, `>=` on booleans are false.
//! * `not` is plain boolean negation, so `not attr.city == "x"` is true when there is no city.
//!
//! # Bounds
//!
//! Sources are at most [`PREDICATE_SOURCE_BYTES_MAX`] bytes and nest at most
//! [`PREDICATE_DEPTH_MAX`] levels, so the recursive-descent parser and the recursive evaluator
//! have a small, fixed stack budget whatever a client sends.
//!
//! # Layout
//! - `mod.rs`: the public types ([`Predicate`], [`ParseError`], [`Value`], [`NumberField`],
//!   [`TimeField`], [`PredicateContext`]), the limits, and the entry points of [`Predicate`].
//! - `lexer.rs`: the lexer, splitting a source into tokens with their positions.
//! - `parser.rs`: the recursive-descent parser, producing the syntax tree.
//! - `check.rs`: the type checking of literals against the operands they are compared with,
//!   called by the parser as it reads each literal.
//! - `eval.rs`: the syntax tree (expressions, operands, comparison operators) and its
//!   evaluation.
//! - `tests.rs`, `day_threshold_tests.rs`: the tests, through the public API.

mod check;
mod eval;
mod lexer;
mod parser;

use std::collections::BTreeSet;
use std::fmt;

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use eval::{Expr, Operand};
use lexer::{Pos, Tok};
use parser::Parser;

/// The longest predicate source accepted, in bytes (UTF-8).
pub const PREDICATE_SOURCE_BYTES_MAX: usize = 4096;

/// The deepest nesting accepted: each `(` and each `not` opens one level, so `((x))` and
/// `not not x` are two levels deep. Keeps the recursive parser and evaluator well inside the
/// stack on hostile input such as thousands of `(`.
pub const PREDICATE_DEPTH_MAX: usize = 32;

/// The most values an `in (...)` list may hold.
pub const PREDICATE_IN_VALUES_MAX: usize = 256;

/// A parsed, type-checked predicate. Keeps its source text.
#[derive(Debug, Clone, PartialEq)]
pub struct Predicate {
    source: String,
    root: Expr,
}

/// Why a predicate source was rejected, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    /// 1-based line of the offending token.
    pub line: u32,
    /// 1-based column of the offending token, counted in characters (not bytes).
    pub column: u32,
    /// What is wrong, e.g. `expected ")" but found "and"`.
    pub message: String,
}

impl ParseError {
    fn at(pos: Pos, message: impl Into<String>) -> ParseError {
        ParseError {
            line: pos.line,
            column: pos.column,
            message: message.into(),
        }
    }
}

/// A value an attribute can hold, and a literal in the language.
///
/// Serialized as an externally tagged enum (`{"Bool":true}`, `{"Number":"12.50"}`,
/// `{"String":"02139"}`) with the number as its exact decimal text. An untagged form can't
/// tell the string `"02139"` from the number `2139` once decimals are written as strings, and
/// non-self-describing formats such as postcard can't read untagged enums (nor
/// `rust_decimal`'s own `Deserialize`) at all; this form round-trips exactly in both kinds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// `true` or `false`.
    Bool(bool),
    /// An exact decimal, such as `12.50` (the scale is kept, but `12.5 == 12.50`).
    Number(#[serde(with = "decimal_text")] Decimal),
    /// A string, compared byte-wise.
    String(String),
}

/// Serde for a [`Decimal`] as its exact text, read back with `deserialize_str` so that
/// non-self-describing formats work too.
mod decimal_text {
    use rust_decimal::Decimal;
    use serde::{de, Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(value: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
        // Display keeps the scale: 12.50 stays "12.50".
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
        deserializer.deserialize_str(DecimalText)
    }

    struct DecimalText;

    impl de::Visitor<'_> for DecimalText {
        type Value = Decimal;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a decimal number as text")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Decimal, E> {
            // Exact: text that doesn't fit in a Decimal is an error, never rounded.
            Decimal::from_str_exact(text)
                .map_err(|_| E::invalid_value(de::Unexpected::Str(text), &self))
        }
    }
}

/// A numeric field of a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberField {
    /// `points`: the loyalty points balance.
    Points,
    /// `spend_365d`: spend over the last 365 days.
    Spend365d,
    /// `total_spend`: lifetime spend.
    TotalSpend,
    /// `order_count`: lifetime number of orders.
    OrderCount,
}

impl NumberField {
    fn name(self) -> &'static str {
        match self {
            NumberField::Points => "points",
            NumberField::Spend365d => "spend_365d",
            NumberField::TotalSpend => "total_spend",
            NumberField::OrderCount => "order_count",
        }
    }
}

/// A point in time of a profile, read through `days_since(..)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimeField {
    /// `last_order_at`: the latest order; unset before the first order.
    LastOrderAt,
    /// `first_order_at`: the first order; unset before it.
    FirstOrderAt,
    /// `created_at`: when the profile was created.
    CreatedAt,
    /// `last_seen("CHANNEL")`: the latest event on the channel; unset if never seen there.
    LastSeen(String),
    /// `last_order_on("CHANNEL")`: the latest order on the channel; unset before one.
    LastOrderOn(String),
}

impl fmt::Display for TimeField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimeField::LastOrderAt => f.write_str("last_order_at"),
            TimeField::FirstOrderAt => f.write_str("first_order_at"),
            TimeField::CreatedAt => f.write_str("created_at"),
            TimeField::LastSeen(channel) => write!(f, "last_seen({channel:?})"),
            TimeField::LastOrderOn(channel) => write!(f, "last_order_on({channel:?})"),
        }
    }
}

impl TimeField {
    fn from_name(name: &str) -> Option<TimeField> {
        match name {
            "last_order_at" => Some(TimeField::LastOrderAt),
            "first_order_at" => Some(TimeField::FirstOrderAt),
            "created_at" => Some(TimeField::CreatedAt),
            _ => None,
        }
    }
}

/// Which parts of a profile a predicate reads, as a set of flags: the node re-evaluates a
/// predicate after a change only when the change touched one of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Reads(u16);

impl Reads {
    pub const POINTS: Reads = Reads(1);
    pub const TIER: Reads = Reads(1 << 1);
    pub const SPEND_365D: Reads = Reads(1 << 2);
    pub const TOTAL_SPEND: Reads = Reads(1 << 3);
    pub const ORDER_COUNT: Reads = Reads(1 << 4);
    pub const ATTRIBUTES: Reads = Reads(1 << 5);
    /// Manual and rule tags.
    pub const TAGS: Reads = Reads(1 << 6);
    /// Which channels the profile was seen on.
    pub const CHANNELS: Reads = Reads(1 << 7);
    pub const IDENTITIES: Reads = Reads(1 << 8);
    /// `days_since(..)`: the profile's times, and the clock.
    pub const TIMES: Reads = Reads(1 << 9);
    /// Everything: what a new profile, or a change of rules, may have changed.
    pub const ALL: Reads = Reads((1 << 10) - 1);

    /// Both sets together.
    pub fn with(self, other: Reads) -> Reads {
        Reads(self.0 | other.0)
    }

    /// Whether the sets share a part.
    pub fn intersects(self, other: Reads) -> bool {
        self.0 & other.0 != 0
    }
}

/// What a predicate can read of a profile. Implemented by the node's profile type.
///
/// Implementations must be pure for evaluation to be deterministic: in particular
/// [`days_since`](PredicateContext::days_since) measures against a "now" fixed by the caller,
/// never the wall clock.
pub trait PredicateContext {
    /// The value of a numeric field, `None` if unset.
    fn number(&self, field: NumberField) -> Option<Decimal>;
    /// Level index of the profile's current tier (0 = lowest).
    fn tier_level(&self) -> Option<usize>;
    /// Level index of a tier name in the current rules, if it exists.
    fn tier_level_of(&self, name: &str) -> Option<usize>;
    /// The value of a custom attribute, `None` if unset.
    fn attribute(&self, name: &str) -> Option<Value>;
    /// Whether the profile carries the tag.
    fn has_tag(&self, tag: &str) -> bool;
    /// Whether the profile is reachable on / was acquired through the channel.
    fn has_channel(&self, channel: &str) -> bool;
    /// Whether the profile has an identity of this kind (phone, email, ...).
    fn has_identity(&self, kind: &str) -> bool;
    /// Whole days between the field's time and "now" (floor), None if the field is unset.
    fn days_since(&self, field: &TimeField) -> Option<i64>;
}

impl Predicate {
    /// Parses and type-checks a predicate.
    ///
    /// Never panics; every malformed input gets a [`ParseError`] pointing at the offending
    /// token. Sources longer than [`PREDICATE_SOURCE_BYTES_MAX`] bytes are rejected at line 1,
    /// column 1 before anything else is read.
    pub fn parse(source: &str) -> Result<Predicate, ParseError> {
        if source.len() > PREDICATE_SOURCE_BYTES_MAX {
            return Err(ParseError {
                line: 1,
                column: 1,
                message: format!(
                    "predicate is {} bytes long, more than the limit of {PREDICATE_SOURCE_BYTES_MAX} bytes",
                    source.len()
                ),
            });
        }
        let mut parser = Parser::new(source)?;
        let root = parser.parse_or()?;
        if parser.current.tok != Tok::Eof {
            return Err(parser.unexpected("\"and\", \"or\" or end of input"));
        }
        Ok(Predicate {
            source: source.to_owned(),
            root,
        })
    }

    /// The source text the predicate was parsed from, unchanged.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the predicate against a profile. Pure: reads only `ctx`.
    pub fn eval(&self, ctx: &dyn PredicateContext) -> bool {
        self.root.eval(ctx)
    }

    /// True if the result can change with time alone (uses `days_since`); the node uses it to
    /// re-evaluate on clock ticks.
    pub fn depends_on_time(&self) -> bool {
        let mut uses_time = false;
        self.root.walk(&mut |expr| {
            if let Expr::Compare {
                operand: Operand::DaysSince(_),
                ..
            }
            | Expr::In {
                operand: Operand::DaysSince(_),
                ..
            } = expr
            {
                uses_time = true;
            }
        });
        uses_time
    }

    /// The whole-day values of `days_since(field)` at which some comparison of this predicate
    /// can change its truth (sorted, deduplicated). The result of the whole predicate can only
    /// change with time when one of them is crossed, at `field + days` whole days; the node
    /// schedules re-evaluation there instead of re-evaluating every profile on every tick.
    pub fn day_thresholds(&self) -> Vec<(TimeField, i64)> {
        let mut thresholds = BTreeSet::new();
        let mut add = |field: &TimeField, value: &Value| {
            if let Value::Number(number) = value {
                // `days OP number` over whole days flips at floor(number) or the day after.
                if let Some(floor) = number.floor().to_i64() {
                    thresholds.insert((field.clone(), floor));
                    thresholds.insert((field.clone(), floor.saturating_add(1)));
                }
            }
        };
        self.root.walk(&mut |expr| match expr {
            Expr::Compare {
                operand: Operand::DaysSince(field),
                value,
                ..
            } => add(field, value),
            Expr::In {
                operand: Operand::DaysSince(field),
                values,
            } => values.iter().for_each(|value| add(field, value)),
            _ => {}
        });
        thresholds.into_iter().collect()
    }

    /// The parts of a profile this predicate reads.
    pub fn reads(&self) -> Reads {
        let mut reads = Reads::default();
        self.root.walk(&mut |expr| {
            let part = match expr {
                Expr::Compare { operand, .. } | Expr::In { operand, .. } => match operand {
                    Operand::Number(NumberField::Points) => Reads::POINTS,
                    Operand::Number(NumberField::Spend365d) => Reads::SPEND_365D,
                    Operand::Number(NumberField::TotalSpend) => Reads::TOTAL_SPEND,
                    Operand::Number(NumberField::OrderCount) => Reads::ORDER_COUNT,
                    Operand::Tier => Reads::TIER,
                    Operand::Attr(_) => Reads::ATTRIBUTES,
                    Operand::DaysSince(_) => Reads::TIMES,
                },
                Expr::HasTag(_) => Reads::TAGS,
                Expr::Channel(_) => Reads::CHANNELS,
                Expr::HasIdentity(_) => Reads::IDENTITIES,
                Expr::Any(_) | Expr::All(_) | Expr::Not(_) => Reads::default(),
            };
            reads = reads.with(part);
        });
        reads
    }

    /// The tags this predicate reads through `has_tag` (sorted, deduplicated), so the node can
    /// reject rule cycles.
    pub fn tags_read(&self) -> Vec<String> {
        let mut tags = BTreeSet::new();
        self.root.walk(&mut |expr| {
            if let Expr::HasTag(tag) = expr {
                tags.insert(tag.clone());
            }
        });
        tags.into_iter().collect()
    }
}

#[cfg(test)]
mod day_threshold_tests;
#[cfg(test)]
mod tests;
