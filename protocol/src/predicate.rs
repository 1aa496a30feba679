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

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The longest predicate source accepted, in bytes (UTF-8).
pub const PREDICATE_SOURCE_BYTES_MAX: usize = 4096;

/// The deepest nesting accepted: each `(` and each `not` opens one level, so `((x))` and
/// `not not x` are two levels deep. Keeps the recursive parser and evaluator well inside the
/// stack on hostile input such as thousands of `(`.
pub const PREDICATE_DEPTH_MAX: usize = 32;

/// The most values an `in (...)` list may hold.
pub const PREDICATE_IN_VALUES_MAX: usize = 256;

/// The longest attribute name after `attr.`, in bytes (names are ASCII).
const ATTRIBUTE_NAME_BYTES_MAX: usize = 64;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimeField {
    /// `last_order_at`: the latest order; unset before the first order.
    LastOrderAt,
    /// `first_order_at`: the first order; unset before it.
    FirstOrderAt,
    /// `created_at`: when the profile was created.
    CreatedAt,
}

impl TimeField {
    fn name(self) -> &'static str {
        match self {
            TimeField::LastOrderAt => "last_order_at",
            TimeField::FirstOrderAt => "first_order_at",
            TimeField::CreatedAt => "created_at",
        }
    }

    fn from_name(name: &str) -> Option<TimeField> {
        match name {
            "last_order_at" => Some(TimeField::LastOrderAt),
            "first_order_at" => Some(TimeField::FirstOrderAt),
            "created_at" => Some(TimeField::CreatedAt),
            _ => None,
        }
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
    fn days_since(&self, field: TimeField) -> Option<i64>;
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
        let mut add = |field: TimeField, value: &Value| {
            if let Value::Number(number) = value {
                // `days OP number` over whole days flips at floor(number) or the day after.
                if let Some(floor) = number.floor().to_i64() {
                    thresholds.insert((field, floor));
                    thresholds.insert((field, floor.saturating_add(1)));
                }
            }
        };
        self.root.walk(&mut |expr| match expr {
            Expr::Compare {
                operand: Operand::DaysSince(field),
                value,
                ..
            } => add(*field, value),
            Expr::In {
                operand: Operand::DaysSince(field),
                values,
            } => values.iter().for_each(|value| add(*field, value)),
            _ => {}
        });
        thresholds.into_iter().collect()
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

// ---------------------------------------------------------------------------------------------
// Syntax tree and evaluation
// ---------------------------------------------------------------------------------------------

/// A node of the syntax tree. `and`/`or` chains are flat lists, so only parentheses and `not`
/// (both bounded by [`PREDICATE_DEPTH_MAX`]) add depth.
#[derive(Debug, Clone, PartialEq)]
enum Expr {
    /// `a or b or ...`, at least two terms.
    Any(Vec<Expr>),
    /// `a and b and ...`, at least two terms.
    All(Vec<Expr>),
    Not(Box<Expr>),
    Compare {
        operand: Operand,
        op: CmpOp,
        value: Value,
    },
    /// `operand in (values)`, 1 to [`PREDICATE_IN_VALUES_MAX`] values.
    In {
        operand: Operand,
        values: Vec<Value>,
    },
    HasTag(String),
    Channel(String),
    HasIdentity(String),
}

impl Expr {
    fn eval(&self, ctx: &dyn PredicateContext) -> bool {
        match self {
            Expr::Any(terms) => terms.iter().any(|term| term.eval(ctx)),
            Expr::All(terms) => terms.iter().all(|term| term.eval(ctx)),
            Expr::Not(inner) => !inner.eval(ctx),
            Expr::Compare { operand, op, value } => operand
                .read(ctx)
                .is_some_and(|lhs| lhs.compare(*op, value, ctx)),
            Expr::In { operand, values } => operand.read(ctx).is_some_and(|lhs| {
                values
                    .iter()
                    .any(|value| lhs.compare(CmpOp::Eq, value, ctx))
            }),
            Expr::HasTag(tag) => ctx.has_tag(tag),
            Expr::Channel(channel) => ctx.has_channel(channel),
            Expr::HasIdentity(kind) => ctx.has_identity(kind),
        }
    }

    /// Calls `visit` on this node and every node below it.
    fn walk(&self, visit: &mut dyn FnMut(&Expr)) {
        visit(self);
        match self {
            Expr::Any(terms) | Expr::All(terms) => terms.iter().for_each(|term| term.walk(visit)),
            Expr::Not(inner) => inner.walk(visit),
            Expr::Compare { .. }
            | Expr::In { .. }
            | Expr::HasTag(_)
            | Expr::Channel(_)
            | Expr::HasIdentity(_) => {}
        }
    }

    /// `a or b ...` from its terms, or the single term itself.
    fn any(mut terms: Vec<Expr>) -> Expr {
        if terms.len() == 1 {
            if let Some(term) = terms.pop() {
                return term;
            }
        }
        Expr::Any(terms)
    }

    /// `a and b ...` from its terms, or the single term itself.
    fn all(mut terms: Vec<Expr>) -> Expr {
        if terms.len() == 1 {
            if let Some(term) = terms.pop() {
                return term;
            }
        }
        Expr::All(terms)
    }
}

/// The left side of a comparison.
#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Number(NumberField),
    Tier,
    Attr(String),
    DaysSince(TimeField),
}

impl Operand {
    /// Reads the operand from the profile; `None` when it is unset.
    fn read(&self, ctx: &dyn PredicateContext) -> Option<Lhs> {
        match self {
            Operand::Number(field) => ctx.number(*field).map(|n| Lhs::Value(Value::Number(n))),
            Operand::Tier => ctx.tier_level().map(Lhs::TierLevel),
            Operand::Attr(name) => ctx.attribute(name).map(Lhs::Value),
            Operand::DaysSince(field) => ctx
                .days_since(*field)
                .map(|days| Lhs::Value(Value::Number(Decimal::from(days)))),
        }
    }

    /// The parse-time type rule: which literals this operand may be compared with.
    fn check(&self, value: &Value) -> Result<(), String> {
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
            Operand::DaysSince(field) => write!(f, "days_since({})", field.name()),
        }
    }
}

/// An operand's value as read from a profile.
enum Lhs {
    Value(Value),
    /// Tiers compare by level, so the literal is resolved to a level too.
    TierLevel(usize),
}

impl Lhs {
    fn compare(&self, op: CmpOp, literal: &Value, ctx: &dyn PredicateContext) -> bool {
        match (self, literal) {
            // An unknown tier name is a missing value: false whatever the operator.
            (Lhs::TierLevel(level), Value::String(name)) => ctx
                .tier_level_of(name)
                .is_some_and(|other| op.holds(level.cmp(&other))),
            (Lhs::TierLevel(_), _) => false,
            (Lhs::Value(value), literal) => compare_values(value, op, literal),
        }
    }
}

/// Compares two values; values of different types never compare true.
fn compare_values(left: &Value, op: CmpOp, right: &Value) -> bool {
    match (left, right) {
        (Value::Number(a), Value::Number(b)) => op.holds(a.cmp(b)),
        (Value::String(a), Value::String(b)) => op.holds(a.as_bytes().cmp(b.as_bytes())),
        (Value::Bool(a), Value::Bool(b)) => match op {
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
            // Booleans have no order in the language.
            CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge => false,
        },
        _ => false,
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    /// Whether `left OP right` holds, given `left.cmp(right)`.
    fn holds(self, ordering: Ordering) -> bool {
        match self {
            CmpOp::Eq => ordering == Ordering::Equal,
            CmpOp::Ne => ordering != Ordering::Equal,
            CmpOp::Lt => ordering == Ordering::Less,
            CmpOp::Le => ordering != Ordering::Greater,
            CmpOp::Gt => ordering == Ordering::Greater,
            CmpOp::Ge => ordering != Ordering::Less,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------------------

/// A 1-based position in the source; the column counts characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: u32,
    column: u32,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok<'a> {
    LParen,
    RParen,
    Comma,
    Cmp(CmpOp),
    /// An identifier or keyword.
    Word(&'a str),
    /// `attr.NAME`, holding the validated NAME.
    Attr(&'a str),
    Number(Decimal),
    /// A string literal, unescaped.
    Str(String),
    Eof,
}

#[derive(Debug, Clone)]
struct Token<'a> {
    tok: Tok<'a>,
    /// The token's source text, for error messages.
    text: &'a str,
    pos: Pos,
}

impl Token<'_> {
    /// How the token is named in "but found ..." messages.
    fn describe(&self) -> String {
        match self.tok {
            Tok::Eof => "end of input".to_owned(),
            Tok::Number(_) => format!("number {}", self.text),
            Tok::Str(_) => format!("string {}", self.text),
            _ => format!("\"{}\"", self.text),
        }
    }
}

/// Splits the source into tokens on demand, so that the first error in source order is the
/// one reported (a bad string at the end doesn't mask a bad field at the start).
struct Lexer<'a> {
    source: &'a str,
    /// Byte offset of the next character.
    offset: usize,
    /// Position of the next character.
    pos: Pos,
}

impl<'a> Lexer<'a> {
    fn new(source: &'a str) -> Lexer<'a> {
        Lexer {
            source,
            offset: 0,
            pos: Pos { line: 1, column: 1 },
        }
    }

    fn peek(&self) -> Option<char> {
        self.source[self.offset..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.offset += c.len_utf8();
        // Sources are at most 4096 bytes, so these can't overflow; saturate anyway.
        if c == '\n' {
            self.pos.line = self.pos.line.saturating_add(1);
            self.pos.column = 1;
        } else {
            self.pos.column = self.pos.column.saturating_add(1);
        }
        Some(c)
    }

    fn eat(&mut self, expected: char) -> bool {
        if self.peek() == Some(expected) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn eat_while(&mut self, accept: impl Fn(char) -> bool) {
        while self.peek().is_some_and(&accept) {
            self.bump();
        }
    }

    fn next_token(&mut self) -> Result<Token<'a>, ParseError> {
        self.eat_while(char::is_whitespace);
        let start = self.offset;
        let pos = self.pos;
        let Some(c) = self.bump() else {
            return Ok(Token {
                tok: Tok::Eof,
                text: "",
                pos,
            });
        };
        let tok = match c {
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            ',' => Tok::Comma,
            '=' if self.eat('=') => Tok::Cmp(CmpOp::Eq),
            '!' if self.eat('=') => Tok::Cmp(CmpOp::Ne),
            '<' if self.eat('=') => Tok::Cmp(CmpOp::Le),
            '<' => Tok::Cmp(CmpOp::Lt),
            '>' if self.eat('=') => Tok::Cmp(CmpOp::Ge),
            '>' => Tok::Cmp(CmpOp::Gt),
            '"' => self.string(pos)?,
            '0'..='9' => self.number(start, pos)?,
            '-' if self.peek().is_some_and(|c| c.is_ascii_digit()) => self.number(start, pos)?,
            c if c.is_ascii_alphabetic() || c == '_' => self.word(start, pos)?,
            // Hints for what people coming from other languages type.
            '=' => {
                return Err(ParseError::at(
                    pos,
                    "unexpected character \"=\" (compare with \"==\")",
                ))
            }
            '!' => {
                return Err(ParseError::at(
                    pos,
                    "unexpected character \"!\" (negate with \"not\")",
                ))
            }
            '&' => {
                return Err(ParseError::at(
                    pos,
                    "unexpected character \"&\" (use \"and\")",
                ))
            }
            '|' => {
                return Err(ParseError::at(
                    pos,
                    "unexpected character \"|\" (use \"or\")",
                ))
            }
            other => {
                return Err(ParseError::at(
                    pos,
                    format!("unexpected character \"{}\"", other.escape_debug()),
                ))
            }
        };
        Ok(Token {
            tok,
            text: &self.source[start..self.offset],
            pos,
        })
    }

    /// A string literal; the opening quote is consumed.
    fn string(&mut self, open: Pos) -> Result<Tok<'a>, ParseError> {
        let mut text = String::new();
        loop {
            let here = self.pos;
            match self.bump() {
                // A newline almost always means a forgotten closing quote; pointing at the
                // opening quote is more useful than at the end of the source.
                None | Some('\n') => return Err(ParseError::at(open, "unterminated string")),
                Some('"') => return Ok(Tok::Str(text)),
                Some('\\') => match self.bump() {
                    Some('"') => text.push('"'),
                    Some('\\') => text.push('\\'),
                    None | Some('\n') => return Err(ParseError::at(open, "unterminated string")),
                    Some(other) => {
                        return Err(ParseError::at(
                            here,
                            format!(
                            "invalid escape \"\\{}\" in string (only \\\" and \\\\ are allowed)",
                            other.escape_debug()
                        ),
                        ))
                    }
                },
                Some(c) => text.push(c),
            }
        }
    }

    /// A number literal; its first character (digit or `-`) is consumed.
    fn number(&mut self, start: usize, pos: Pos) -> Result<Tok<'a>, ParseError> {
        self.eat_while(|c| c.is_ascii_digit());
        let mut well_formed = true;
        if self.eat('.') {
            well_formed = self.peek().is_some_and(|c| c.is_ascii_digit());
            self.eat_while(|c| c.is_ascii_digit());
        }
        // `12abc`, `1.2.3`: report the whole run as one bad number rather than a number
        // followed by a puzzling second token.
        if self
            .peek()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.')
        {
            well_formed = false;
            self.eat_while(|c| c.is_alphanumeric() || c == '_' || c == '.');
        }
        let text = &self.source[start..self.offset];
        if !well_formed {
            return Err(ParseError::at(pos, format!("invalid number \"{text}\"")));
        }
        // Exact: from the literal text, never through f64, and never silently rounded.
        Decimal::from_str_exact(text).map(Tok::Number).map_err(|_| {
            ParseError::at(
                pos,
                format!("number {text} is out of range (at most 28 significant digits)"),
            )
        })
    }

    /// An identifier, keyword or `attr.NAME`; its first character is consumed.
    fn word(&mut self, start: usize, pos: Pos) -> Result<Tok<'a>, ParseError> {
        self.eat_while(|c| c.is_ascii_alphanumeric() || c == '_');
        let word = &self.source[start..self.offset];
        if word != "attr" || !self.eat('.') {
            return Ok(Tok::Word(word));
        }
        let name_start = self.offset;
        // Take any alphanumerics so that `attr.Città` is reported whole.
        self.eat_while(|c| c.is_alphanumeric() || c == '_');
        let name = &self.source[name_start..self.offset];
        if name.is_empty() {
            return Err(ParseError::at(
                pos,
                "expected an attribute name after \"attr.\"",
            ));
        }
        let valid = name.len() <= ATTRIBUTE_NAME_BYTES_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(ParseError::at(
                pos,
                format!(
                    "invalid attribute name \"{name}\" (1 to {ATTRIBUTE_NAME_BYTES_MAX} of a-z, 0-9 and _)"
                ),
            ));
        }
        Ok(Tok::Attr(name))
    }
}

// ---------------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------------

/// Recursive descent with one token of lookahead (`current`).
struct Parser<'a> {
    lexer: Lexer<'a>,
    current: Token<'a>,
    /// Open `(` and `not` levels; bounded by [`PREDICATE_DEPTH_MAX`].
    depth: usize,
}

impl<'a> Parser<'a> {
    fn new(source: &'a str) -> Result<Parser<'a>, ParseError> {
        let mut lexer = Lexer::new(source);
        let current = lexer.next_token()?;
        Ok(Parser {
            lexer,
            current,
            depth: 0,
        })
    }

    /// Moves to the next token, returning the one just passed.
    fn advance(&mut self) -> Result<Token<'a>, ParseError> {
        let next = self.lexer.next_token()?;
        Ok(std::mem::replace(&mut self.current, next))
    }

    fn at_word(&self, word: &str) -> bool {
        matches!(self.current.tok, Tok::Word(w) if w == word)
    }

    /// An error at the current token, which isn't what was `expected`.
    fn unexpected(&self, expected: &str) -> ParseError {
        let message = match self.current.tok {
            Tok::Eof => format!("unexpected end of input, expected {expected}"),
            _ => format!("expected {expected} but found {}", self.current.describe()),
        };
        ParseError::at(self.current.pos, message)
    }

    /// Consumes a punctuation token, or fails naming it.
    fn expect(&mut self, tok: Tok<'static>, name: &str) -> Result<(), ParseError> {
        if self.current.tok == tok {
            self.advance()?;
            Ok(())
        } else {
            Err(self.unexpected(name))
        }
    }

    /// Opens one nesting level at `pos`.
    fn enter(&mut self, pos: Pos) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > PREDICATE_DEPTH_MAX {
            return Err(ParseError::at(
                pos,
                format!("nesting is deeper than the limit of {PREDICATE_DEPTH_MAX} levels"),
            ));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    fn parse_or(&mut self) -> Result<Expr, ParseError> {
        let mut terms = vec![self.parse_and()?];
        while self.at_word("or") {
            self.advance()?;
            terms.push(self.parse_and()?);
        }
        Ok(Expr::any(terms))
    }

    fn parse_and(&mut self) -> Result<Expr, ParseError> {
        let mut terms = vec![self.parse_unary()?];
        while self.at_word("and") {
            self.advance()?;
            terms.push(self.parse_unary()?);
        }
        Ok(Expr::all(terms))
    }

    fn parse_unary(&mut self) -> Result<Expr, ParseError> {
        if !self.at_word("not") {
            return self.parse_primary();
        }
        let not = self.advance()?;
        self.enter(not.pos)?;
        let inner = self.parse_unary()?;
        self.leave();
        Ok(Expr::Not(Box::new(inner)))
    }

    fn parse_primary(&mut self) -> Result<Expr, ParseError> {
        let word = match self.current.tok {
            Tok::LParen => {
                let open = self.advance()?;
                self.enter(open.pos)?;
                let inner = self.parse_or()?;
                self.expect(Tok::RParen, "\")\"")?;
                self.leave();
                return Ok(inner);
            }
            Tok::Attr(name) => {
                self.advance()?;
                return self.parse_comparison(Operand::Attr(name.to_owned()));
            }
            Tok::Word(word) => word,
            _ => return Err(self.unexpected("a condition")),
        };
        let number = |field| Some(Operand::Number(field));
        let operand = match word {
            "has_tag" => return Ok(Expr::HasTag(self.parse_call_argument()?)),
            "channel" => return Ok(Expr::Channel(self.parse_call_argument()?)),
            "has_identity" => return Ok(Expr::HasIdentity(self.parse_call_argument()?)),
            "points" => number(NumberField::Points),
            "spend_365d" => number(NumberField::Spend365d),
            "total_spend" => number(NumberField::TotalSpend),
            "order_count" => number(NumberField::OrderCount),
            "tier" => Some(Operand::Tier),
            "days_since" => None,
            "and" | "or" | "in" | "true" | "false" => return Err(self.unexpected("a condition")),
            "attr" => {
                return Err(ParseError::at(
                    self.current.pos,
                    "expected \"attr.\" followed by an attribute name",
                ))
            }
            _ => {
                return Err(ParseError::at(
                    self.current.pos,
                    format!("unknown field \"{word}\""),
                ))
            }
        };
        let operand = match operand {
            Some(operand) => {
                self.advance()?;
                operand
            }
            None => Operand::DaysSince(self.parse_time_field()?),
        };
        self.parse_comparison(operand)
    }

    /// `"(" STRING ")"` after a call name (the current token).
    fn parse_call_argument(&mut self) -> Result<String, ParseError> {
        self.advance()?;
        self.expect(Tok::LParen, "\"(\"")?;
        let Tok::Str(argument) = &self.current.tok else {
            return Err(self.unexpected("a string"));
        };
        let argument = argument.clone();
        self.advance()?;
        self.expect(Tok::RParen, "\")\"")?;
        Ok(argument)
    }

    /// `"(" TIMEFIELD ")"` after `days_since` (the current token).
    fn parse_time_field(&mut self) -> Result<TimeField, ParseError> {
        const EXPECTED: &str = "last_order_at, first_order_at or created_at";
        self.advance()?;
        self.expect(Tok::LParen, "\"(\"")?;
        let Tok::Word(name) = self.current.tok else {
            return Err(self.unexpected(&format!("a time field ({EXPECTED})")));
        };
        let Some(field) = TimeField::from_name(name) else {
            return Err(ParseError::at(
                self.current.pos,
                format!("unknown time field \"{name}\" (expected {EXPECTED})"),
            ));
        };
        self.advance()?;
        self.expect(Tok::RParen, "\")\"")?;
        Ok(field)
    }

    /// `OP value` or `in (values)` after an operand.
    fn parse_comparison(&mut self, operand: Operand) -> Result<Expr, ParseError> {
        if let Tok::Cmp(op) = self.current.tok {
            self.advance()?;
            let value = self.parse_value(&operand)?;
            return Ok(Expr::Compare { operand, op, value });
        }
        if !self.at_word("in") {
            return Err(self.unexpected("a comparison operator or \"in\""));
        }
        self.advance()?;
        self.expect(Tok::LParen, "\"(\"")?;
        if self.current.tok == Tok::RParen {
            return Err(ParseError::at(
                self.current.pos,
                "an \"in\" list needs at least one value",
            ));
        }
        let mut values = Vec::new();
        loop {
            if values.len() == PREDICATE_IN_VALUES_MAX {
                return Err(ParseError::at(
                    self.current.pos,
                    format!("an \"in\" list holds at most {PREDICATE_IN_VALUES_MAX} values"),
                ));
            }
            values.push(self.parse_value(&operand)?);
            match self.current.tok {
                Tok::Comma => {
                    self.advance()?;
                }
                Tok::RParen => {
                    self.advance()?;
                    return Ok(Expr::In { operand, values });
                }
                _ => return Err(self.unexpected("\",\" or \")\"")),
            }
        }
    }

    /// A literal, type-checked against the operand it is compared with.
    fn parse_value(&mut self, operand: &Operand) -> Result<Value, ParseError> {
        let value = match &self.current.tok {
            Tok::Number(number) => Value::Number(*number),
            Tok::Str(text) => Value::String(text.clone()),
            Tok::Word("true") => Value::Bool(true),
            Tok::Word("false") => Value::Bool(false),
            _ => return Err(self.unexpected("a value (a number, a string, true or false)")),
        };
        // Checked before advancing, so a type error is reported before any error further on.
        operand
            .check(&value)
            .map_err(|message| ParseError::at(self.current.pos, message))?;
        self.advance()?;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile for tests: tiers bronze < silver < gold.
    #[derive(Default)]
    struct TestProfile {
        numbers: Vec<(NumberField, Decimal)>,
        tier: Option<usize>,
        attributes: Vec<(&'static str, Value)>,
        tags: Vec<&'static str>,
        channels: Vec<&'static str>,
        identities: Vec<&'static str>,
        days: Vec<(TimeField, i64)>,
    }

    const TIERS: [&str; 3] = ["bronze", "silver", "gold"];

    impl PredicateContext for TestProfile {
        fn number(&self, field: NumberField) -> Option<Decimal> {
            self.numbers
                .iter()
                .find(|(f, _)| *f == field)
                .map(|(_, n)| *n)
        }
        fn tier_level(&self) -> Option<usize> {
            self.tier
        }
        fn tier_level_of(&self, name: &str) -> Option<usize> {
            TIERS.iter().position(|tier| *tier == name)
        }
        fn attribute(&self, name: &str) -> Option<Value> {
            self.attributes
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        }
        fn has_tag(&self, tag: &str) -> bool {
            self.tags.contains(&tag)
        }
        fn has_channel(&self, channel: &str) -> bool {
            self.channels.contains(&channel)
        }
        fn has_identity(&self, kind: &str) -> bool {
            self.identities.contains(&kind)
        }
        fn days_since(&self, field: TimeField) -> Option<i64> {
            self.days.iter().find(|(f, _)| *f == field).map(|(_, d)| *d)
        }
    }

    fn dec(text: &str) -> Decimal {
        Decimal::from_str_exact(text).unwrap()
    }

    fn parse(source: &str) -> Predicate {
        Predicate::parse(source).unwrap_or_else(|e| panic!("{source:?} should parse: {e}"))
    }

    fn eval(source: &str, profile: &TestProfile) -> bool {
        parse(source).eval(profile)
    }

    /// (line, column, message) of the error parsing `source`.
    fn error(source: &str) -> (u32, u32, String) {
        match Predicate::parse(source) {
            Ok(_) => panic!("{source:?} should not parse"),
            Err(e) => (e.line, e.column, e.message),
        }
    }

    fn err(line: u32, column: u32, message: &str) -> (u32, u32, String) {
        (line, column, message.to_owned())
    }

    fn tagged(tags: &[&'static str]) -> TestProfile {
        TestProfile {
            tags: tags.to_vec(),
            ..TestProfile::default()
        }
    }

    #[test]
    fn every_operator_on_every_number_field() {
        let fields = [
            ("points", NumberField::Points),
            ("spend_365d", NumberField::Spend365d),
            ("total_spend", NumberField::TotalSpend),
            ("order_count", NumberField::OrderCount),
        ];
        // (operator, expected for literal 99, for 100, for 101) with the field at 100.
        let table = [
            ("==", false, true, false),
            ("!=", true, false, true),
            ("<", false, false, true),
            ("<=", false, true, true),
            (">", true, false, false),
            (">=", true, true, false),
        ];
        for (name, field) in fields {
            let profile = TestProfile {
                numbers: vec![(field, dec("100"))],
                ..TestProfile::default()
            };
            let unset = TestProfile::default();
            for (op, below, equal, above) in table {
                for (literal, expected) in [("99", below), ("100", equal), ("101", above)] {
                    let source = format!("{name} {op} {literal}");
                    assert_eq!(eval(&source, &profile), expected, "{source}");
                    // An unset field makes every comparison false, `!=` included.
                    assert!(!eval(&source, &unset), "{source} on an unset field");
                }
            }
        }
    }

    #[test]
    fn decimal_literals_are_exact() {
        let profile = TestProfile {
            numbers: vec![
                (NumberField::Spend365d, dec("1000.50")),
                (
                    NumberField::TotalSpend,
                    dec("1234567890123456789.123456789"),
                ),
                (NumberField::Points, dec("-3")),
            ],
            ..TestProfile::default()
        };
        assert!(eval("spend_365d >= 1000.50", &profile));
        assert!(
            eval("spend_365d == 1000.5", &profile),
            "scale doesn't matter"
        );
        assert!(!eval("spend_365d >= 1000.51", &profile));
        assert!(eval("spend_365d > 1000.49", &profile));
        // Needs more precision than an f64 has.
        assert!(eval(
            "total_spend == 1234567890123456789.123456789",
            &profile
        ));
        assert!(!eval(
            "total_spend == 1234567890123456789.123456788",
            &profile
        ));
        assert!(eval("points == -3", &profile));
        assert!(eval("points < -2.99", &profile));
        assert!(eval("points>-4", &profile), "no spaces needed");
    }

    #[test]
    fn tiers_order_by_level() {
        let silver = TestProfile {
            tier: Some(1),
            ..TestProfile::default()
        };
        let cases = [
            ("tier == \"silver\"", true),
            ("tier != \"silver\"", false),
            ("tier != \"gold\"", true),
            ("tier < \"gold\"", true),
            ("tier <= \"silver\"", true),
            ("tier > \"bronze\"", true),
            ("tier >= \"gold\"", false),
            ("tier > \"silver\"", false),
            ("tier in (\"gold\", \"silver\")", true),
            ("tier in (\"gold\", \"bronze\")", false),
            // Unknown tier names are missing values: false with every operator.
            ("tier >= \"platinum\"", false),
            ("tier < \"platinum\"", false),
            ("tier != \"platinum\"", false),
            ("not tier == \"platinum\"", true),
        ];
        for (source, expected) in cases {
            assert_eq!(eval(source, &silver), expected, "{source}");
        }
        let no_tier = TestProfile::default();
        assert!(!eval("tier == \"bronze\"", &no_tier));
        assert!(!eval("tier != \"bronze\"", &no_tier));
        assert!(!eval("tier >= \"bronze\"", &no_tier));
    }

    #[test]
    fn attributes_compare_by_type() {
        let profile = TestProfile {
            attributes: vec![
                ("city", Value::String("Paris".into())),
                ("age", Value::Number(dec("31"))),
                ("vip", Value::Bool(true)),
                ("code", Value::String("B".into())),
                ("quote", Value::String("say \"hi\" \\ ok".into())),
                ("zip", Value::String("02139".into())),
            ],
            ..TestProfile::default()
        };
        let cases = [
            ("attr.city == \"Paris\"", true),
            ("attr.city != \"Paris\"", false),
            ("attr.city != \"Lyon\"", true),
            ("attr.city == \"paris\"", false),
            // Byte-wise: "B" (0x42) < "a" (0x61); "é" (0xC3..) > "z".
            ("attr.code < \"a\"", true),
            ("attr.code > \"A\"", true),
            ("attr.code >= \"B\"", true),
            ("attr.code <= \"A\"", false),
            ("attr.city < \"é\"", true),
            ("attr.age == 31", true),
            ("attr.age == 31.0", true),
            ("attr.age >= 18", true),
            ("attr.age < 18", false),
            ("attr.vip == true", true),
            ("attr.vip != false", true),
            ("attr.vip == false", false),
            // Booleans have no order.
            ("attr.vip > false", false),
            ("attr.vip >= true", false),
            ("attr.vip <= true", false),
            // Different types: false, `!=` included.
            ("attr.age == \"31\"", false),
            ("attr.age != \"31\"", false),
            ("attr.zip == 2139", false),
            ("attr.zip != 2139", false),
            ("attr.city == true", false),
            ("attr.vip != 1", false),
            // Missing: false both ways, and `not` negates plainly.
            ("attr.country == \"FR\"", false),
            ("attr.country != \"FR\"", false),
            ("attr.country < \"FR\"", false),
            ("not attr.country == \"FR\"", true),
            ("not (attr.country != \"FR\")", true),
            ("attr.quote == \"say \\\"hi\\\" \\\\ ok\"", true),
            ("attr.city in (\"Lyon\", \"Paris\")", true),
            ("attr.city in (\"Lyon\", 3, true)", false),
            ("attr.age in (\"31\", 31)", true),
            ("attr.country in (\"FR\")", false),
            ("not (attr.country in (\"FR\"))", true),
        ];
        for (source, expected) in cases {
            assert_eq!(eval(source, &profile), expected, "{source}");
        }
    }

    #[test]
    fn in_lists_on_number_fields() {
        let profile = TestProfile {
            numbers: vec![(NumberField::OrderCount, dec("3"))],
            ..TestProfile::default()
        };
        assert!(eval("order_count in (1, 2, 3)", &profile));
        assert!(eval("order_count in (3.00)", &profile));
        assert!(!eval("order_count in (1, 2)", &profile));
        assert!(!eval("points in (0)", &profile), "unset field");
        let list = vec!["1"; PREDICATE_IN_VALUES_MAX].join(",");
        assert!(!eval(&format!("order_count in ({list})"), &profile));
    }

    #[test]
    fn days_since_compares_whole_days() {
        let profile = TestProfile {
            days: vec![(TimeField::LastOrderAt, 30), (TimeField::CreatedAt, 400)],
            ..TestProfile::default()
        };
        let cases = [
            ("days_since(last_order_at) >= 30", true),
            ("days_since(last_order_at) > 30", false),
            ("days_since(last_order_at) == 30", true),
            ("days_since(last_order_at) < 31", true),
            ("days_since(last_order_at) > 29.5", true),
            ("days_since(created_at) >= 365", true),
            ("days_since( created_at ) in (400, 401)", true),
            // No first order recorded: false whatever the operator.
            ("days_since(first_order_at) > 3", false),
            ("days_since(first_order_at) <= 3", false),
            ("days_since(first_order_at) != 3", false),
            ("not days_since(first_order_at) > 3", true),
        ];
        for (source, expected) in cases {
            assert_eq!(eval(source, &profile), expected, "{source}");
        }
    }

    #[test]
    fn calls_read_tags_channels_and_identities() {
        let profile = TestProfile {
            tags: vec!["vip"],
            channels: vec!["wechat"],
            identities: vec!["phone"],
            ..TestProfile::default()
        };
        let cases = [
            ("has_tag(\"vip\")", true),
            ("has_tag(\"VIP\")", false),
            ("has_tag(\"churned\")", false),
            ("channel(\"wechat\")", true),
            ("channel(\"email\")", false),
            ("has_identity(\"phone\")", true),
            ("has_identity(\"email\")", false),
            ("not has_identity(\"email\")", true),
        ];
        for (source, expected) in cases {
            assert_eq!(eval(source, &profile), expected, "{source}");
        }
    }

    #[test]
    fn precedence_and_parentheses() {
        let (a, b, c) = ("has_tag(\"a\")", "has_tag(\"b\")", "has_tag(\"c\")");
        // `a or b and c` is `a or (b and c)`: true with only a, where `(a or b) and c` is false.
        assert!(eval(&format!("{a} or {b} and {c}"), &tagged(&["a"])));
        assert!(!eval(&format!("({a} or {b}) and {c}"), &tagged(&["a"])));
        assert!(!eval(&format!("{a} and {b} or {c}"), &tagged(&["a"])));
        assert!(eval(&format!("{a} and ({b} or {c})"), &tagged(&["a", "c"])));
        assert!(eval(&format!("{c} or {a} and {b}"), &tagged(&["c"])));
        // `not` binds tighter than `and`: `(not a) and b`, false with nothing set, where
        // `not (a and b)` is true.
        assert!(!eval(&format!("not {a} and {b}"), &tagged(&[])));
        assert!(eval(&format!("not ({a} and {b})"), &tagged(&[])));
        assert!(eval(&format!("not not {a}"), &tagged(&["a"])));
        assert!(eval(&format!("((({a})))"), &tagged(&["a"])));
        // Whitespace and newlines are free.
        assert!(eval(&format!("\n\t{a}\r\n  or\n{b}  "), &tagged(&["b"])));
        assert!(eval("has_tag(\"a\")or(has_tag(\"b\"))", &tagged(&["b"])));
    }

    #[test]
    fn parse_errors_point_at_the_token() {
        let cases = [
            ("pointz > 1", err(1, 1, "unknown field \"pointz\"")),
            ("has_tag(\"a\" and x", err(1, 13, "expected \")\" but found \"and\"")),
            (
                "tier == 3",
                err(1, 9, "tier compares with a tier name (a string), found a number"),
            ),
            (
                "tier in (\"gold\", true)",
                err(1, 18, "tier compares with a tier name (a string), found a boolean"),
            ),
            ("points == \"100\"", err(1, 11, "points compares with a number, found a string")),
            (
                "days_since(created_at) > true",
                err(1, 26, "days_since(created_at) compares with a number, found a boolean"),
            ),
            ("has_tag(\"abc", err(1, 9, "unterminated string")),
            ("has_tag(\"abc\n\")", err(1, 9, "unterminated string")),
            (
                "points >",
                err(1, 9, "unexpected end of input, expected a value (a number, a string, true or false)"),
            ),
            ("", err(1, 1, "unexpected end of input, expected a condition")),
            ("  \n ", err(2, 2, "unexpected end of input, expected a condition")),
            ("(points > 1", err(1, 12, "unexpected end of input, expected \")\"")),
            ("points > 1)", err(1, 11, "expected \"and\", \"or\" or end of input but found \")\"")),
            ("points > 1 points", err(1, 12, "expected \"and\", \"or\" or end of input but found \"points\"")),
            ("points 1", err(1, 8, "expected a comparison operator or \"in\" but found number 1")),
            ("and points > 1", err(1, 1, "expected a condition but found \"and\"")),
            ("points > 1 AND points < 3", err(1, 12, "expected \"and\", \"or\" or end of input but found \"AND\"")),
            ("points > and", err(1, 10, "expected a value (a number, a string, true or false) but found \"and\"")),
            ("points = 1", err(1, 8, "unexpected character \"=\" (compare with \"==\")")),
            ("!has_tag(\"a\")", err(1, 1, "unexpected character \"!\" (negate with \"not\")")),
            ("has_tag(\"a\") && has_tag(\"b\")", err(1, 14, "unexpected character \"&\" (use \"and\")")),
            ("points > 1 # x", err(1, 12, "unexpected character \"#\"")),
            ("points in ()", err(1, 12, "an \"in\" list needs at least one value")),
            ("points in (1,)", err(1, 14, "expected a value (a number, a string, true or false) but found \")\"")),
            ("points in (1 2)", err(1, 14, "expected \",\" or \")\" but found number 2")),
            ("points in 1", err(1, 11, "expected \"(\" but found number 1")),
            ("has_tag(vip)", err(1, 9, "expected a string but found \"vip\"")),
            ("has_tag \"vip\"", err(1, 9, "expected \"(\" but found string \"vip\"")),
            (
                "days_since(birthday) > 1",
                err(1, 12, "unknown time field \"birthday\" (expected last_order_at, first_order_at or created_at)"),
            ),
            (
                "days_since(\"created_at\") > 1",
                err(1, 12, "expected a time field (last_order_at, first_order_at or created_at) but found string \"created_at\""),
            ),
            ("days_since > 1", err(1, 12, "expected \"(\" but found \">\"")),
            ("attr.City == 1", err(1, 1, "invalid attribute name \"City\" (1 to 64 of a-z, 0-9 and _)")),
            ("attr. == 1", err(1, 1, "expected an attribute name after \"attr.\"")),
            ("attr == 1", err(1, 1, "expected \"attr.\" followed by an attribute name")),
            ("points > 12abc", err(1, 10, "invalid number \"12abc\"")),
            ("points > 1.2.3", err(1, 10, "invalid number \"1.2.3\"")),
            ("points > 1.", err(1, 10, "invalid number \"1.\"")),
            ("points > .5", err(1, 10, "unexpected character \".\"")),
            ("points > - 5", err(1, 10, "unexpected character \"-\"")),
            (
                "points > 123456789012345678901234567890",
                err(1, 10, "number 123456789012345678901234567890 is out of range (at most 28 significant digits)"),
            ),
            (
                "has_tag(\"a\\n\")",
                err(1, 11, "invalid escape \"\\n\" in string (only \\\" and \\\\ are allowed)"),
            ),
            ("true", err(1, 1, "expected a condition but found \"true\"")),
            ("not", err(1, 4, "unexpected end of input, expected a condition")),
        ];
        for (source, expected) in cases {
            assert_eq!(error(source), expected, "{source:?}");
        }
    }

    #[test]
    fn parse_errors_on_later_lines_and_after_wide_chars() {
        assert_eq!(
            error("has_tag(\"a\")\n  and pointz > 3"),
            err(2, 7, "unknown field \"pointz\"")
        );
        assert_eq!(
            error("points > 1\r\nor\r\n   tier == 2"),
            err(
                3,
                12,
                "tier compares with a tier name (a string), found a number"
            )
        );
        assert_eq!(
            error("has_tag(\"a\") or\n\n has_tag(\"b\n\")"),
            err(3, 10, "unterminated string")
        );
        // Columns count characters, not bytes: "é" and "会员" are one column each.
        assert_eq!(
            error("has_tag(\"é会员\") and pointz > 1"),
            err(1, 20, "unknown field \"pointz\"")
        );
        let e = Predicate::parse("has_tag(\"a\")\n  and pointz > 3").unwrap_err();
        assert_eq!(e.to_string(), "line 2, column 7: unknown field \"pointz\"");
    }

    #[test]
    fn the_first_error_in_source_order_wins() {
        // The unknown field comes before the unterminated string.
        assert_eq!(
            error("pointz > 1 or has_tag(\"x"),
            err(1, 1, "unknown field \"pointz\"")
        );
        // The type error comes before the bad character right after it.
        assert_eq!(
            error("tier == 1 @"),
            err(
                1,
                9,
                "tier compares with a tier name (a string), found a number"
            )
        );
    }

    #[test]
    fn attribute_names() {
        let name = "a".repeat(64);
        let profile = TestProfile::default();
        assert!(!eval(&format!("attr.{name} == 1"), &profile));
        assert!(!eval("attr.1st_order_sku == \"x\"", &profile));
        let long = "a".repeat(65);
        assert_eq!(
            error(&format!("points > 1 or attr.{long} == 1")),
            err(
                1,
                15,
                &format!("invalid attribute name \"{long}\" (1 to 64 of a-z, 0-9 and _)")
            )
        );
        assert_eq!(
            error("attr.città == 1"),
            err(
                1,
                1,
                "invalid attribute name \"città\" (1 to 64 of a-z, 0-9 and _)"
            )
        );
    }

    #[test]
    fn in_lists_hold_at_most_256_values() {
        let ok = vec!["1"; PREDICATE_IN_VALUES_MAX].join(",");
        assert!(Predicate::parse(&format!("points in ({ok})")).is_ok());
        // "points in (" is 11 characters, each "1," two more: the 257th value is at 11 + 2 * 256 + 1.
        let too_many = vec!["1"; PREDICATE_IN_VALUES_MAX + 1].join(",");
        assert_eq!(
            error(&format!("points in ({too_many})")),
            err(1, 524, "an \"in\" list holds at most 256 values")
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let a = "has_tag(\"a\")";
        let nested = |levels: usize| format!("{}{a}{}", "(".repeat(levels), ")".repeat(levels));
        assert!(parse(&nested(PREDICATE_DEPTH_MAX)).eval(&tagged(&["a"])));
        let message = "nesting is deeper than the limit of 32 levels";
        assert_eq!(error(&nested(PREDICATE_DEPTH_MAX + 1)), err(1, 33, message));
        // Hostile input: thousands of "(" error out instead of overflowing the stack.
        assert_eq!(error(&"(".repeat(4000)), err(1, 33, message));
        // `not` nests too.
        let nots = |levels: usize| format!("{}{a}", "not ".repeat(levels));
        assert!(
            parse(&nots(PREDICATE_DEPTH_MAX)).eval(&tagged(&["a"])),
            "even number of nots"
        );
        assert_eq!(error(&nots(PREDICATE_DEPTH_MAX + 1)), err(1, 129, message));
        assert_eq!(error(&"not ".repeat(1000)), err(1, 129, message));
        // Mixed, and levels are released when a group closes.
        let mixed = format!("{} {a}{}", "not (".repeat(16), ")".repeat(16));
        assert!(Predicate::parse(&mixed).is_ok());
        let siblings = vec![nested(PREDICATE_DEPTH_MAX); 3].join(" and ");
        assert!(Predicate::parse(&siblings).is_ok());
        // Long flat chains are not nesting.
        let chain = vec![a; 200].join(" or ");
        assert!(parse(&chain).eval(&tagged(&["a"])));
    }

    #[test]
    fn source_size_is_bounded() {
        let a = "has_tag(\"a\")";
        let padded = format!("{a}{}", " ".repeat(PREDICATE_SOURCE_BYTES_MAX - a.len()));
        assert_eq!(padded.len(), PREDICATE_SOURCE_BYTES_MAX);
        assert!(Predicate::parse(&padded).is_ok());
        let over = format!("{padded} ");
        assert_eq!(
            error(&over),
            err(
                1,
                1,
                "predicate is 4097 bytes long, more than the limit of 4096 bytes"
            )
        );
        // Checked before anything else.
        assert_eq!(
            error(&"(".repeat(10_000)),
            err(
                1,
                1,
                "predicate is 10000 bytes long, more than the limit of 4096 bytes"
            )
        );
    }

    #[test]
    fn source_time_dependence_and_tags_read() {
        let source =
            "has_tag(\"b\") or (has_tag(\"a\") and not has_tag(\"b\"))\n or channel(\"c\")";
        let predicate = parse(source);
        assert_eq!(predicate.source(), source);
        assert_eq!(predicate.tags_read(), vec!["a".to_owned(), "b".to_owned()]);
        assert!(!predicate.depends_on_time());

        let timed = parse("points > 1 and not (days_since(last_order_at) > 90)");
        assert!(timed.depends_on_time());
        assert!(timed.tags_read().is_empty());
        assert!(parse("days_since(created_at) in (1, 2)").depends_on_time());
        assert!(!parse("attr.days_since == 3 and tier == \"gold\"").depends_on_time());

        assert_eq!(parse(source), parse(source));
        assert_ne!(parse("points > 1"), parse("points >  1"));
    }

    #[test]
    fn malformed_input_never_panics() {
        let malformed = [
            "",
            " ",
            "(",
            ")",
            "((",
            "))",
            "\"",
            "\\",
            "\"\\",
            "\"\\\"",
            ",",
            "==",
            "<=>",
            "!",
            "-",
            "--1",
            "-.",
            "1",
            "1.",
            "é",
            "\u{0}",
            "\u{feff}points > 1",
            "attr",
            "attr.",
            "attr..x",
            "attr.x",
            "attr.x ==",
            "attr.x in",
            "attr.x in (",
            "attr.x in (1",
            "attr.x in (1,",
            "not",
            "not not",
            "not (",
            "has_tag",
            "has_tag(",
            "has_tag(\"",
            "has_tag(\"x\\",
            "has_tag(\"x\"",
            "days_since",
            "days_since(",
            "days_since()",
            "days_since(created_at",
            "days_since(created_at)",
            "tier in (\"a\",,)",
            "points > 1 and",
            "points > 1 or or",
            "points >= 99999999999999999999999999999",
            "points >= -0",
            "points >= 0.0000000000000000000000000001",
            "points >= 0.00000000000000000000000000001",
            "𝒙 == 1",
            "attr.x == \"\u{1F600}",
        ];
        for source in malformed {
            let _ = Predicate::parse(source);
        }
        // Every prefix of a valid predicate, cut at each character.
        let valid = "not (tier >= \"gold\" or attr.city in (\"Köln\", \"a\\\"b\")) and \
                     days_since(last_order_at) <= -30.5 or has_identity(\"phone\")";
        assert!(Predicate::parse(valid).is_ok());
        for (end, _) in valid.char_indices() {
            let _ = Predicate::parse(&valid[..end]);
        }
        // Deterministic pseudo-random token soup.
        let pieces = [
            "(",
            ")",
            "not ",
            " and ",
            " or ",
            "points",
            "tier",
            "attr.x",
            "days_since(",
            "created_at",
            "has_tag(",
            "\"s\"",
            "\"",
            "\\",
            "1",
            "-2.5",
            " in ",
            ",",
            "==",
            "<",
            ">=",
            "!",
            "=",
            "\n",
            "é",
            "true",
            ".",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut source = String::new();
            for _ in 0..12 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                source.push_str(pieces[(state >> 33) as usize % pieces.len()]);
            }
            if let Ok(predicate) = Predicate::parse(&source) {
                let _ = predicate.eval(&TestProfile::default());
            }
        }
    }

    #[test]
    fn values_round_trip_through_serde() {
        let values = [
            Value::Bool(true),
            Value::Number(dec("12.50")),
            Value::Number(dec("-0.0000001")),
            Value::Number(dec("1234567890123456789.123456789")),
            Value::String("02139".into()),
            Value::String("12.50".into()),
            Value::String("true".into()),
        ];
        for value in values {
            let json = serde_json::to_string(&value).unwrap();
            let back: Value = serde_json::from_str(&json).unwrap();
            assert_eq!(back, value, "{json}");
            assert_eq!(
                format!("{back:?}"),
                format!("{value:?}"),
                "scale kept: {json}"
            );
        }
        assert_eq!(
            serde_json::to_string(&Value::Number(dec("12.50"))).unwrap(),
            r#"{"Number":"12.50"}"#
        );
        assert_eq!(
            serde_json::to_string(&Value::String("02139".into())).unwrap(),
            r#"{"String":"02139"}"#
        );
        assert!(serde_json::from_str::<Value>(r#"{"Number":"12abc"}"#).is_err());
    }
}

#[cfg(test)]
mod day_threshold_tests {
    use super::*;

    #[test]
    fn day_thresholds_are_where_comparisons_can_flip() {
        let p = Predicate::parse(r#"days_since(last_order_at) > 30 or (days_since(created_at) in (7, 14) and not days_since(last_order_at) <= 2.5)"#).unwrap();
        assert_eq!(
            p.day_thresholds(),
            vec![
                (TimeField::LastOrderAt, 2),
                (TimeField::LastOrderAt, 3),
                (TimeField::LastOrderAt, 30),
                (TimeField::LastOrderAt, 31),
                (TimeField::CreatedAt, 7),
                (TimeField::CreatedAt, 8),
                (TimeField::CreatedAt, 14),
                (TimeField::CreatedAt, 15),
            ]
        );
        assert_eq!(
            Predicate::parse("spend_365d > 10")
                .unwrap()
                .day_thresholds(),
            vec![]
        );
    }
}
