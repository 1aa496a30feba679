//! The syntax tree of a predicate ([`Expr`], its [`Operand`]s and [`CmpOp`]s) and its
//! evaluation against a [`PredicateContext`].

use std::cmp::Ordering;

use rust_decimal::Decimal;

use super::{NumberField, PredicateContext, TimeField, Value};

/// A node of the syntax tree. `and`/`or` chains are flat lists, so only parentheses and `not`
/// (both bounded by [`PREDICATE_DEPTH_MAX`](super::PREDICATE_DEPTH_MAX)) add depth.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Expr {
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
    /// `operand in (values)`, 1 to
    /// [`PREDICATE_IN_VALUES_MAX`](super::PREDICATE_IN_VALUES_MAX) values.
    In {
        operand: Operand,
        values: Vec<Value>,
    },
    HasTag(String),
    Channel(String),
    HasIdentity(String),
}

impl Expr {
    pub(super) fn eval(&self, ctx: &dyn PredicateContext) -> bool {
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
    pub(super) fn walk(&self, visit: &mut dyn FnMut(&Expr)) {
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
    pub(super) fn any(mut terms: Vec<Expr>) -> Expr {
        if terms.len() == 1 {
            if let Some(term) = terms.pop() {
                return term;
            }
        }
        Expr::Any(terms)
    }

    /// `a and b ...` from its terms, or the single term itself.
    pub(super) fn all(mut terms: Vec<Expr>) -> Expr {
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
pub(super) enum Operand {
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
                .days_since(field)
                .map(|days| Lhs::Value(Value::Number(Decimal::from(days)))),
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
pub(super) enum CmpOp {
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
